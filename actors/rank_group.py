"""A rank group: N rank actors that form one torch.distributed group, driven from asyncio.

The generic half of the DiT group (dit_group.py) and of the patch-parallel VAE group
(vae_group.py). `RankGroup` reserves one STRICT_PACK placement group (one bundle per rank),
spawns the ranks, waits until they have loaded their weights, takes rank 0's address as the
rendezvous and calls `init_process_group` on every rank at once (the call blocks until all have
joined, so it is never issued rank by rank). A subclass supplies the rank actors' constructor
arguments (`_rank_args`, which runs before anything is reserved, so a bad config fails in
milliseconds) and its own job methods, which fan one call out to every rank through `_gather`.
`RankActor` is the matching base of the rank actor classes: rendezvous address, process-group
start-up with a one-all_reduce check, device binding, `ping` and `group_info`; a subclass builds
what needs the group (a DiT's `ParallelMesh`) in `on_group_ready`.

Failure is group-wide (docs/design.md, "Rank groups"): a dead rank cannot rejoin a process group, and the
survivors would block in their next collective until its timeout, so any rank death kills the
whole group, marks it broken and raises `StageActorDied(stage, ...)`; `restart()` rebuilds it.
A Python error on one rank (out of memory on one GPU) strands the others the same way when it
leaves a collective half-entered, so `_gather` gives the other ranks `fault_grace_s` to finish
the same call once one rank has failed; ranks still running then are stuck, and the group is
broken as on a death, with the failed rank, the call and its own error in the message. A call
that outlives its budget (`call_timeout_s`, or per step for the DiT) breaks the group too: a
hang without any error. A rank learns of its own failure before the others can (it may then
wait in a chunk-end check the others never reach), so a rank method may report early: written as
a generator (a Ray streaming call), it yields `Progress` items (forwarded as they come to the
caller's `on_progress`), a `Failed` item with its own error's headline as soon as it failed, and
last its result (dit_group.py). `ping` runs in its own concurrency group, so a health check is
answered while a long call runs; a rank that dies or stays silent past `health_check_timeout_s`
breaks the group. A second group, `CONTROL_GROUP`, carries out-of-band calls that steer a running
call (a DiT run's stop step, actors/step_control.py).

GPU ranks: Ray normally masks CUDA_VISIBLE_DEVICES to the rank's own GPU; that per-process masking has
been reported to keep NCCL off NVLink/P2P and to slow down or hang collectives on some systems
(docs/design.md, "Rank groups"). So ranks run with
RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1, see every GPU of the node, and bind
`cuda:<id Ray assigned>` (get_accelerator_ids) in every method, since Ray may run methods on
a thread other than the constructor's and the current CUDA device is per thread.
TORCH_NCCL_ASYNC_ERROR_HANDLING=1 makes a stuck NCCL collective abort after the group timeout.
On CPU nothing is set and the group uses gloo.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import ray
from ray.actor import ActorHandle
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.errors import StageActorDied, StageStartError, error_headline, first_line, is_actor_death
from actors.pool import HEALTH_GROUP, kill_quietly, reserve_placement_group
from actors.resources import bundle_resources
from parallel.launch import free_port

logger = logging.getLogger(__name__)

CONTROL_GROUP = "control"
"""The rank actors' concurrency group (one thread) for calls that steer a running call."""


@dataclass(frozen=True)
class Progress:
    """An item a rank's streaming call yields before its result; `RankGroup._gather` forwards the payload."""

    payload: Any


@dataclass(frozen=True)
class Failed:
    """What a rank's streaming call yields as soon as its own work failed (it raises later, after its group check)."""

    headline: str


GPU_RANK_ENV = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


def rank_cuda_device() -> str:
    """`cuda:<index>` of the GPU Ray assigned to this process, whether or not Ray masked CUDA_VISIBLE_DEVICES."""
    ids = ray.get_runtime_context().get_accelerator_ids().get("GPU") or []
    if not ids:
        return "cuda:0"
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if ids[0] in visible:
        return f"cuda:{visible.index(ids[0])}"
    return f"cuda:{int(ids[0])}"


class RankActor:
    """Base of a rank actor class: its place in the group, its device and its process-group membership.

    A subclass calls `_init_rank` first in its constructor (before loading weights on `self.device`),
    calls `_bind_device` at the start of every method that touches CUDA, and overrides
    `on_group_ready` to build what needs the process group.
    """

    rank: int
    world_size: int
    device: str
    _group: dict[str, Any] | None

    def _init_rank(self, rank: int, world_size: int, device: str) -> None:
        """device: "cpu" or "cuda" (bound to the GPU Ray assigned to this rank)."""
        self.rank = rank
        self.world_size = world_size
        self.device = rank_cuda_device() if device == "cuda" else device
        self._group = None
        self._bind_device()

    def _bind_device(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.set_device(self.device)

    def _comm_device(self, backend: str) -> str:
        """Where collective buffers live: the rank's GPU under NCCL, the CPU under gloo."""
        return self.device if backend == "nccl" else "cpu"

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port: rank 0's answer is the group's rendezvous address."""
        return ray.util.get_node_ip_address(), free_port(host="")

    def init_process_group(self, url: str, backend: str, timeout_s: float) -> None:
        """Join the group (blocks until every rank has joined), check it with one all_reduce, then
        `on_group_ready()`.

        Each rank contributes rank+1, so every rank must see world*(world+1)/2.
        """
        import torch
        import torch.distributed as dist

        if dist.is_initialized():
            raise RuntimeError(f"rank {self.rank} already belongs to a process group; start a new group instead")
        self._bind_device()
        dist.init_process_group(backend, init_method=url, rank=self.rank, world_size=self.world_size,
                                timeout=timedelta(seconds=timeout_s))
        value = torch.tensor([self.rank + 1], dtype=torch.int64, device=self._comm_device(backend))
        dist.all_reduce(value)
        expected = self.world_size * (self.world_size + 1) // 2
        if int(value.item()) != expected:
            raise RuntimeError(f"process-group check failed on rank {self.rank}: all_reduce of rank+1 gave "
                               f"{int(value.item())}, expected {expected}")
        extra = self.on_group_ready()
        self._group = {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "backend": backend,
                       "all_reduce_sum": int(value.item()), **extra}
        logger.info("rank %d joined %s group of %d at %s", self.rank, backend, self.world_size, url)

    def on_group_ready(self) -> dict[str, Any]:
        """Hook run once the process group is up: build what needs it; returns extra `group_info` fields."""
        return {}

    def group_info(self) -> dict[str, Any] | None:
        """{"rank", "world_size", "backend", "all_reduce_sum", + on_group_ready's} after the init check; else None."""
        return None if self._group is None else dict(self._group)

    def ping(self) -> int:
        """This rank's number; answers once the weights are loaded (the constructor runs first)."""
        return self.rank


class RankGroup:
    """`world_size` rank actors of one class in one STRICT_PACK placement group, driven from asyncio.

    Subclasses implement `_rank_args` and their job methods (which start with `_check_usable()` and
    await `_gather(...)` over one call per rank).
    """

    def __init__(self, *, stage: str, kind: str, index: int, actor_cls: type[RankActor], world_size: int,
                 num_cpus: float, num_gpus: float, device: str, init_timeout_s: float, section: str,
                 fault_grace_s: float, health_timeout_s: float) -> None:
        """stage: the stage named in StageActorDied / StageStartError ("denoise", "decode"); kind and index name
        the group in logs and errors ("DiT group 0"); device: "cpu" or "cuda" (NCCL then, else gloo);
        section: the config section that sets the resources and the timeouts ("dit", "vae"), named in errors;
        fault_grace_s: how long the other ranks may still finish a call after one rank's call raised;
        health_timeout_s: how long `ping` waits for every rank.
        """
        self.stage = stage
        self.index = index
        self.label = f"{kind} group {index}"
        self.device = device
        self.backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda" and num_gpus == 0 and world_size > 1:
            raise ValueError(f"device is 'cuda' but {section}.num_gpus is 0, so all {world_size} ranks would share "
                             f"one GPU under NCCL; set {section}.num_gpus to 1 (or device to 'cpu')")
        self._world_size = world_size
        self._num_cpus = num_cpus
        self._num_gpus = num_gpus
        self._init_timeout_s = init_timeout_s
        self._section = section
        self._timeout_key = f"{section}.init_timeout_s"
        self._fault_grace_s = fault_grace_s
        self._health_timeout_s = health_timeout_s
        self._bundle = bundle_resources(num_cpus, num_gpus, stage)
        self._actor_cls = actor_cls
        # ping gets its own thread (concurrency group) so a health check is answered during a long call, and
        # so do the control calls that steer a running call.
        self._remote_cls = ray.remote(concurrency_groups={HEALTH_GROUP: 1, CONTROL_GROUP: 1})(actor_cls)
        self._pg: PlacementGroup | None = None
        self._ranks: list[ActorHandle] = []
        self._ready = False  # every rank joined the group: set at the end of start(), cleared by teardown
        self._broken: str | None = None

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def broken(self) -> bool:
        """True after a rank died, stranded the others or hung: every call raises StageActorDied until restart()."""
        return self._broken is not None

    @property
    def broken_reason(self) -> str | None:
        """Why the group is broken (None when it is not)."""
        return self._broken

    @property
    def running(self) -> bool:
        """Started (every rank in the process group), not broken and not shut down."""
        return self._ready and bool(self._ranks) and self._broken is None

    @property
    def ranks(self) -> list[ActorHandle]:
        """The rank actors, rank 0 first (for tests and diagnostics)."""
        return list(self._ranks)

    @property
    def placement_group(self) -> PlacementGroup | None:
        return self._pg

    # ---- subclass hooks -----------------------------------------------------------------------

    async def _rank_args(self) -> tuple[Any, ...]:
        """The rank actors' constructor arguments after (rank, world_size); runs before anything is reserved."""
        raise NotImplementedError

    def describe(self) -> str:
        """Extra words for the start-up log line (e.g. the DiT layout)."""
        return ""

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Reserve the placement group, spawn the ranks, rendezvous at rank 0 and init the group on all ranks."""
        if self._ranks or self._pg is not None:
            raise RuntimeError(f"{self.label} is already running; use restart()")
        timeout = self._init_timeout_s
        began = time.perf_counter()
        args = await self._rank_args()
        self._pg = await reserve_placement_group(f"{self.stage}{self.index}",
                                                 [dict(self._bundle)] * self.world_size, "STRICT_PACK", timeout)
        try:
            self._ranks = [self._spawn(rank, args) for rank in range(self.world_size)]
            await self._wait_loaded(timeout)
            host, port = await self._ranks[0].address.remote()
            url = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
            # All ranks at once: init_process_group blocks until every rank has joined.
            refs = [r.init_process_group.remote(url, self.backend, timeout) for r in self._ranks]
            await asyncio.wait_for(self._gather(refs, "init_process_group"), timeout + 10)
        except asyncio.TimeoutError:
            await self._teardown()
            raise StageStartError(self.stage, f"{self.label}: process group did not form within {timeout:g} s "
                                              f"({self._timeout_key})") from None
        except StageActorDied as exc:
            await self._teardown()
            raise StageStartError(self.stage, f"{self.label}: {exc.detail}\n{exc.__cause__}") from exc
        except BaseException:
            await self._teardown()
            raise
        self._broken = None
        self._ready = True
        extra = self.describe()
        logger.info("%s started: %d ranks%s (%s, %s, bundle %s) in %.1f s", self.label, self.world_size,
                    f", {extra}" if extra else "", self.device, self.backend, self._bundle,
                    time.perf_counter() - began)

    async def restart(self) -> None:
        """Kill all ranks, release the placement group and start a fresh group (state on it is lost)."""
        logger.warning("restarting %s%s", self.label, f" (broken: {self._broken})" if self._broken else "")
        await self._teardown()
        await self.start()

    async def shutdown(self) -> None:
        await self._teardown()

    def _spawn(self, rank: int, args: tuple[Any, ...]) -> ActorHandle:
        assert self._pg is not None
        options: dict[str, Any] = dict(
            num_cpus=self._num_cpus,
            num_gpus=self._num_gpus,
            max_restarts=0,  # a restarted rank cannot rejoin the process group: the group is rebuilt instead
            max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=rank),
        )
        if self.device == "cuda":
            options["runtime_env"] = {"env_vars": dict(GPU_RANK_ENV)}
        return self._remote_cls.options(**options).remote(rank, self.world_size, *args)

    async def _wait_loaded(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._gather([self._ping_ref(r) for r in self._ranks], "loading"), timeout)
        except asyncio.TimeoutError:
            raise StageStartError(self.stage, f"{self.label}: ranks did not load within {timeout:g} s "
                                              f"({self._timeout_key})") from None

    async def _teardown(self) -> None:
        self._ready = False
        for rank in self._ranks:
            kill_quietly(rank)
        self._ranks = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
        self._broken = None

    # ---- health -------------------------------------------------------------------------------

    async def ping(self, timeout_s: float | None = None) -> bool:
        """True when every rank answers within timeout_s (None: health_check_timeout_s); runs beside a long call.

        A dead rank, or one that stays silent (hung), breaks the group: False. A group that is not
        running (starting, broken, stopped) is not pinged: False.
        """
        if not self.running:
            return False
        timeout_s = self._health_timeout_s if timeout_s is None else timeout_s
        refs = [self._ping_ref(r) for r in self._ranks]
        try:
            answers = await self._gather(refs, "ping", budget_s=timeout_s,
                                         budget_key=f"{self._section}.health_check_timeout_s")
        except StageActorDied:
            return False
        return list(answers) == list(range(self.world_size))

    # ---- fan-out ------------------------------------------------------------------------------

    def _ping_ref(self, rank: ActorHandle) -> ray.ObjectRef:
        return rank.ping.options(concurrency_group=HEALTH_GROUP).remote()

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise StageActorDied(self.stage, f"{self.label} is broken ({self._broken}); restart() it")
        if not self._ranks:
            raise RuntimeError(f"{self.label} is not running; call start() first")

    async def _gather(self, calls: list[ray.ObjectRef | ray.ObjectRefGenerator], what: str, first_rank: int = 0,
                      budget_s: float | None = None, budget_key: str = "",
                      on_progress: Callable[[int, Any], None] | None = None) -> list[Any]:
        """Await one call per rank (calls[i] went to rank first_rank + i) and return their results.

        A call is an ObjectRef, or the ObjectRefGenerator of a rank method that yields `Progress` items
        (each payload goes to on_progress(rank, payload) as it arrives), a `Failed` item as soon as its
        own work failed, and last its result. The group is broken and StageActorDied raised
        (i) at once when a rank dies, (ii) when one rank has failed and others have not finished
        fault_grace_s later (they are stuck in a collective the failed rank left), (iii) when the
        call is not done after budget_s (budget_key names its config key). If every rank finishes,
        the error of the rank that failed first (its own exception, type kept) is raised, if any.
        """
        loop = asyncio.get_running_loop()
        failures: dict[int, str] = {}  # rank -> headline of its own error, in the order they became known
        changed = asyncio.Event()

        def reporter(rank: int) -> Callable[[str], None]:
            def report(headline: str) -> None:
                failures.setdefault(rank, headline)
                changed.set()
            return report

        def forwarder(rank: int) -> Callable[[Any], None] | None:
            return None if on_progress is None else (lambda payload: on_progress(rank, payload))

        futures = [asyncio.ensure_future(_rank_outcome(call, reporter(first_rank + i), forwarder(first_rank + i)))
                   for i, call in enumerate(calls)]
        for future in futures:  # errors we stop waiting for must not be reported as "never retrieved"
            future.add_done_callback(_consume)
            future.add_done_callback(lambda _: changed.set())
        deadline = None if budget_s is None else loop.time() + budget_s
        grace_end: float | None = None
        while True:
            for i, future in enumerate(futures):
                exc = future.exception() if future.done() else None
                if is_actor_death(exc):
                    detail = (f"rank actor {first_rank + i} of {self.label} died during {what}: {first_line(exc)}"
                              if self._broken is None else  # we killed it: say why
                              f"{self.label} was broken during {what}: {self._broken}")
                    self._break(detail, futures)
                    raise StageActorDied(self.stage, detail) from exc
            stuck = [first_rank + i for i, future in enumerate(futures) if not future.done()]
            if not stuck:
                break
            now = loop.time()
            if failures and grace_end is None:
                grace_end = now + self._fault_grace_s
            if grace_end is not None and now >= grace_end:
                rank, headline = next(iter(failures.items()))
                others = [r for r in stuck if r not in failures] or stuck
                detail = (f"rank {rank} of {self.label} failed during {what} ({headline}) and rank(s) "
                          f"{', '.join(map(str, others))} had not finished {self._fault_grace_s:g} s later "
                          f"({self._section}.fault_grace_s), stuck in a collective it left")
                self._break(detail, futures)
                raise StageActorDied(self.stage, detail)
            if deadline is not None and now >= deadline:
                detail = (f"rank(s) {', '.join(map(str, stuck))} of {self.label} did not finish {what} within "
                          f"{budget_s:g} s ({budget_key}); the group is treated as hung")
                self._break(detail, futures)
                raise StageActorDied(self.stage, detail)
            limits = [t for t in (deadline, grace_end) if t is not None]
            changed.clear()
            try:
                async with asyncio.timeout(min(limits) - now if limits else None):
                    await changed.wait()
            except TimeoutError:
                pass
        if failures:
            first = futures[next(iter(failures)) - first_rank]
            errors = [first.exception()] + [f.exception() for f in futures]
            raise next(e for e in errors if e is not None)
        return [future.result() for future in futures]

    def _break(self, reason: str, waiting: Sequence[asyncio.Future[Any]] = ()) -> None:
        """Mark the group broken and kill every rank; stop `waiting` for the calls that will now fail."""
        if self._broken is None:  # the first reason is the cause; later ones are its echoes
            logger.error("%s broken: %s; killing all %d ranks", self.label, reason, len(self._ranks))
            self._broken = reason
        for rank in self._ranks:
            kill_quietly(rank)
        for future in waiting:
            future.cancel()


async def _rank_outcome(call: ray.ObjectRef | ray.ObjectRefGenerator, report: Callable[[str], None],
                        forward: Callable[[Any], None] | None = None) -> Any:
    """One rank's result; its error's headline goes to `report` as soon as it is known (early for a stream),
    a stream's `Progress` payloads to `forward`."""
    try:
        if isinstance(call, ray.ObjectRefGenerator):
            result: Any = None
            async for ref in call:
                item = await ref
                if isinstance(item, Failed):
                    report(item.headline)
                elif isinstance(item, Progress):
                    if forward is not None:
                        forward(item.payload)
                else:
                    result = item
            return result
        return await call
    except Exception as exc:
        if not is_actor_death(exc):
            report(error_headline(exc))
        raise


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
