"""Text-encoder and VAE-decoder actors behind StagePools of 2: parity with the in-process stages, media
files written by the decoder, concurrency across actors, error pass-through and actor replacement."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import ray
import torch

from actors.config import PoolConfig
from actors.errors import StageActorDied, StageStartError, is_actor_death
from actors.pool import StagePool
from actors.stage_actors import TextEncoderActor, VAEDecoderActor, resolve_dtype
from models.wan.checkpoint import WanCheckpoint
from stages.decode import DecodeStage
from stages.media import read_video
from stages.text_encode import TextEncodeStage

POOL = PoolConfig(replicas=2, num_cpus=0.5, init_timeout_s=90)
REQUESTS = [("a red circle moving left", "gray static background"), ("a small blue square", None)]


@pytest.fixture(scope="module")
def checkpoint(tiny_model: str) -> WanCheckpoint:
    return WanCheckpoint.resolve(tiny_model)


@pytest.fixture(scope="module")
def pools(ray_cluster: None, tiny_model: str, run: Callable) -> Any:
    text = StagePool("text_encode", TextEncoderActor, (tiny_model, "fp32", "cpu"), {}, POOL)
    vae = StagePool("decode", VAEDecoderActor, (tiny_model, "cpu"), {}, POOL)
    run(_all(text.start(), vae.start()))
    yield text, vae
    run(_all(text.shutdown(), vae.shutdown()))


def test_resolve_dtype() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("fp32", "cuda") == torch.float32 and resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        resolve_dtype("fp16", "cpu")


def test_pool_places_one_bundle_per_actor(pools: Any) -> None:
    text, _ = pools
    table = ray.util.placement_group_table(text.placement_group)
    assert table["strategy"] == "PACK" and table["state"] == "CREATED"
    assert list(table["bundles"].values()) == [{"CPU": 0.5}] * 2
    assert text.size == 2 and text.idle == 2


def test_encode_matches_in_process_stage(pools: Any, checkpoint: WanCheckpoint, run: Callable) -> None:
    text, _ = pools
    got = run(text.call("encode", REQUESTS))
    reference = TextEncodeStage.from_pretrained(checkpoint.root).run(REQUESTS)
    assert len(got) == len(reference) == 2
    for (positive, negative), ref in zip(got, reference):
        context = positive["context"]
        assert isinstance(context, np.ndarray) and context.dtype == np.float32
        assert positive["pooled"] is None and positive["mask"] is None  # Wan's conditioning is the sequence alone
        assert context.shape[0] < checkpoint.preset.dit.text_len  # cut to the prompt's real length
        np.testing.assert_array_equal(context, ref.positive.context.numpy())
        if ref.negative is None:
            assert negative is None
        else:
            np.testing.assert_array_equal(negative["context"], ref.negative.context.numpy())


def test_decode_png_is_exact_and_mp4_has_every_frame(pools: Any, checkpoint: WanCheckpoint, tmp_path: Path,
                                                     run: Callable) -> None:
    _, vae = pools
    rng = np.random.default_rng(0)
    reference = DecodeStage.from_pretrained(checkpoint.root)

    still = rng.standard_normal((16, 1, 4, 4)).astype(np.float32)  # one latent frame -> one 32x32 frame -> png
    info = run(vae.call("decode", still, str(tmp_path / "still.png"), 16, {"job_id": "still"}))
    np.testing.assert_array_equal(read_video(info["path"]), reference.run(torch.from_numpy(still)))

    latents = rng.standard_normal((16, 2, 4, 4)).astype(np.float32)  # 2 latent frames -> 5 frames
    record = {"job_id": "clip", "params": {"seed": 3}}
    info = run(vae.call("decode", latents, str(tmp_path / "clip.mp4"), 16, record))
    assert info["path"] == str(tmp_path / "clip.mp4") and info["sidecar"] == str(tmp_path / "clip.json")
    assert (info["frames"], info["height"], info["width"]) == (5, 32, 32) and info["decode_s"] > 0
    video = read_video(info["path"])
    assert video.shape == (5, 32, 32, 3)
    # mp4 (yuv420p) is lossy: the frames are close to the exact decode, not equal.
    error = np.abs(video.astype(np.float32) - reference.run(torch.from_numpy(latents)).astype(np.float32)).mean()
    assert error < 20, f"mp4 frames differ from the decode by {error:.1f} grey levels on average"
    sidecar = json.loads(Path(info["sidecar"]).read_text())
    assert sidecar["job_id"] == "clip" and sidecar["params"] == {"seed": 3}
    assert sidecar["frames"] == 5 and sidecar["output"] == info["path"] and sidecar["decode_s"] == info["decode_s"]


def test_concurrent_calls_use_both_actors(pools: Any, run: Callable) -> None:
    text, _ = pools

    async def burst() -> tuple[int, list[str]]:
        calls = [asyncio.ensure_future(text.call("ping")) for _ in range(5)]
        await asyncio.sleep(0)  # every call has taken an actor or joined the queue
        busy_idle = text.idle
        return busy_idle, await asyncio.gather(*calls)

    idle_while_busy, answers = run(burst())
    assert idle_while_busy == 0
    assert len(answers) == 5 and len(set(answers[:2])) == 2, answers  # the first two ran on different actors
    assert len(set(answers)) == 2 and text.idle == 2


def test_stage_errors_pass_through_unchanged(pools: Any, tmp_path: Path, run: Callable) -> None:
    _, vae = pools
    actors_before = vae.actors
    latents = np.zeros((16, 2, 4, 4), np.float32)  # 5 frames cannot go into a png
    with pytest.raises(ValueError, match="png holds one frame") as caught:
        run(vae.call("decode", latents, str(tmp_path / "bad.png"), 16, {}))
    assert not isinstance(caught.value, StageActorDied) and not is_actor_death(caught.value)
    assert vae.actors == actors_before and vae.idle == 2


def test_dead_actor_raises_then_is_replaced(pools: Any, run: Callable,
                                            wait_until_dead: Callable[..., None]) -> None:
    text, _ = pools
    originals = text.actors
    ray.kill(originals[0])
    wait_until_dead(originals[0])

    async def two_calls() -> list[Any]:  # with both actors idle, the two calls take one actor each
        return await asyncio.gather(*(text.call("encode", REQUESTS[:1]) for _ in range(2)), return_exceptions=True)

    outcomes = run(two_calls())
    died = [o for o in outcomes if isinstance(o, StageActorDied)]
    assert len(died) == 1, outcomes
    assert died[0].stage == "text_encode" and "actor 0" in died[0].detail and "died during encode" in died[0].detail
    assert "rebuilt" in str(died[0])

    # The replacement starts in the dead actor's bundle; once it is ready the slot is back in the pool.
    run(asyncio.wait_for(_until(lambda: text.idle == 2), 60))
    replacement = text.actors[0]
    assert replacement is not None and replacement != originals[0] and text.actors[1] == originals[1]
    answers = run(_all(*(text.call("encode", REQUESTS[:1]) for _ in range(2))))  # one of them on the replacement
    assert all(np.array_equal(a[0][0]["context"], answers[0][0][0]["context"]) for a in answers)
    assert ray.get(replacement.ping.remote()) != ray.get(originals[1].ping.remote())


def test_health_check_replaces_a_dead_idle_actor_without_a_call(pools: Any, run: Callable,
                                                                wait_until_dead: Callable[..., None]) -> None:
    _, vae = pools
    assert vae.health() == "ok"
    originals = vae.actors
    ray.kill(originals[1])
    wait_until_dead(originals[1])
    assert vae.health() == "ok"  # nobody has looked yet

    began = time.monotonic()
    run(vae.check_health())
    assert vae.health() == {"actor 1": "replacing"} and vae.idle == 1
    run(asyncio.wait_for(_until(lambda: vae.health() == "ok"), 120))
    assert vae.idle == 2 and vae.actors[1] != originals[1] and vae.actors[0] == originals[0]
    assert time.monotonic() - began < 120
    run(vae.check_health())  # the replacement answers: nothing to do
    assert vae.health() == "ok" and vae.actors[1] == vae.actors[1]


def test_a_hung_call_is_cut_off_and_the_actor_replaced(ray_cluster: None, tiny_model: str, tmp_path: Path,
                                                       run: Callable) -> None:
    """A decode of a big latent takes seconds on CPU; with call_timeout_s=0.5 it counts as a hang."""
    pool = StagePool("decode", VAEDecoderActor, (tiny_model, "cpu"), {},
                     PoolConfig(replicas=1, num_cpus=0.5, init_timeout_s=90, call_timeout_s=0.5), "vae")
    run(pool.start())
    try:
        first = pool.actors[0]
        latents = np.zeros((16, 3, 32, 32), np.float32)  # ~10 s of decoding on this CPU
        began = time.monotonic()
        with pytest.raises(StageActorDied, match=r"did not finish decode\(\) within 0.5 s \(vae.call_timeout_s\)"):
            run(pool.call("decode", latents, str(tmp_path / "big.mp4"), 16, {}))
        assert time.monotonic() - began < 5
        assert pool.health() == {"actor 0": "replacing"}
        run(asyncio.wait_for(_until(lambda: pool.health() == "ok"), 120))
        assert pool.actors[0] != first
    finally:
        run(pool.shutdown())


def test_start_fails_clearly_when_resources_are_missing(ray_cluster: None, run: Callable) -> None:
    pool = StagePool("decode", VAEDecoderActor, ("unused", "cpu"), {}, PoolConfig(replicas=2, num_cpus=0.5, num_gpus=1,
                                                                                   init_timeout_s=1))
    with pytest.raises(StageStartError, match=r"missing \{GPU: 2\}"):
        run(pool.start())
    assert pool.placement_group is None


def test_start_fails_clearly_when_the_actor_cannot_load(ray_cluster: None, tmp_path: Path, run: Callable) -> None:
    pool = StagePool("decode", VAEDecoderActor, (str(tmp_path), "cpu"), {},  # a folder without a checkpoint
                     PoolConfig(replicas=1, num_cpus=0.5, init_timeout_s=60))
    with pytest.raises(StageStartError, match="died while loading") as caught:
        run(pool.start())
    assert "is not a checkpoint of a known family" in str(caught.value)
    assert pool.placement_group is None and pool.actors == []


async def _all(*coroutines: Any) -> list[Any]:
    return await asyncio.gather(*coroutines)


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.05)
