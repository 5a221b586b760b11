"""DiT rank groups (gloo on CPU): parity with the in-process DenoiseStage over several chunks, cancel,
the process-group and chunk checks, placement, and the group-wide failure path (kill a rank -> restart)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import numpy as np
import pytest
import ray

from actors.config import DiTConfig, ServiceConfig
from actors.dit_group import DiTGroup
from actors.errors import StageActorDied, StageStartError
from actors.rank_group import Progress
from models.wan import family as wan_family
from models.wan.checkpoint import WanCheckpoint
from stages.denoise import DenoiseStage
from stages.params import GenerationParams, ResolvedParams
from stages.text_encode import TextEncodeStage

STEPS = 3


@pytest.fixture(scope="module")
def request_data(tiny_model: str) -> tuple[ResolvedParams, np.ndarray, np.ndarray, np.ndarray]:
    """A guided 32x32, 5-frame, 3-step request, its embeddings, and the in-process final latents."""
    checkpoint = WanCheckpoint.resolve(tiny_model)
    params = GenerationParams(prompt="a red circle moving left", height=32, width=32, num_frames=5,
                              num_inference_steps=STEPS, guidance_scale=5.0, seed=11).resolve(
        wan_family.description(checkpoint.preset))
    (emb,) = TextEncodeStage.from_pretrained(checkpoint.root).run(
        [(params.prompt, params.negative_prompt)])
    assert emb.negative is not None
    reference = DenoiseStage.from_pretrained(checkpoint.root).run(params, emb)
    return params, emb.positive.to_numpy(), emb.negative.to_numpy(), reference.numpy()


def _config(world_size: int, **degrees: int) -> ServiceConfig:
    return ServiceConfig(device="cpu", dit=DiTConfig(world_size=world_size, num_cpus=0.5, init_timeout_s=240,
                                                     **degrees))


# name -> (config, the layout it must resolve to). wan-tiny is guided with 2 heads: auto picks CFG parallel.
GROUPS = {
    "single": (_config(1), "single"),
    "auto2": (_config(2), "cfg2"),
    "ulysses2": (_config(2, ulysses_degree=2), "ulysses2"),
}
# Parallel ranks sum in another order than one rank (see tests/parallel/test_context_parallel.py).
TOLERANCE = {"single": 1e-6, "auto2": 2e-5, "ulysses2": 2e-5}


@pytest.fixture(scope="module")
def groups(ray_cluster: None, tiny_model: str, run: Callable) -> Any:
    """Groups of 1 and 2 ranks, started together (start-up is mostly each rank importing torch)."""
    built = {name: DiTGroup(cfg, group_index=i, model=tiny_model) for i, (name, (cfg, _)) in enumerate(GROUPS.items())}

    async def start_all() -> None:
        await asyncio.gather(*(g.start() for g in built.values()))

    run(start_all())
    yield built
    for group in built.values():
        run(group.shutdown())


@pytest.mark.parametrize("name", list(GROUPS))
def test_group_matches_in_process_denoise_over_chunks(groups: dict[str, DiTGroup], request_data: Any,
                                                      name: str, run: Callable) -> None:
    group = groups[name]
    world_size = group.world_size
    params, positive, negative, reference = request_data
    assert not group.broken and run(group.ping())

    info = [ray.get(r.group_info.remote()) for r in group.ranks]
    expected_sum = world_size * (world_size + 1) // 2
    layout = GROUPS[name][1]
    assert str(group.layout) == layout
    assert info == [{"rank": i, "world_size": world_size, "backend": "gloo", "all_reduce_sum": expected_sum,
                     "layout": layout} for i in range(world_size)]

    assert run(group.begin("job-a", params.model_dump(), positive, negative)) == STEPS
    first = run(group.run_steps("job-a", 2))
    assert (first["step"], first["total"], first["done"], len(first["step_times"])) == (2, STEPS, False, 2)
    last = run(group.run_steps("job-a", 2))  # only one step is left
    assert (last["step"], last["done"], len(last["step_times"])) == (STEPS, True, 1)
    latents = run(group.result("job-a"))
    assert latents.dtype == np.float32 and latents.shape == reference.shape
    np.testing.assert_allclose(latents, reference, rtol=0, atol=TOLERANCE[name])
    assert [ray.get(r.jobs.remote()) for r in group.ranks] == [[]] * world_size


def test_drop_mid_job_forgets_it_on_every_rank(groups: dict[str, DiTGroup], request_data: Any,
                                               run: Callable) -> None:
    group = groups["auto2"]
    params, positive, negative, _ = request_data
    run(group.begin("job-b", params, positive, negative))  # a ResolvedParams works too
    assert run(group.run_steps("job-b", 1))["step"] == 1
    run(group.drop("job-b"))
    run(group.drop("job-b"))  # idempotent
    assert [ray.get(r.jobs.remote()) for r in group.ranks] == [[], []]
    with pytest.raises(KeyError, match="unknown job 'job-b'"):
        run(group.run_steps("job-b", 1))
    assert not group.broken  # a Python error is not a rank death


def test_result_before_the_last_step_is_refused(groups: dict[str, DiTGroup], request_data: Any,
                                                run: Callable) -> None:
    group = groups["auto2"]
    params, positive, negative, _ = request_data
    run(group.begin("job-c", params.model_dump(), positive, negative))
    with pytest.raises(ValueError, match="at step 0 of 3"):
        run(group.result("job-c"))
    assert [ray.get(r.jobs.remote()) for r in group.ranks] == [["job-c"], ["job-c"]]  # nothing was dropped
    with pytest.raises(ValueError, match="already exists"):
        run(group.begin("job-c", params.model_dump(), positive, negative))
    run(group.drop("job-c"))


def test_chunk_check_catches_ranks_that_disagree(groups: dict[str, DiTGroup], request_data: Any,
                                                 run: Callable) -> None:
    """Driven rank by rank (bypassing DiTGroup): the chunk-start check must fail every rank before the
    forwards' own collectives could pair up wrongly and hang."""
    group = groups["auto2"]
    params, positive, negative, _ = request_data
    rank0, rank1 = group.ranks
    run(group.begin("job-d", params.model_dump(), positive, negative))
    uneven = [rank0.run_steps.remote("job-d", 1), rank1.run_steps.remote("job-d", 2)]
    for stream in uneven:
        with pytest.raises(RuntimeError, match=r"ranks disagree at the start of the chunk \(steps 1..2\)"):
            _outcome(stream)
    one_fails = [rank0.run_steps.remote("no-such-job", 1), rank1.run_steps.remote("job-d", 1)]
    with pytest.raises(KeyError, match="unknown job 'no-such-job'"):
        _outcome(one_fails[0])
    with pytest.raises(RuntimeError, match="another rank failed at the start of the chunk"):
        _outcome(one_fails[1])
    streams = [rank.run_steps.remote("job-d", 1) for rank in (rank0, rank1)]  # both issued before we wait
    ok = [_outcome(stream) for stream in streams]
    assert [len(o) for o in ok] == [1, 1] and [o[0]["step"] for o in ok] == [1, 1]  # no early report, no events
    streams = [rank.run_steps.remote("job-d", 1, 2, True) for rank in (rank0, rank1)]  # with per-step events
    ok = [_outcome(stream) for stream in streams]
    assert [o[0] for o in ok] == [Progress({"step": 2, "total": STEPS, "seconds": o[1]["step_times"][0],
                                            "cache": None}) for o in ok]
    assert [o[1]["step"] for o in ok] == [2, 2]
    run(group.drop("job-d"))


def _outcome(stream: Any) -> list[Any]:
    """Everything a rank's run_steps stream yields (progress events, an early error report, its result), or its
    error."""
    return [ray.get(ref, timeout=120) for ref in stream]


def test_ping_is_answered_while_a_chunk_runs(groups: dict[str, DiTGroup], request_data: Any,
                                            run: Callable) -> None:
    """ping has its own concurrency group, so a health check does not wait for a long chunk (~1 s here)."""
    group = groups["single"]
    params, positive, negative, _ = request_data
    big = params.model_copy(update={"height": 128, "width": 128, "num_frames": 49, "num_inference_steps": 30})
    run(group.begin("job-long", big, positive, negative))

    async def ping_during_chunk() -> tuple[bool, bool, dict[str, Any]]:
        chunk = asyncio.ensure_future(group.run_steps("job-long", 30))
        await asyncio.sleep(0.05)
        healthy = await group.ping(timeout_s=30)
        return healthy, chunk.done(), await chunk

    healthy, chunk_done_at_ping, answer = run(ping_during_chunk())
    assert healthy and not chunk_done_at_ping and answer["done"]
    run(group.drop("job-long"))


@pytest.mark.parametrize("name", ["single", "ulysses2"])
def test_stop_ends_a_running_dispatch_on_every_rank_at_one_step(groups: dict[str, DiTGroup], request_data: Any,
                                                               name: str, run: Callable) -> None:
    """One dispatch of every step, per-step events streamed; a stop asked mid-run ends it at one step on every
    rank (the end-of-run check would raise otherwise), and the job resumed to the end equals an unstopped run."""
    group = groups[name]
    params, positive, negative, _ = request_data
    many = params.model_copy(update={"num_inference_steps": 40})

    async def stopped_then_resumed() -> tuple[list[int], int | None, dict[str, Any], dict[str, Any]]:
        await group.begin("job-stop", many, positive, negative)
        seen: list[int] = []
        stops: list[asyncio.Task[int | None]] = []

        def on_step(event: dict[str, Any]) -> None:
            seen.append(event["step"])
            if event["step"] == 2:
                stops.append(asyncio.ensure_future(group.stop("job-stop")))

        first = await group.run_steps("job-stop", 40, on_step=on_step)
        stop_step = await stops[0]
        rest = await group.run_steps("job-stop", 40)
        return seen, stop_step, first, rest

    seen, stop_step, first, rest = run(stopped_then_resumed())
    assert stop_step is not None and 2 <= stop_step < 40, stop_step
    assert (first["step"], first["done"]) == (stop_step, False) and seen == list(range(1, stop_step + 1))
    assert (rest["step"], rest["done"], len(rest["step_times"])) == (40, True, 40 - stop_step)
    stopped = run(group.result("job-stop"))
    run(group.begin("job-straight", many, positive, negative))
    assert run(group.run_steps("job-straight", 40))["done"]
    np.testing.assert_allclose(stopped, run(group.result("job-straight")), rtol=0, atol=1e-6)
    assert run(group.stop("job-straight")) is None  # nothing runs: nothing to stop


def test_stop_that_overtakes_its_dispatch_holds_it_at_its_first_step(groups: dict[str, DiTGroup],
                                                                    request_data: Any, run: Callable) -> None:
    """The ranks are busy with another job's run, so the stop reaches them before this run has begun."""
    group = groups["auto2"]
    params, positive, negative, _ = request_data
    run(group.begin("job-race", params, positive, negative))
    run(group.begin("job-busy", params.model_copy(update={"num_inference_steps": 20}), positive, negative))

    async def stop_before_it_starts() -> tuple[int | None, dict[str, Any], dict[str, Any]]:
        busy = asyncio.ensure_future(group.run_steps("job-busy", 20))
        dispatch = asyncio.ensure_future(group.run_steps("job-race", STEPS))  # queued behind job-busy's run
        await asyncio.sleep(0)
        return await group.stop("job-race"), await dispatch, await busy

    stop_step, out, busy = run(stop_before_it_starts())
    assert stop_step == 0 and (out["step"], out["done"], out["step_times"]) == (0, False, [])
    assert busy["done"]
    assert run(group.run_steps("job-race", STEPS))["done"]  # the next run is not held by the old stop
    for job in ("job-race", "job-busy"):
        run(group.drop(job))


def test_group_uses_one_strict_pack_bundle_per_rank(groups: dict[str, DiTGroup]) -> None:
    for group in groups.values():
        table = ray.util.placement_group_table(group.placement_group)
        assert table["strategy"] == "STRICT_PACK" and table["state"] == "CREATED"
        assert list(table["bundles"].values()) == [{"CPU": 0.5}] * group.world_size


def test_killed_rank_breaks_the_group_and_restart_recovers(groups: dict[str, DiTGroup], request_data: Any,
                                                           run: Callable,
                                                           wait_until_dead: Callable[..., None]) -> None:
    group = groups["auto2"]
    params, positive, negative, reference = request_data
    run(group.begin("job-e", params.model_dump(), positive, negative))
    run(group.run_steps("job-e", 1))
    old_ranks = group.ranks
    ray.kill(old_ranks[1])
    wait_until_dead(old_ranks[1])

    # Rank 0 runs the chunk and would block in the chunk-end all_reduce; the group must not wait for it.
    began = time.monotonic()
    with pytest.raises(StageActorDied, match="denoise") as caught:
        run(asyncio.wait_for(group.run_steps("job-e", 1), 20))
    assert time.monotonic() - began < 10
    assert caught.value.stage == "denoise" and "rank actor 1" in caught.value.detail
    assert group.broken
    wait_until_dead(old_ranks[0])  # the survivor was killed, not left stuck in gloo
    with pytest.raises(StageActorDied, match="restart"):
        run(group.run_steps("job-e", 1))
    assert not run(group.ping())

    run(group.restart())
    assert not group.broken and run(group.ping())
    assert all(new != old for new, old in zip(group.ranks, old_ranks))
    run(group.begin("job-e", params.model_dump(), positive, negative))  # the retried job
    while not run(group.run_steps("job-e", 2))["done"]:
        pass
    np.testing.assert_allclose(run(group.result("job-e")), reference, rtol=0, atol=TOLERANCE["auto2"])


def test_drop_with_a_dead_rank_does_not_raise_but_breaks_the_group(groups: dict[str, DiTGroup], run: Callable,
                                                                  wait_until_dead: Callable[..., None]) -> None:
    """Cancellation must not throw at the engine; the broken group shows on the next call instead."""
    group = groups["auto2"]
    assert not group.broken
    ray.kill(group.ranks[0])
    wait_until_dead(group.ranks[0])
    run(group.drop("job-f"))
    assert group.broken
    wait_until_dead(group.ranks[1])
    with pytest.raises(StageActorDied, match="rank actor 0"):
        run(group.begin("job-g", {}, np.zeros((1, 1), np.float32), None))


@pytest.mark.parametrize("degrees, message", [
    ({"ulysses_degree": 4}, r"= 4 ranks, but there are 2 \(dit.world_size\)"),
    ({"ring_degree": 2, "cfg_degree": 2}, r"= 4 ranks, but there are 2"),
])
def test_invalid_layout_fails_before_any_actor_starts(tiny_model: str, ray_cluster: None, run: Callable,
                                                      degrees: dict[str, int], message: str) -> None:
    group = DiTGroup(_config(2, **degrees), group_index=9, model=tiny_model)
    with pytest.raises(StageStartError, match=message):
        run(group.start())
    assert group.placement_group is None and group.ranks == []


def test_ulysses_degree_must_divide_the_models_heads(tiny_model: str, ray_cluster: None, run: Callable) -> None:
    group = DiTGroup(_config(3, ulysses_degree=3), group_index=9, model=tiny_model)
    with pytest.raises(StageStartError, match=r"ulysses_degree 3 does not divide the model's 2 attention heads "
                                              r"\(valid Ulysses degrees: 1, 2\).*e\.g\. cfg_degree=1 ring_degree=3"):
        run(group.start())
