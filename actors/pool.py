"""A pool of identical stage actors in one placement group, shared by the engine's asyncio loop.

One bundle per actor (PACK), so the pool reserves its resources up front and a replacement
actor lands in the bundle its predecessor left. Calls wait for an idle actor in arrival order
(FIFO), so one slow caller cannot be overtaken forever. When an actor dies, the call raises
`StageActorDied` at once (the engine decides whether to retry) while a replacement loads in
the background and takes the slot when it answers `ping`. Every other exception from the
stage is passed through untouched.

A call that outlives `cfg.call_timeout_s` counts as a hang: the actor is killed and replaced
like a dead one. `check_health()` (run periodically by the engine) pings every actor in its own
concurrency group (HEALTH_GROUP), so a busy actor answers too; a dead or silent actor is killed,
and if it was idle it is replaced at once, without waiting for a job to find it. `health()`
says which slots are not serving ("replacing", or "down" when a replacement failed to load).

`GroupPool` offers the same interface over replicas that are rank groups (a patch-parallel VAE
decode replica is a group of ranks); both draw replicas through `IdleSlots`, the FIFO logic.
`reserve_placement_group` is shared with the rank groups (rank_group.py).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from typing import Any, Iterable, Protocol, Sequence

import ray
from ray.actor import ActorHandle
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.config import PoolConfig
from actors.errors import StageActorDied, StageStartError, first_line, is_actor_death
from actors.resources import bundle_resources, format_resources

logger = logging.getLogger(__name__)

HEALTH_GROUP = "health"
"""Concurrency group of `ping` on every stage and rank actor, so a health check is answered while a long call runs."""


def describe_shortfall(bundles: list[dict[str, float]], strategy: str) -> str:
    """What the cluster lacks for `bundles`, for the error raised when a placement group stays pending."""
    need: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            need[key] = need.get(key, 0.0) + value
    total = ray.cluster_resources()
    free = ray.available_resources()
    parts = [f"needs {len(bundles)} x {bundles[0]} = {format_resources(need)} ({strategy})",
             f"cluster has {format_resources({k: total.get(k, 0.0) for k in need})}, "
             f"free {format_resources({k: free.get(k, 0.0) for k in need})}"]
    missing = {k: v - free.get(k, 0.0) for k, v in need.items() if v > free.get(k, 0.0) + 1e-9}
    if missing:
        parts.append(f"missing {format_resources(missing)}")
    if strategy == "STRICT_PACK":
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if not any(all(node.get(k, 0.0) >= v for k, v in need.items()) for node in nodes):
            best = max(nodes, key=lambda n: tuple(n.get(k, 0.0) for k in need), default={})
            parts.append(f"STRICT_PACK needs it all on one node and the largest node has "
                         f"{format_resources({k: best.get(k, 0.0) for k in need})}")
    return "; ".join(parts) + ". Lower replicas/world_size/num_cpus/num_gpus in the service config, or add nodes."


async def reserve_placement_group(stage: str, bundles: list[dict[str, float]], strategy: str,
                                  timeout_s: float) -> PlacementGroup:
    """Create a placement group and wait until it is placed; on timeout remove it and say what is missing."""
    pg = placement_group(bundles, strategy=strategy, name=f"smartdiff-{stage}-{uuid.uuid4().hex[:8]}")
    try:
        await asyncio.wait_for(_await_ref(pg.ready()), timeout_s)
    except asyncio.TimeoutError:
        detail = describe_shortfall(bundles, strategy)
        remove_placement_group(pg)
        raise StageStartError(stage, f"placement group not ready after {timeout_s:g} s: {detail}") from None
    except BaseException:
        remove_placement_group(pg)
        raise
    return pg


async def _await_ref(ref: ray.ObjectRef) -> Any:
    return await ref


def kill_quietly(actor: ActorHandle | None) -> None:
    """ray.kill that tolerates actors that are already gone."""
    if actor is None:
        return
    try:
        ray.kill(actor, no_restart=True)
    except Exception as exc:  # noqa: BLE001  # already dead or never created: nothing left to stop
        logger.debug("kill of %s ignored: %s", actor, exc)


class IdleSlots:
    """The idle replicas of a pool, handed out first come, first served.

    `acquire` returns a free slot index at once when nobody is waiting, or queues the caller
    (FIFO, so one slow caller cannot be overtaken forever); `release` hands a slot to the oldest
    waiter or marks it idle. A slot that is being rebuilt is simply not released until it is back.
    Shared by StagePool (one actor per slot) and GroupPool (one rank group per slot).
    """

    def __init__(self, name: str) -> None:
        """name: the pool, for the error waiting callers get at close()."""
        self.name = name
        self._idle: deque[int] = deque()
        self._waiters: deque[asyncio.Future[int]] = deque()
        self.closed = False

    def __len__(self) -> int:
        """Slots free right now."""
        return len(self._idle)

    def take(self, index: int) -> bool:
        """Take slot `index` out of the idle set if it is idle (the health check repairing it); else False."""
        if index in self._idle:
            self._idle.remove(index)
            return True
        return False

    async def acquire(self) -> int:
        """A free slot's index, waiting behind earlier callers when none is free."""
        if self._idle and not self._waiters:
            return self._idle.popleft()
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # a slot was handed over as we were cancelled
                self.release(waiter.result())
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self, index: int) -> None:
        """Give slot `index` to the oldest waiter, or mark it idle; a no-op once closed."""
        if self.closed:
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(index)
                return
        self._idle.append(index)

    def close(self) -> None:
        """Forget every slot; waiting callers fail with RuntimeError and later releases are ignored."""
        self.closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(RuntimeError(f"{self.name} pool shut down"))
        self._idle.clear()


class StagePool:
    """N identical actors of one stage (cfg.replicas), each in its own bundle of one PACK placement group."""

    def __init__(self, name: str, actor_cls: type, actor_args: tuple = (), actor_kwargs: dict[str, Any] | None = None,
                 cfg: PoolConfig = PoolConfig(), section: str = "") -> None:
        """name: the stage ("text_encode", "decode"), used in errors and logs; actor_cls: a plain class with ping().

        cfg: replicas and resources, plus the start-up, call and health-check timeouts; section: where cfg
        sits in the service config ("text_encoder", "vae"), so errors name the key to raise.
        """
        self.name = name
        self._prefix = f"{section}." if section else ""
        self._actor_cls = actor_cls
        # ping gets its own thread (concurrency group) so a health check is answered during a long call.
        self._remote_cls = ray.remote(concurrency_groups={HEALTH_GROUP: 1})(actor_cls)
        self._args = tuple(actor_args)
        self._kwargs = dict(actor_kwargs or {})
        self._cfg = cfg
        self._bundle = bundle_resources(cfg.num_cpus, cfg.num_gpus, name)
        self._init_timeout_s = cfg.init_timeout_s
        self._pg: PlacementGroup | None = None
        self._actors: list[ActorHandle | None] = []
        self._slots = IdleSlots(name)
        self._replacing: set[asyncio.Task[None]] = set()
        self._trouble: dict[int, str] = {}  # slot -> "replacing" / "down"; healthy slots are absent

    # ---- public API -------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Actor slots in the pool (cfg.replicas)."""
        return self._cfg.replicas

    @property
    def idle(self) -> int:
        """Slots free for a call right now (a slot whose replacement is loading is not idle)."""
        return len(self._slots)

    @property
    def placement_group(self) -> PlacementGroup | None:
        return self._pg

    @property
    def actors(self) -> list[ActorHandle | None]:
        """The current actor of each slot (None while a replacement could not be started); for tests and metrics."""
        return list(self._actors)

    def health(self) -> str | dict[str, str]:
        """"ok" when every slot has a loaded actor, else {"actor <i>": "replacing" | "down"} for the others."""
        if self._pg is None:
            return "down"
        return {f"actor {i}": state for i, state in sorted(self._trouble.items())} or "ok"
    async def start(self) -> None:
        """Reserve the placement group, spawn the actors and wait until every one has loaded its weights."""
        if self._pg is not None or self._slots.closed:
            raise RuntimeError(f"{self.name} pool was already started (or shut down); build a new StagePool")
        self._pg = await reserve_placement_group(self.name, [dict(self._bundle)] * self.size, "PACK",
                                                 self._init_timeout_s)
        try:
            self._actors = [self._spawn(i) for i in range(self.size)]
            await self._wait_ready(list(enumerate(self._actors)))
        except BaseException:
            await self.shutdown()
            raise
        for index in range(self.size):
            self._slots.release(index)
        logger.info("%s pool started: %d actors of %s, bundle %s", self.name, self.size, self._actor_cls.__name__,
                    self._bundle)

    async def call(self, method: str, *args: Any, num_returns: int = 1, **kwargs: Any) -> Any:
        """Run `method` on the next idle actor (FIFO among waiters).

        num_returns > 1: the method returns that many values as separate objects; the first is awaited
        and returned with references to the others, which stay in the object store (for the next stage's
        actors to read; this process never fetches them).
        Raises StageActorDied if the actor died (its replacement is spawned before this raises and
        takes the slot once loaded);
        any other exception from the actor propagates unchanged.
        """
        if self._pg is None or self._slots.closed:
            raise RuntimeError(f"{self.name} pool is not running; call start() first")
        index = await self._slots.acquire()
        handed_over = False
        try:
            actor = self._actors[index]
            if actor is None:  # an earlier replacement failed to load: try once more now
                actor = await self._respawn(index)
            refs = getattr(actor, method).options(num_returns=num_returns).remote(*args, **kwargs)
            first, rest = (refs, []) if num_returns == 1 else (refs[0], refs[1:])
            result = await asyncio.wait_for(first, self._cfg.call_timeout_s)
            if rest:
                result = [result, *rest]
        except BaseException as exc:
            if isinstance(exc, asyncio.TimeoutError):
                detail = (f"actor {index} ({self._actor_cls.__name__}) did not finish {method}() within "
                          f"{self._cfg.call_timeout_s:g} s ({self._prefix}call_timeout_s) and is treated as hung")
            elif is_actor_death(exc):
                detail = f"actor {index} ({self._actor_cls.__name__}) died during {method}(): {first_line(exc)}"
            else:
                raise
            logger.warning("%s pool: %s; replacing it", self.name, detail)
            self._replace_in_background(index)
            handed_over = True
            raise StageActorDied(self.name, detail) from exc
        finally:
            if not handed_over:
                self._slots.release(index)
        return result

    async def check_health(self) -> None:
        """Ping every actor in its health thread; kill dead or silent ones and replace the idle ones now.

        A busy actor that is killed here fails its call, which replaces it (`call`); a slot whose
        replacement failed to load is retried here when idle, so the pool heals without traffic.
        """
        if self._pg is None or self._slots.closed:
            return
        checked = [(i, a) for i, a in enumerate(self._actors) if i not in self._trouble or a is None]
        verdicts = await asyncio.gather(*(self._probe(a) for _, a in checked))
        for (index, actor), verdict in zip(checked, verdicts):
            if verdict is None:
                continue
            logger.warning("%s pool: health check: actor %d %s", self.name, index, verdict)
            kill_quietly(actor)
            if self._slots.take(index):
                self._replace_in_background(index)

    async def _probe(self, actor: ActorHandle | None) -> str | None:
        """None if the actor answers ping in time, else why not."""
        if actor is None:
            return "is missing (its replacement failed to load)"
        timeout = self._cfg.health_check_timeout_s
        try:
            await asyncio.wait_for(actor.ping.options(concurrency_group=HEALTH_GROUP).remote(), timeout)
        except asyncio.TimeoutError:
            return f"did not answer ping within {timeout:g} s ({self._prefix}health_check_timeout_s)"
        except Exception as exc:  # noqa: BLE001  # anything but an answer means the actor cannot serve
            return f"is dead: {first_line(exc)}" if is_actor_death(exc) else f"ping raised: {first_line(exc)}"
        return None

    async def shutdown(self) -> None:
        """Kill every actor and release the placement group; waiting calls fail with RuntimeError."""
        self._slots.close()
        for task in list(self._replacing):
            task.cancel()
        if self._replacing:
            await asyncio.gather(*self._replacing, return_exceptions=True)
        for actor in self._actors:
            kill_quietly(actor)
        self._actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

    # ---- actors -------------------------------------------------------------------------------

    def _spawn(self, index: int) -> ActorHandle:
        assert self._pg is not None
        return self._remote_cls.options(
            num_cpus=self._cfg.num_cpus,
            num_gpus=self._cfg.num_gpus,
            max_restarts=0,  # a replacement is a fresh actor we start ourselves, in the same bundle
            max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=index),
        ).remote(*self._args, **self._kwargs)

    async def _wait_ready(self, actors: Iterable[tuple[int, ActorHandle | None]]) -> None:
        """Wait for ping() of each actor (its constructor loads the weights first), within init_timeout_s."""
        pending = [(i, a) for i, a in actors if a is not None]

        async def one(index: int, actor: ActorHandle) -> None:
            try:
                await actor.ping.remote()
            except Exception as exc:
                if is_actor_death(exc):
                    raise StageStartError(self.name, f"actor {index} ({self._actor_cls.__name__}) died while "
                                                     f"loading: {exc}") from exc
                raise

        try:
            await asyncio.wait_for(asyncio.gather(*(one(i, a) for i, a in pending)), self._init_timeout_s)
        except asyncio.TimeoutError:
            raise StageStartError(self.name, f"actors {[i for i, _ in pending]} did not answer ping within "
                                             f"{self._init_timeout_s:g} s (still loading weights? raise "
                                             f"{self._prefix}init_timeout_s)") from None

    async def _respawn(self, index: int) -> ActorHandle:
        """Start a fresh actor in slot `index` and wait until it is ready (StageActorDied if it cannot)."""
        kill_quietly(self._actors[index])
        self._actors[index] = actor = self._spawn(index)
        self._trouble[index] = "replacing"
        try:
            await self._wait_ready([(index, actor)])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            kill_quietly(actor)
            self._actors[index] = None
            self._trouble[index] = "down"
            raise StageActorDied(self.name, f"replacement for actor {index} failed to start: {exc}") from exc
        self._trouble.pop(index, None)
        return actor

    def _replace_in_background(self, index: int) -> None:
        """Kill the dead actor and spawn its replacement now; the slot returns to the pool once it answers ping."""
        kill_quietly(self._actors[index])
        if self._slots.closed:  # the death was the shutdown itself
            return
        try:
            self._actors[index] = self._spawn(index)
        except Exception as exc:  # noqa: BLE001  # e.g. the placement group is gone; the next draw retries
            logger.error("%s pool: could not spawn a replacement for actor %d: %s", self.name, index, exc)
            self._actors[index] = None
            self._trouble[index] = "down"
            self._slots.release(index)
            return
        self._trouble[index] = "replacing"
        task = asyncio.get_running_loop().create_task(self._finish_replacement(index))
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def _finish_replacement(self, index: int) -> None:
        try:
            await self._wait_ready([(index, self._actors[index])])
            self._trouble.pop(index, None)
            logger.info("%s pool: actor %d replaced", self.name, index)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001  # logged; the slot stays empty and the next draw retries
            logger.error("%s pool: replacement for actor %d failed to start: %s", self.name, index, exc)
            kill_quietly(self._actors[index])
            self._actors[index] = None
            self._trouble[index] = "down"
        finally:
            self._slots.release(index)


class ReplicaGroup(Protocol):
    """What GroupPool needs of one replica (actors.rank_group.RankGroup and its subclasses provide it)."""

    label: str

    @property
    def running(self) -> bool: ...
    @property
    def broken(self) -> bool: ...
    async def start(self) -> None: ...
    async def restart(self) -> None: ...
    async def shutdown(self) -> None: ...
    async def ping(self) -> bool: ...


class GroupPool:
    """A stage pool whose replicas are rank groups (e.g. patch-parallel VAE groups), with StagePool's interface.

    The engine's worker cannot tell it from a StagePool: `call(method, ...)` awaits `group.<method>(...)`
    on the next idle group (FIFO among waiters). When a rank dies the group raises StageActorDied,
    which is passed on at once while the whole group restarts in the background (a rank cannot rejoin
    a process group) and its slot returns once the group is up again; if that restart fails, the next
    call drawing the slot tries once more and raises StageActorDied if it fails too. Every other
    exception from the group is passed through untouched. `check_health()` pings every group (a
    dead or silent rank breaks it) and rebuilds the idle broken or stopped ones at once.
    """

    def __init__(self, name: str, groups: Sequence[ReplicaGroup]) -> None:
        """name: the stage ("decode"), used in errors and logs; groups: one unstarted group per replica."""
        if not groups:
            raise ValueError(f"{name} pool needs at least one group")
        self.name = name
        self._groups = list(groups)
        self._slots = IdleSlots(name)
        self._restarting: set[asyncio.Task[None]] = set()
        self._rebuilding: set[int] = set()  # slots whose group is being rebuilt in the background
        self._started = False

    @property
    def size(self) -> int:
        """Replica slots in the pool (one group each)."""
        return len(self._groups)

    @property
    def idle(self) -> int:
        """Slots free for a call right now (a group being rebuilt is not idle)."""
        return len(self._slots)

    @property
    def groups(self) -> list[ReplicaGroup]:
        """The group of each slot (for tests and diagnostics)."""
        return list(self._groups)

    def health(self) -> str | dict[str, str]:
        """"ok" when every group is running, else {"<group label>": "rebuilding" | "broken" | "down"} for the others."""
        if not self._started or self._slots.closed:
            return "down"
        trouble = {}
        for index, group in enumerate(self._groups):
            if index in self._rebuilding:
                trouble[group.label] = "rebuilding"
            elif group.broken:
                trouble[group.label] = "broken"
            elif not group.running:
                trouble[group.label] = "down"
        return trouble or "ok"

    async def check_health(self) -> None:
        """Ping every group that is not being rebuilt (a dead or silent rank breaks it); rebuild the idle
        broken or stopped groups now. A busy broken group fails its call, which rebuilds it (`call`)."""
        if not self._started or self._slots.closed:
            return
        checked = [i for i in range(self.size) if i not in self._rebuilding]
        await asyncio.gather(*(self._groups[i].ping() for i in checked if self._groups[i].running))
        for index in checked:
            group = self._groups[index]
            if not group.running and self._slots.take(index):
                logger.warning("%s pool: health check found %s %s; rebuilding it", self.name, group.label,
                               "broken" if group.broken else "stopped")
                self._rebuild_in_background(index)

    async def start(self) -> None:
        """Start every group concurrently; if one fails, stop them all and raise its error."""
        if self._started or self._slots.closed:
            raise RuntimeError(f"{self.name} pool was already started (or shut down); build a new GroupPool")
        self._started = True
        # return_exceptions: wait for every start to end before tearing down, so none is left half-built.
        outcomes = await asyncio.gather(*(g.start() for g in self._groups), return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            await self.shutdown()
            raise failed[0]
        for index in range(self.size):
            self._slots.release(index)
        logger.info("%s pool started: %d groups (%s)", self.name, self.size,
                    ", ".join(g.label for g in self._groups))

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Await `method` of the next idle group (FIFO among waiters).

        Raises StageActorDied if a rank died (the group is rebuilt in the background before the slot
        is used again) or if a group whose earlier rebuild failed cannot be rebuilt now; any other
        exception from the group propagates unchanged.
        """
        if not self._started or self._slots.closed:
            raise RuntimeError(f"{self.name} pool is not running; call start() first")
        index = await self._slots.acquire()
        group = self._groups[index]
        try:
            if not group.running:  # an earlier background rebuild failed: try once more now
                await self._restart_now(group)
            result = await getattr(group, method)(*args, **kwargs)
        except StageActorDied as exc:
            if not group.broken or self._slots.closed:  # its rebuild just failed, or the death was the shutdown
                self._slots.release(index)
                raise
            logger.warning("%s pool: %s; rebuilding %s", self.name, exc.detail, group.label)
            self._rebuild_in_background(index)
            raise
        except BaseException:
            self._slots.release(index)
            raise
        self._slots.release(index)
        return result

    async def shutdown(self) -> None:
        """Stop every group; waiting calls fail with RuntimeError."""
        self._slots.close()
        for task in list(self._restarting):
            task.cancel()
        if self._restarting:
            await asyncio.gather(*self._restarting, return_exceptions=True)
        await asyncio.gather(*(g.shutdown() for g in self._groups), return_exceptions=True)

    async def _restart_now(self, group: ReplicaGroup) -> None:
        try:
            await group.restart()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise StageActorDied(self.name, f"{group.label} could not be rebuilt: {first_line(exc)}") from exc

    def _rebuild_in_background(self, index: int) -> None:
        """Restart slot `index`'s group in a task; the slot (held by the caller) is released when it ends."""
        self._rebuilding.add(index)
        task = asyncio.get_running_loop().create_task(self._restart_in_background(index))
        self._restarting.add(task)
        task.add_done_callback(self._restarting.discard)

    async def _restart_in_background(self, index: int) -> None:
        group = self._groups[index]
        try:
            await group.restart()
            logger.info("%s pool: %s rebuilt", self.name, group.label)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001  # logged; the next call drawing this slot tries again
            logger.error("%s pool: rebuilding %s failed: %s", self.name, group.label, exc)
        finally:
            self._rebuilding.discard(index)
            self._slots.release(index)
