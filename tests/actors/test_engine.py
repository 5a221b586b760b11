"""The stage engine on real Ray pools (tiny model): a request end to end on parallel groups, faults,
restarts, priorities, cancellation."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import numpy as np
import pytest
import ray

from actors.config import ServiceConfig
from actors.engine import StageEngine
from actors.errors import StageActorDied
from actors.job_store import JobStore
from actors.pool import GroupPool

pytestmark = pytest.mark.slow

SMALL = {"prompt": "a red circle", "height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2, "seed": 1}
LONG = {**SMALL, "num_inference_steps": 200}


def _config(tiny_model: str, work: Path, **overrides: Any) -> ServiceConfig:
    return ServiceConfig.load(overrides={
        "model": tiny_model, "job_store": str(work / "jobs.sqlite"), "output_dir": str(work / "out"),
        "text_encoder.num_cpus": 0.5, "vae.num_cpus": 0.5, "dit.num_cpus": 0.5, **overrides})


async def _until(predicate: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def parallel_engine(ray_cluster: None, tiny_model: str, tmp_path_factory: pytest.TempPathFactory,
                    run: Callable[[Awaitable[Any]], Any]) -> Iterator[StageEngine]:
    """A service with a 2-rank DiT group (automatic layout: CFG-parallel for the guided tiny model) and one
    decode replica that is a patch-parallel group of 2 VAE ranks; shared, since start-up is most of the cost."""
    cfg = _config(tiny_model, tmp_path_factory.mktemp("parallel-engine"),
                  **{"dit.world_size": 2, "vae.patch_parallel": 2})
    engine = StageEngine(cfg)
    run(engine.start())
    yield engine
    run(engine.shutdown())


def test_service_runs_a_request_on_a_two_rank_dit_group_and_a_patch_parallel_vae_end_to_end(
        parallel_engine: StageEngine, tiny_model: str, run: Callable[[Awaitable[Any]], Any]) -> None:
    """Same pixels as the in-process Pipeline: a png is lossless, so only uint8 rounding may differ (the
    CFG-parallel DiT and the strip decode sum in another order than one process)."""

    from stages.media import read_video
    from stages.pipeline import Pipeline

    engine = parallel_engine
    assert str(engine.dit_groups[0].layout) == "cfg2"
    assert isinstance(engine.vae_pool, GroupPool) and engine.vae_pool.size == 1
    (vae_group,) = engine.vae_pool.groups
    table = ray.util.placement_group_table(vae_group.placement_group)
    assert table["strategy"] == "STRICT_PACK" and list(table["bundles"].values()) == [{"CPU": 0.5}] * 2

    still = {**SMALL, "height": 48, "width": 32, "num_frames": 1}  # 6 latent rows: a strip of 3 per VAE rank
    record = run(engine.generate(still, timeout_s=120))
    assert record.status == "succeeded", record.error
    assert record.result_path.endswith(".png")
    got = read_video(record.result_path)
    expected = Pipeline.from_pretrained(tiny_model).generate(still).frames
    assert got.shape == expected.shape == (1, 48, 32, 3)
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())
    sidecar = json.loads(Path(record.sidecar_path).read_text())
    assert (sidecar["frames"], sidecar["height"], sidecar["width"], sidecar["output"]) == (1, 48, 32,
                                                                                         record.result_path)

    clip = run(engine.generate({**SMALL, "height": 48}, timeout_s=120))  # 5 frames -> mp4
    assert clip.status == "succeeded", clip.error
    assert read_video(clip.result_path).shape == (5, 48, 32, 3)


def test_decode_errors_pass_through_the_group_pool(parallel_engine: StageEngine, tmp_path: Path,
                                                   run: Callable[[Awaitable[Any]], Any]) -> None:
    engine = parallel_engine
    (group,) = engine.vae_pool.groups
    latents = np.zeros((16, 2, 4, 4), np.float32)  # 5 frames cannot go into a png (rank 0 raises after the decode)
    with pytest.raises(ValueError, match="png holds one frame") as caught:
        run(engine.vae_pool.call("decode", latents, str(tmp_path / "bad.png"), 16, {}))
    assert not isinstance(caught.value, StageActorDied)
    assert group.running and engine.vae_pool.idle == 1


def test_killed_vae_rank_raises_then_its_group_is_rebuilt(
        parallel_engine: StageEngine, tmp_path: Path, run: Callable[[Awaitable[Any]], Any],
        wait_until_dead: Callable[..., None]) -> None:

    engine = parallel_engine
    (group,) = engine.vae_pool.groups
    old_ranks = group.ranks
    ray.kill(old_ranks[1])
    wait_until_dead(old_ranks[1])

    latents = np.zeros((16, 1, 4, 4), np.float32)
    with pytest.raises(StageActorDied) as caught:
        run(asyncio.wait_for(engine.vae_pool.call("decode", latents, str(tmp_path / "x.png"), 16, {}), 30))
    assert caught.value.stage == "decode" and "rank actor 1 of VAE group 0" in caught.value.detail
    wait_until_dead(old_ranks[0])  # the survivor was killed, not left waiting in gloo

    # the next job's decode waits for the rebuilt group and succeeds on it
    record = run(engine.generate(SMALL, timeout_s=120))
    assert record.status == "succeeded" and record.attempts == 0, record.error
    assert group.running and all(new != old for new, old in zip(group.ranks, old_ranks))


def test_killed_dit_rank_is_retried_and_the_next_job_succeeds(
        ray_cluster: None, tiny_model: str, tmp_path: Path, run: Callable[[Awaitable[Any]], Any]) -> None:

    async def scenario() -> None:
        engine = StageEngine(_config(tiny_model, tmp_path, **{"dit.world_size": 2, "scheduler.max_attempts": 2}))
        await engine.start()
        try:
            job = await engine.submit(LONG | {"cache": {"kind": "fbcache", "threshold": 0.0}})
            events: list[dict[str, Any]] = []

            async def follow() -> None:
                async for event in engine.events(job.id):
                    events.append(event)
            follower = asyncio.ensure_future(follow())
            await _until(lambda: engine.status(job.id).step >= 2)
            assert engine.status(job.id).cache["forwards_computed"] >= 2
            ray.kill(engine.dit_groups[0].ranks[1])
            # the job is retried on the rebuilt group, from its first step
            await _until(lambda: engine.status(job.id).attempts == 1, timeout_s=90)
            # the event that announces the retry says so, with the step back at 0
            first_try = [e for e in events if e["attempts"] == 0]
            retry = events[len(first_try)]
            assert max(e["step"] for e in first_try) >= 2 and retry["attempts"] == 1 and retry["step"] == 0, events
            await _until(lambda: engine.status(job.id).status == "denoising" and engine.status(job.id).step >= 1,
                         timeout_s=90)
            final = await engine.cancel(job.id)
            final = await engine.wait(job.id, timeout_s=60)
            assert final.status == "cancelled" and final.attempts == 1
            # the retry's cache started fresh: its counts are the second attempt's steps only
            assert final.cache["forwards_computed"] + final.cache["forwards_reused"] == final.step, final
            await asyncio.wait_for(follower, 10)
            after = await engine.generate(SMALL, timeout_s=120)
            assert after.status == "succeeded" and Path(after.result_path).is_file()
        finally:
            await engine.shutdown()

    run(scenario())


def test_job_fails_clearly_when_retries_run_out(
        ray_cluster: None, tiny_model: str, tmp_path: Path, run: Callable[[Awaitable[Any]], Any]) -> None:

    async def scenario() -> None:
        engine = StageEngine(_config(tiny_model, tmp_path, **{"scheduler.max_attempts": 1}))
        await engine.start()
        try:
            job = await engine.submit(LONG)
            await _until(lambda: engine.status(job.id).step >= 1)
            ray.kill(engine.dit_groups[0].ranks[0])
            final = await engine.wait(job.id, timeout_s=60)
            assert final.status == "failed" and "denoise" in final.error, final.error
            after = await engine.generate(SMALL, timeout_s=120)
            assert after.status == "succeeded"
        finally:
            await engine.shutdown()

    run(scenario())


@pytest.mark.parametrize("resume", [True, False])
def test_restart_resumes_or_fails_unfinished_jobs(
        resume: bool, ray_cluster: None, tiny_model: str, tmp_path: Path,
        run: Callable[[Awaitable[Any]], Any]) -> None:
    """A job store left by a crashed service (one job mid-denoise, one queued, one done)."""
    cfg = _config(tiny_model, tmp_path, resume_unfinished=resume)
    with JobStore(cfg.job_store) as store:
        params = {**SMALL, "negative_prompt": "", "guidance_scale": 5.0, "guidance_scale_2": 5.0, "shift": 3.0,
                  "sampler": "unipc", "fps": 16}
        mid = store.create(params)
        store.update(mid.id, status="denoising", total_steps=2, step=1)
        queued = store.create(params)
        done = store.create(params)
        store.update(done.id, status="succeeded")

    async def scenario() -> None:
        engine = StageEngine(cfg)
        await engine.start()
        try:
            for job_id in (mid.id, queued.id):
                final = await engine.wait(job_id, timeout_s=120)
                if resume:
                    assert final.status == "succeeded" and Path(final.result_path).is_file()
                else:
                    assert final.status == "failed" and "restarted" in final.error
            assert engine.status(done.id).status == "succeeded"
        finally:
            await engine.shutdown()

    run(scenario())


class RecordingMetrics:
    """Collects what the engine reports (the Serve app forwards the same calls to ray.serve.metrics)."""

    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = {}
        self.depths: list[dict[str, int]] = []
        self.steps = 0
        self.finished: list[str] = []

    def stage_latency(self, stage: str, seconds: float) -> None:
        self.latencies.setdefault(stage, []).append(seconds)

    def queue_depths(self, depths: Any) -> None:
        self.depths.append(dict(depths))

    def denoise_steps(self, steps: int) -> None:
        self.steps += steps

    def job_finished(self, status: str) -> None:
        self.finished.append(status)


def _record_payload_types(engine: StageEngine) -> list[type]:
    """The types of the arrays the engine passes to DiT groups (conditioning) and the VAE pool (latents)."""
    seen: list[type] = []
    group, begin, decode = engine.dit_groups[0], engine.dit_groups[0].begin, engine.vae_pool.call

    async def recording_begin(job_id: str, params: Any, positive: Any, negative: Any, *rest: Any) -> int:
        seen.extend([type(positive), type(negative)])
        return await begin(job_id, params, positive, negative, *rest)

    async def recording_decode(method: str, latents: Any, *rest: Any, **kwargs: Any) -> Any:
        seen.append(type(latents))
        return await decode(method, latents, *rest, **kwargs)

    group.begin, engine.vae_pool.call = recording_begin, recording_decode  # type: ignore[method-assign]
    return seen


def test_priority_cancel_and_metrics(
        ray_cluster: None, tiny_model: str, tmp_path: Path, run: Callable[[Awaitable[Any]], Any]) -> None:
    metrics = RecordingMetrics()

    async def scenario() -> None:
        # the default dispatch: all of a job's steps in one call, stopped out of band for priority and cancel
        engine = StageEngine(_config(tiny_model, tmp_path), metrics=metrics)
        await engine.start()
        handed_on = _record_payload_types(engine)
        try:
            running = await engine.submit({**SMALL, "num_inference_steps": 30})
            await _until(lambda: engine.status(running.id).step >= 1)  # its one dispatch is under way
            low = await engine.submit({**SMALL, "prompt": "low"}, priority=0)
            high = await engine.submit({**SMALL, "prompt": "high"}, priority=5)
            doomed = await engine.submit({**SMALL, "prompt": "cancelled while queued"}, priority=-1)
            assert (await engine.cancel(doomed.id)).status == "cancelled"
            records = [await engine.wait(j.id, timeout_s=120) for j in (running, low, high)]
            assert all(r.status == "succeeded" for r in records)
            low_rec, high_rec = records[1], records[2]
            # the high-priority job overtook the earlier low-priority one
            assert high_rec.stage_times["denoise"][0] < low_rec.stage_times["denoise"][0]
            # and it started before the running job finished: it stopped that job's dispatch at a step boundary
            assert high_rec.stage_times["denoise"][0] < records[0].stage_times["denoise"][1]

            # per-step progress from one dispatch, and a cancel that stops it mid-way
            long = await engine.submit(LONG)
            steps: list[int] = []
            async for event in engine.events(long.id):
                if event["status"] == "denoising" and event["step"] and event["step"] not in steps:
                    steps.append(event["step"])
                if len(steps) == 3:
                    break
            assert steps == [1, 2, 3], steps
            cancelled = await engine.cancel(long.id)
            final = await engine.wait(long.id, timeout_s=60)
            assert cancelled.status != "succeeded" and final.status == "cancelled"
            assert 3 <= final.step < LONG["num_inference_steps"], final.step
            # the engine handed conditioning and latents on as object-store references, never holding arrays
            assert handed_on and set(handed_on) == {ray.ObjectRef}, handed_on
        finally:
            await engine.shutdown()

    run(scenario())
    assert sorted(metrics.finished) == ["cancelled", "cancelled", "succeeded", "succeeded", "succeeded"]
    assert {stage: len(v) for stage, v in metrics.latencies.items()} == {"text_encode": 4, "denoise": 3, "decode": 3}
    assert 30 + 2 + 2 + 3 <= metrics.steps < 30 + 2 + 2 + LONG["num_inference_steps"]
    assert any(d["encode"] + d["denoise"] > 0 for d in metrics.depths) and metrics.depths[-1]["decode"] == 0


def test_two_dit_groups_denoise_side_by_side(
        ray_cluster: None, tiny_model: str, tmp_path: Path, run: Callable[[Awaitable[Any]], Any]) -> None:
    async def scenario() -> None:
        engine = StageEngine(_config(tiny_model, tmp_path, **{"dit.groups": 2, "dit.num_cpus": 0.25}))
        await engine.start()
        try:
            jobs = [await engine.submit({**SMALL, "num_inference_steps": 40, "seed": i}) for i in range(2)]
            records = [await engine.wait(j.id, timeout_s=120) for j in jobs]
            assert all(r.status == "succeeded" for r in records)
            (a_start, a_end), (b_start, b_end) = (r.stage_times["denoise"] for r in records)
            assert a_start < b_end and b_start < a_end, "the two jobs should denoise at the same time"
        finally:
            await engine.shutdown()

    run(scenario())
