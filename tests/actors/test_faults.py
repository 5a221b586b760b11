"""Faults inside a rank group and at the engine: one rank raising (out of memory) or hanging mid-forward,
a rank raising mid-decode, idle actors dying between jobs, a slow job store.

The ranks are the real ones with one fault injected (tests/actors/fault_injection.py). Every bound
asserted here is far below the process-group timeout (init_timeout_s, 240 s in these configs),
which is how long the other ranks would otherwise wait in their collective.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import numpy as np
import pytest
import ray
import ray.cloudpickle

from actors.config import DiTConfig, ServiceConfig, VAEConfig
from actors.dit_group import DiTGroup
from actors.engine import StageEngine
from actors.errors import StageActorDied
from actors.job_store import JobRecord, JobStore
from actors.vae_group import VAEGroup
from models.registry import describe
from models.wan.checkpoint import WanCheckpoint
from stages.params import GenerationParams, ResolvedParams
from tests.actors import fault_injection
from tests.actors.fault_injection import (HANG_MARK, LATE_OOM_MARK, OOM_MARK, OOM_MESSAGE, FaultyDiTRank,
                                         FaultyVAERank)

ray.cloudpickle.register_pickle_by_value(sys.modules[fault_injection.__name__])

pytestmark = pytest.mark.slow

GRACE_S = 2.0  # fault_grace_s in these configs
STEP_BUDGET_S = 8.0  # dit.step_timeout_s for the hang test
PG_TIMEOUT_S = 240.0  # init_timeout_s, also the process-group timeout the stuck ranks would wait for
SMALL = {"prompt": "a red circle", "height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 3, "seed": 1}


def _resolved(tiny_model: str, prompt: str) -> ResolvedParams:
    return GenerationParams(**{**SMALL, "prompt": prompt}).resolve(describe(tiny_model))


def _embeddings(tiny_model: str) -> tuple[dict, dict]:
    """Random conditioning of the DiT's input shape (L, D), as the text pool sends it (named arrays): the
    faults do not depend on its values."""
    dit = WanCheckpoint.resolve(tiny_model).preset.dit
    rng = np.random.default_rng(0)
    return tuple({"context": rng.standard_normal((n, dit.text_dim)).astype(np.float32), "pooled": None, "mask": None}
                 for n in (7, 5))


@pytest.fixture(scope="module")
def faulty_dit(ray_cluster: None, tiny_model: str, run: Callable) -> Iterator[DiTGroup]:
    cfg = ServiceConfig(device="cpu", dit=DiTConfig(world_size=2, num_cpus=0.5, init_timeout_s=PG_TIMEOUT_S,
                                                    fault_grace_s=GRACE_S, step_timeout_s=STEP_BUDGET_S))
    group = DiTGroup(cfg, group_index=7, model=tiny_model, actor_cls=FaultyDiTRank)
    run(group.start())
    yield group
    run(group.shutdown())


def test_a_rank_out_of_memory_mid_forward_breaks_the_group_within_the_grace_period(
        faulty_dit: DiTGroup, tiny_model: str, run: Callable, wait_until_dead: Callable[..., None]) -> None:
    group = faulty_dit
    positive, negative = _embeddings(tiny_model)
    run(group.begin("oom-job", _resolved(tiny_model, f"a circle {OOM_MARK}"), positive, negative))
    assert run(group.run_steps("oom-job", 1))["step"] == 1  # step 0 is fine; rank 1 fails in step 1
    old_ranks = group.ranks

    began = time.monotonic()
    with pytest.raises(StageActorDied) as caught:
        run(group.run_steps("oom-job", 2))
    elapsed = time.monotonic() - began
    print(f"DiT rank OOM mid-forward: group broken {elapsed:.2f} s after run_steps was issued")
    # the grace period plus a step and Ray's round trips; without it rank 0 waits for the 240 s group timeout
    assert GRACE_S <= elapsed < GRACE_S + 15, elapsed
    detail = caught.value.detail
    assert caught.value.stage == "denoise"
    assert "rank 1 of DiT group 7 failed during run_steps(oom-job)" in detail, detail
    assert f"OutOfMemoryError: {OOM_MESSAGE}" in detail and "rank(s) 0 had not finished" in detail, detail
    assert "dit.fault_grace_s" in detail and "Traceback" not in detail and "ray::" not in detail, detail
    assert group.broken
    for rank in old_ranks:  # all killed, not left waiting in gloo
        wait_until_dead(rank)

    run(group.restart())
    run(group.begin("next-job", _resolved(tiny_model, "a blue square"), positive, negative))
    out = run(group.run_steps("next-job", 3))
    assert out["done"] and out["step"] == 3
    assert run(group.result("next-job")).shape[0] == 16


def test_a_rank_error_after_the_forward_fails_all_ranks_together_and_the_group_lives_on(
        faulty_dit: DiTGroup, tiny_model: str, run: Callable) -> None:
    """Rank 1 raises after step 1's forward: rank 0 finishes the chunk and both meet at the chunk-end check,
    within the grace period, so the rank's own error (its type kept) is raised and no rank is killed."""
    import torch

    group = faulty_dit
    ranks = group.ranks
    positive, negative = _embeddings(tiny_model)
    run(group.begin("late-job", _resolved(tiny_model, f"a circle {LATE_OOM_MARK}"), positive, negative))
    run(group.run_steps("late-job", 1))
    began = time.monotonic()
    with pytest.raises(torch.OutOfMemoryError, match="injected") as caught:
        run(group.run_steps("late-job", 1))
    assert time.monotonic() - began < GRACE_S
    assert not isinstance(caught.value, StageActorDied)
    assert group.running and group.ranks == ranks and run(group.ping())
    run(group.drop("late-job"))
    run(group.begin("after-late", _resolved(tiny_model, "a blue square"), positive, negative))
    assert run(group.run_steps("after-late", 3))["done"]
    run(group.drop("after-late"))


def test_a_rank_hanging_mid_forward_breaks_the_group_after_the_step_budget(
        faulty_dit: DiTGroup, tiny_model: str, run: Callable, wait_until_dead: Callable[..., None]) -> None:
    group = faulty_dit
    assert group.running
    positive, negative = _embeddings(tiny_model)
    run(group.begin("hang-job", _resolved(tiny_model, f"a circle {HANG_MARK}"), positive, negative))
    assert run(group.run_steps("hang-job", 1))["step"] == 1

    began = time.monotonic()
    with pytest.raises(StageActorDied) as caught:
        run(group.run_steps("hang-job", 1))
    elapsed = time.monotonic() - began
    print(f"DiT rank hang mid-forward: group broken {elapsed:.2f} s after run_steps was issued")
    assert STEP_BUDGET_S <= elapsed < STEP_BUDGET_S + 10, elapsed
    assert "rank(s) 0, 1 of DiT group 7 did not finish run_steps(hang-job) within 8 s (dit.step_timeout_s)" in \
        caught.value.detail, caught.value.detail
    for rank in group.ranks:
        wait_until_dead(rank)


def test_a_vae_rank_out_of_memory_mid_decode_breaks_the_group_and_it_recovers(
        ray_cluster: None, tiny_model: str, tmp_path: Path, run: Callable,
        wait_until_dead: Callable[..., None]) -> None:
    cfg = ServiceConfig(device="cpu", vae=VAEConfig(patch_parallel=2, num_cpus=0.5, init_timeout_s=PG_TIMEOUT_S,
                                                    fault_grace_s=GRACE_S))
    group = VAEGroup(cfg, index=5, model=tiny_model, actor_cls=FaultyVAERank)
    latents = np.zeros((16, 1, 4, 4), np.float32)  # 4 latent rows: a strip of 2 per rank, with a halo exchange

    async def scenario() -> tuple[float, StageActorDied, dict[str, Any]]:
        await group.start()
        try:
            began = time.monotonic()
            with pytest.raises(StageActorDied) as caught:
                await group.decode(latents, str(tmp_path / f"{OOM_MARK}.png"), 16, {})
            elapsed = time.monotonic() - began
            old = group.ranks
            for rank in old:
                await asyncio.to_thread(wait_until_dead, rank)
            await group.restart()
            return elapsed, caught.value, await group.decode(latents, str(tmp_path / "fine.png"), 16, {})
        finally:
            await group.shutdown()

    elapsed, error, result = run(scenario())
    print(f"VAE rank OOM mid-decode: group broken {elapsed:.2f} s after decode was issued")
    assert GRACE_S <= elapsed < GRACE_S + 15, elapsed
    assert error.stage == "decode"
    assert "rank 1 of VAE group 5 failed during decode (OutOfMemoryError: CUDA out of memory" in error.detail, \
        error.detail
    assert "vae.fault_grace_s" in error.detail and "Traceback" not in error.detail
    assert Path(result["path"]).is_file() and result["frames"] == 1


class SlowStore(JobStore):
    """A real store whose writes take `delay_s` longer (a slow disk under the fsync)."""

    delay_s = 0.0

    def create(self, *args: Any, **kwargs: Any) -> JobRecord:
        time.sleep(self.delay_s)
        return super().create(*args, **kwargs)

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        time.sleep(self.delay_s)
        return super().update(job_id, **fields)

    def mark_stage(self, job_id: str, stage: str, start: bool, **fields: Any) -> JobRecord:
        time.sleep(self.delay_s)
        return super().mark_stage(job_id, stage, start, **fields)


async def _until(predicate: Callable[[], bool], timeout_s: float) -> float:
    """Seconds until predicate() holds (polled every 50 ms); fails after timeout_s."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    while not predicate():
        assert loop.time() - began < timeout_s, f"condition not reached within {timeout_s} s"
        await asyncio.sleep(0.05)
    return loop.time() - began


@pytest.fixture(scope="module")
def faulty_engine(ray_cluster: None, tiny_model: str, tmp_path_factory: pytest.TempPathFactory,
                  run: Callable[[Awaitable[Any]], Any]) -> Iterator[StageEngine]:
    """A service with a 2-rank DiT group of FaultyDiTRanks, a patch-parallel VAE group of 2 and one text
    encoder; health checks every second; a job store that can be slowed down."""
    work = tmp_path_factory.mktemp("faulty-engine")
    cfg = ServiceConfig.load(overrides={
        "model": tiny_model, "job_store": str(work / "jobs.sqlite"), "output_dir": str(work / "out"),
        "text_encoder.num_cpus": 0.5, "vae.num_cpus": 0.5, "dit.num_cpus": 0.5,
        "dit.world_size": 2, "vae.patch_parallel": 2, "scheduler.max_attempts": 2,
        "dit.fault_grace_s": GRACE_S, "vae.fault_grace_s": GRACE_S,
        "dit.init_timeout_s": PG_TIMEOUT_S, "vae.init_timeout_s": PG_TIMEOUT_S,
        "text_encoder.init_timeout_s": PG_TIMEOUT_S,
        "dit.health_check_period_s": 1, "vae.health_check_period_s": 1, "text_encoder.health_check_period_s": 1})
    engine = StageEngine(cfg, store=SlowStore(cfg.job_store))
    engine.dit_groups = [DiTGroup(cfg, 0, model=tiny_model, actor_cls=FaultyDiTRank)]
    run(engine.start())
    yield engine
    run(engine.shutdown())


def test_engine_retries_a_job_whose_rank_ran_out_of_memory_then_fails_it_clearly(
        faulty_engine: StageEngine, run: Callable[[Awaitable[Any]], Any]) -> None:
    """The fault is in the job itself (it hits every try), so both tries fail and the job fails with the rank's
    own error; the next job runs on the twice rebuilt group."""
    engine = faulty_engine

    async def scenario() -> tuple[JobRecord, JobRecord]:
        doomed = await engine.submit({**SMALL, "prompt": f"a circle {OOM_MARK}"})
        failed = await engine.wait(doomed.id, timeout_s=2 * PG_TIMEOUT_S)
        after = await engine.generate(SMALL, timeout_s=PG_TIMEOUT_S)
        return failed, after

    failed, after = run(scenario())
    assert failed.status == "failed" and failed.attempts == 1, failed
    assert "rank 1 of DiT group 0 failed during run_steps(" in failed.error, failed.error
    assert f"OutOfMemoryError: {OOM_MESSAGE}" in failed.error and "gave up after 2 attempts" in failed.error
    assert after.status == "succeeded" and after.attempts == 0 and Path(after.result_path).is_file(), after.error


def test_health_check_replaces_dead_idle_actors_of_every_kind_and_readyz_follows(
        faulty_engine: StageEngine, run: Callable[[Awaitable[Any]], Any],
        wait_until_dead: Callable[..., None]) -> None:
    engine = faulty_engine

    async def scenario() -> dict[str, Any]:
        await _until(lambda: engine.snapshot()["ready"], timeout_s=PG_TIMEOUT_S)  # earlier rebuilds are done
        (vae_group,) = engine.vae_pool.groups
        victims = [engine.text_pool.actors[0], engine.dit_groups[0].ranks[1], vae_group.ranks[0]]
        for victim in victims:
            ray.kill(victim)
        for victim in victims:
            await asyncio.to_thread(wait_until_dead, victim)
        seen: dict[str, Any] = {}

        def every_stage_down() -> bool:
            for stage, state in engine.snapshot()["stages"].items():
                if state != "ok":
                    seen.setdefault(stage, state)
            return len(seen) == 3

        detected = await _until(every_stage_down, timeout_s=10)  # one period (1 s) plus the pings
        assert not engine.snapshot()["ready"]
        recovered = await _until(lambda: engine.snapshot()["ready"], timeout_s=PG_TIMEOUT_S)
        return {"seen": seen, "detected": detected, "recovered": recovered, "victims": victims,
                "record": await engine.generate(SMALL, timeout_s=PG_TIMEOUT_S)}

    out = run(scenario())
    print(f"health: every stage reported down {out['detected']:.2f} s after the kills, ready again "
          f"{out['recovered']:.2f} s later")
    # the VAE group may be seen between its ping breaking it and the pool starting its rebuild
    assert out["seen"] in ({"text_encode": {"actor 0": "replacing"}, "denoise": {"group 0": "rebuilding"},
                            "decode": {"VAE group 0": state}} for state in ("broken", "rebuilding")), out["seen"]
    assert out["detected"] < 10 and out["recovered"] < PG_TIMEOUT_S
    assert engine.text_pool.actors[0] not in out["victims"] and engine.dit_groups[0].ranks[1] not in out["victims"]
    assert out["record"].status == "succeeded", out["record"].error


def test_slow_job_store_writes_do_not_block_the_event_loop(
        faulty_engine: StageEngine, run: Callable[[Awaitable[Any]], Any]) -> None:
    engine = faulty_engine
    store = engine.store
    assert isinstance(store, SlowStore)

    async def scenario() -> tuple[float, float, float, JobRecord, JobRecord | None]:
        await _until(lambda: engine.snapshot()["ready"], timeout_s=PG_TIMEOUT_S)
        loop = asyncio.get_running_loop()
        gaps: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:  # how late a 20 ms sleep wakes up = how long the loop was blocked
            while not stop.is_set():
                before = loop.time()
                await asyncio.sleep(0.02)
                gaps.append(loop.time() - before - 0.02)

        ticking = asyncio.create_task(ticker())
        store.delay_s = 0.5
        try:
            began = loop.time()
            job = await engine.submit(SMALL)
            accepted_after = loop.time() - began
            stored = await asyncio.to_thread(store.get, job.id)  # durable before submit returned
            final = await engine.wait(job.id, timeout_s=PG_TIMEOUT_S)
        finally:
            store.delay_s = 0.0
            stop.set()
            await ticking
        return accepted_after, max(gaps), len(gaps), final, stored

    accepted_after, worst_gap, ticks, final, stored = run(scenario())
    print(f"slow store: submit answered after {accepted_after:.2f} s; worst loop stall {worst_gap * 1000:.0f} ms "
          f"over {ticks} ticks")
    assert accepted_after >= 0.5 and stored is not None
    assert final.status == "succeeded" and final.step == final.total_steps == 3, final
    # about 15 writes of 0.5 s each ran meanwhile; on the loop each would have stalled it for 0.5 s
    assert worst_gap < 0.3 and ticks > 100, (worst_gap, ticks)
