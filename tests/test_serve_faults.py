"""Faults of the running service (Ray Serve, real app, tiny model, CPU): a stage actor of each kind
killed mid-job, a job whose retries run out, a second engine on an owned job store, a hot
upgrade of the application while jobs run, and the ingress replica itself killed mid-job. Every
accepted job ends `succeeded` (a retry on a rebuilt pool, or the next replica's engine resuming
what the job store says is unfinished) or `failed` with an error naming the stage.

One application serves the whole module; the tests run in file order, each leaving it healthy.
Actors are found through the GCS actor table (the dashboard, and so `ray.util.state`, is off)
and killed with SIGKILL, as a crash would end them.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.serve_helpers import serve_url, service_config

pytestmark = pytest.mark.slow

APP = "smartdiff-faults"
ROUTE = "/faults"
SMALL = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2}
LONG_STEPS = 200  # the most a request may ask for: about 1 s of denoising, long enough to be caught midway
STARTUP_S = 240  # a fresh replica loads every stage; the machine is shared


class Service:
    """The module's application: its URL and config overrides, and a way to (re)deploy it."""

    def __init__(self, url: str, model: str, work: Path, overrides: dict[str, Any]) -> None:
        self.url = url
        self.model = model
        self.work = work
        self.overrides = overrides

    def deploy(self, **changes: Any) -> None:
        """serve.run of the app with the module's config plus `changes`: in place if it is running."""
        from ray import serve

        from serve_app import build_app

        cfg = service_config(self.model, self.work, {**self.overrides, **changes})
        # A dead replica is noticed at the next health check: check often. Stop an old replica
        # soon after its last request (the wait loop is how often it looks).
        app = build_app(cfg, health_check_period_s=1, health_check_timeout_s=10,
                        graceful_shutdown_wait_loop_s=0.2, graceful_shutdown_timeout_s=15)
        serve.run(app, name=APP, route_prefix=ROUTE)


@pytest.fixture(scope="module")
def service(ray_cluster: None, tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    from ray import serve

    service = Service(serve_url() + ROUTE, tiny_model, tmp_path_factory.mktemp("faults"), {
        "dit.chunk_steps": 1, "dit.init_timeout_s": STARTUP_S, "scheduler.max_attempts": 2,
        "job_store_lock_timeout_s": STARTUP_S})
    service.deploy()
    yield service
    serve.delete(APP)


# ---------------------------------------------------------------------------------------------
# Finding and killing actors without the dashboard
# ---------------------------------------------------------------------------------------------
def _replica_names() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{APP}#"))


def _actor_info(actor_id: str) -> dict[str, Any]:
    from ray._private import state

    return state.actors(actor_id=actor_id)


def _replica() -> dict[str, Any]:
    """The actor-table entry of the app's one live replica."""
    import ray

    alive = []
    for name in _replica_names():
        info = _actor_info(ray.get_actor(name, namespace="serve")._actor_id.hex())
        if info["State"] == "ALIVE":
            alive.append(info)
    assert len(alive) == 1, f"expected one live replica of {APP}, found {len(alive)}"
    return alive[0]


def _children(replica: dict[str, Any], class_name: str | None = None) -> list[dict[str, Any]]:
    """Live actors the replica owns (the stage actors of its engine), optionally of one class."""
    from ray._private import state

    worker = replica["Address"]  # the replica's worker process, which owns what it creates
    return [a for a in state.actors().values()
            if a["OwnerAddress"] == worker and a["State"] == "ALIVE"
            and (class_name is None or a["ActorClassName"] == class_name)]


def _kill(info: dict[str, Any]) -> None:
    assert info["Pid"] > 0, info  # never os.kill(0): that is the whole process group
    os.kill(info["Pid"], signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# HTTP helpers that ride out a replica restart
# ---------------------------------------------------------------------------------------------
def _submit(client: httpx.Client, prompt: str, **params: Any) -> str:
    response = client.post("/v1/videos", json={"prompt": prompt, **SMALL, **params})
    assert response.status_code == 200, response.text
    return response.json()["id"]


MISSES: Counter[str] = Counter()  # what polls got instead of an answer (5xx codes, transport errors), per test


def _get(client: httpx.Client, video_id: str, timeout_s: float = STARTUP_S) -> dict[str, Any]:
    """The job's video object; connection errors and 5xx (no replica yet) are waited out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            response = client.get(f"/v1/videos/{video_id}")
            if response.status_code == 200:
                return response.json()
            assert response.status_code >= 500, response.text
            MISSES[str(response.status_code)] += 1
        except httpx.TransportError as exc:
            MISSES[type(exc).__name__] += 1
        assert time.monotonic() < deadline, f"{video_id}: no answer from the service in {timeout_s} s"
        time.sleep(0.2)


def _until(client: httpx.Client, video_id: str, done: Any, timeout_s: float = STARTUP_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        body = _get(client, video_id)
        if done(body):
            return body
        assert body["job_status"] not in ("succeeded", "failed", "cancelled"), f"{video_id} ended early: {body}"
        assert time.monotonic() < deadline, f"{video_id} did not get there in {timeout_s} s: {body}"
        time.sleep(0.1)


def _final(client: httpx.Client, video_id: str, timeout_s: float = STARTUP_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        body = _get(client, video_id)
        if body["job_status"] in ("succeeded", "failed", "cancelled"):
            return body
        assert time.monotonic() < deadline, f"{video_id} did not finish in {timeout_s} s: {body}"
        time.sleep(0.1)


def _denoising(client: httpx.Client, video_id: str, step: int = 2) -> dict[str, Any]:
    return _until(client, video_id, lambda b: b["job_status"] == "denoising" and b["step"] >= step)


def _assert_succeeded(client: httpx.Client, video_ids: list[str]) -> list[dict[str, Any]]:
    finals = [_final(client, v) for v in video_ids]
    for body in finals:
        assert body["job_status"] == "succeeded", body
        assert body["step"] == body["total_steps"] > 0, body
        assert client.get(f"/v1/videos/{body['id']}/content").status_code == 200
    return finals


@pytest.fixture()
def client(service: Service) -> Iterator[httpx.Client]:
    MISSES.clear()
    with httpx.Client(base_url=service.url, timeout=STARTUP_S) as c:
        yield c


# ---------------------------------------------------------------------------------------------
# Stage actors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("actor_class", ["TextEncoderActor", "DiTRankActor", "VAEDecoderActor"])
def test_killed_stage_actor_is_replaced_and_every_job_succeeds(client: httpx.Client, actor_class: str) -> None:
    """Job A is mid-denoise and B waits behind it when one actor of a stage dies: the text encoder
    (B's encode finds it dead), A's DiT rank (A's chunk fails, the group is rebuilt) or the VAE
    decoder (A's decode finds it dead). Either the periodic health check replaces the dead actor
    before a job reaches it, or the job that hits it is retried once on the replacement; both jobs
    succeed either way."""
    replica = _replica()
    (victim,) = _children(replica, actor_class)
    first = _submit(client, f"A, {actor_class}", num_inference_steps=LONG_STEPS)
    _denoising(client, first)
    _kill(victim)
    second = _submit(client, f"B, {actor_class}")
    finals = _assert_succeeded(client, [first, second])
    hit = finals[1] if actor_class == "TextEncoderActor" else finals[0]
    assert sum(f["attempts"] for f in finals) == hit["attempts"] <= 1, [f["attempts"] for f in finals]
    (replacement,) = _children(replica, actor_class)
    assert replacement["Pid"] != victim["Pid"]
    assert _replica()["ActorID"] == replica["ActorID"], "a stage actor's death must not cost the replica"


def test_job_fails_naming_the_stage_when_its_retries_run_out(client: httpx.Client) -> None:
    """The DiT rank is killed in both of the job's attempts (max_attempts 2): the job fails, its
    error names the stage and the attempts, and the service goes on with the next job."""
    replica = _replica()
    job = _submit(client, "unlucky", num_inference_steps=LONG_STEPS)
    killed_epoch = 0.0
    for attempt in (0, 1):
        # denoising on a live group (a retried job is back at step 0 until the rebuilt group restarts it)
        _until(client, job, lambda b, a=attempt, t=killed_epoch: b["attempts"] == a and b["step"] >= 2
               and b["job_status"] == "denoising" and b["stage_times"]["denoise"][0] > t)
        (rank,) = _children(replica, "DiTRankActor")
        killed_epoch = time.time()
        _kill(rank)
    final = _final(client, job)
    assert final["job_status"] == "failed" and final["status"] == "failed", final
    message = final["error"]["message"]
    assert message.startswith("denoise stage: ") and "gave up after 2 attempts" in message, message
    _assert_succeeded(client, [_submit(client, "next one")])


# ---------------------------------------------------------------------------------------------
# One engine per job store
# ---------------------------------------------------------------------------------------------
def test_an_engine_does_not_start_on_a_store_another_engine_owns(tiny_model: str, tmp_path: Path) -> None:
    """Ownership comes first in StageEngine.start: a second engine neither recovers jobs nor reserves
    a placement group while the store has an owner, and its error names the owner."""
    import asyncio

    from actors.config import ServiceConfig
    from actors.engine import StageEngine
    from actors.job_store import JobStore, StoreLeaseTimeout

    cfg = ServiceConfig.load(overrides={"model": tiny_model, "job_store": str(tmp_path / "jobs.sqlite"),
                                        "output_dir": str(tmp_path / "out"), "job_store_lock_timeout_s": 0.5})
    owner = JobStore(cfg.job_store)
    asyncio.run(owner.take_ownership(timeout_s=1))
    left = owner.create({"prompt": "left by the owner"})
    engine = StageEngine(cfg)
    with pytest.raises(StoreLeaseTimeout, match=f"owned by pid {os.getpid()} .* after waiting 0.5 s"):
        asyncio.run(engine.start())
    assert engine.text_pool.placement_group is None and not engine.ready
    assert engine.store.get(left.id).status == "queued" and engine.scheduler.pending == 0
    owner.close()
    engine.store.close()


# ---------------------------------------------------------------------------------------------
# Hot upgrade
# ---------------------------------------------------------------------------------------------
def test_hot_upgrade_while_jobs_run_loses_no_accepted_job(service: Service, client: httpx.Client) -> None:
    """Redeploying the running app with a changed config (a second VAE actor) replaces the replica:
    Serve stops the old one gracefully (engine shutdown: actors and placement groups freed, job
    store ownership released) and the new one's engine takes the store over and resumes whatever
    the old one left unfinished. Six accepted jobs of 200 steps are more than the old replica can
    finish before it is stopped."""
    old = _replica()
    jobs = [_submit(client, f"upgrade {i}", num_inference_steps=LONG_STEPS) for i in range(6)]
    _denoising(client, jobs[0])
    started = time.monotonic()
    service.deploy(**{"vae.replicas": 2})  # returns once the new replica is running
    deploy_s = time.monotonic() - started
    new = _replica()
    assert new["ActorID"] != old["ActorID"] and len(_children(new, "VAEDecoderActor")) == 2
    assert f"pid {new['Pid']} " in ((service.work / "jobs.sqlite.lock").read_text())

    finals = _assert_succeeded(client, jobs)
    old_end_ms = _actor_info(old["ActorID"])["EndTime"]
    old_end_s = old_end_ms / 1000
    resumed = [f for f in finals if f["stage_times"]["denoise"][0] > old_end_s]
    assert resumed, "every job finished on the old replica: the upgrade came too late to test a takeover"
    assert all(f["attempts"] == 0 for f in finals), "an upgrade is not a failure: no retry may be spent"
    print(f"upgrade: deploy took {deploy_s:.1f} s; new replica started {(new['StartTime'] - old_end_ms) / 1000:+.1f} s "
          f"after the old one ended; {len(resumed)} of {len(jobs)} jobs resumed by it; polls missed: {dict(MISSES)}")


# ---------------------------------------------------------------------------------------------
# The ingress replica
# ---------------------------------------------------------------------------------------------
def test_killed_ingress_replica_is_restarted_and_resumes_every_accepted_job(client: httpx.Client) -> None:
    """The replica owns the engine, and the engine the stage actors and placement groups: all die
    with it. Serve starts a new replica, whose engine finds the three accepted jobs unfinished in
    the job store and runs them again from the start."""
    from ray.util import placement_group_table

    replica = _replica()
    children = _children(replica)
    assert {c["ActorClassName"] for c in children} == {"TextEncoderActor", "DiTRankActor", "VAEDecoderActor"}
    groups = {pg_id for pg_id, pg in placement_group_table().items()
              if pg["state"] == "CREATED" and pg["name"].startswith("smartdiff-")}
    jobs = [_submit(client, "mid-denoise", num_inference_steps=LONG_STEPS), _submit(client, "queued 1"),
            _submit(client, "queued 2")]
    _denoising(client, jobs[0])
    killed_at, killed_epoch = time.monotonic(), time.time()
    _kill(replica)

    finals = _assert_succeeded(client, jobs)
    recovered_s = time.monotonic() - killed_at
    new = _replica()
    assert new["ActorID"] != replica["ActorID"]
    assert all(_actor_info(c["ActorID"])["State"] == "DEAD" for c in children), "stage actors outlived the replica"
    table = placement_group_table()
    assert all(table[pg]["state"] == "REMOVED" for pg in groups), "placement groups outlived the replica"
    for body in finals:  # all three ran (again) on the new replica
        assert body["stage_times"]["denoise"][0] > killed_epoch, body["stage_times"]
    print(f"replica restart and three jobs done in {recovered_s:.1f} s; polls missed: {dict(MISSES)}")
