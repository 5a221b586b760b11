"""The DiT rank group: `world_size` rank actors forming one torch.distributed group (ray.md §2).

Each rank loads the denoiser in its own process and keeps the per-request `DenoiseJob`s
(latents + sampler history) in memory, so between chunks only ids and step counts travel;
embeddings go in once, final latents come out once. The engine drives a job chunk by chunk
through `DiTGroup.run_steps`, which issues the same call to every rank at once.

Each request is spread over the ranks by the group's `ParallelLayout` (cfg x ring x ulysses,
parallel/): the layout is resolved and validated here before any actor starts (a bad layout fails
in milliseconds with the reason, not after minutes of weight loading), and every rank builds its
`ParallelMesh` once the process group exists. Every rank ends each step with the same full latents
(parallel.dit), so any rank could return them; rank 0 does. At the end of each chunk
the ranks run ONE small all_reduce that checks they stand at the same step and that none failed
(STYLE habit 10: group checks at chunk boundaries, never a per-step barrier). Every rank enters
that collective even when its own chunk raised, so a Python error never strands the others in it.

Failure is group-wide (ARCHITECTURE.md): a dead rank cannot rejoin a process group, and the
survivors would block in their next collective until its timeout, so any rank death kills the
whole group, marks it broken and raises `StageActorDied("denoise", ...)`; `restart()` rebuilds it.

GPU ranks: Ray normally masks CUDA_VISIBLE_DEVICES to the rank's own GPU, which keeps NCCL off
NVLink/P2P on some systems (ray.md §2.3). We use fix B: ranks run with
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
import socket
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import ray
from ray.actor import ActorHandle
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.config import ServiceConfig
from actors.errors import StageActorDied, StageStartError, first_line, is_actor_death
from actors.pool import bundle_resources, kill_quietly, reserve_placement_group
from actors.stage_actors import resolve_checkpoint, resolve_dtype, resolve_model_folder
from models.wan.checkpoint import WanCheckpoint, read_dit_config
from parallel.mesh import LayoutError, ParallelLayout, resolve_layout

if TYPE_CHECKING:
    from stages.denoise import DenoiseJob

logger = logging.getLogger(__name__)

STAGE = "denoise"
HEALTH_GROUP = "health"
"""Concurrency group of `ping`, so a health check is answered while a chunk is running."""
GPU_RANK_ENV = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _rank_cuda_device() -> str:
    """`cuda:<index>` of the GPU Ray assigned to this process, whether or not Ray masked CUDA_VISIBLE_DEVICES."""
    ids = ray.get_runtime_context().get_accelerator_ids().get("GPU") or []
    if not ids:
        return "cuda:0"
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if ids[0] in visible:
        return f"cuda:{visible.index(ids[0])}"
    return f"cuda:{int(ids[0])}"


class DiTRankActor:
    """One rank of a DiT group: the denoiser, this rank's job states, and its process-group membership."""

    def __init__(self, rank: int, world_size: int, model: str, dtype: str, device: str,
                 layout: tuple[int, int, int] = (1, 1, 1)) -> None:
        """model: checkpoint folder; dtype: "auto"/"fp32"/"bf16"; device: "cpu" or "cuda" (bound to Ray's GPU);
        layout: (cfg_degree, ring_degree, ulysses_degree), already validated by DiTGroup.

        torch is imported here, after Ray has set this process's environment (GPU_RANK_ENV).
        """
        from stages.denoise import DenoiseStage

        self.rank = rank
        self.world_size = world_size
        self.layout = layout
        self.device = _rank_cuda_device() if device == "cuda" else device
        self._bind_device()
        checkpoint = resolve_checkpoint(model)
        torch_dtype = resolve_dtype(dtype, device)
        self._stage = DenoiseStage.from_pretrained(checkpoint, dtype=torch_dtype, device=self.device)
        self._jobs: dict[str, DenoiseJob] = {}
        self._group: dict[str, Any] | None = None
        logger.info("DiT rank %d/%d loaded %s (%s on %s, pid %d)", rank, world_size, checkpoint.root, torch_dtype,
                    self.device, os.getpid())

    def _bind_device(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.set_device(self.device)

    # ---- process group ------------------------------------------------------------------------

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port: rank 0's answer is the group's rendezvous address."""
        return ray.util.get_node_ip_address(), _free_port()

    def init_process_group(self, url: str, backend: str, timeout_s: float) -> None:
        """Join the group (blocks until every rank has joined), then check it with one all_reduce.

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
        from parallel.mesh import ParallelLayout, ParallelMesh

        layout = ParallelLayout(*self.layout)
        if layout.world_size > 1:
            mesh = ParallelMesh.build(layout)
            assert mesh is not None
            self._stage.use_mesh(mesh)
        self._group = {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "backend": backend,
                       "all_reduce_sum": int(value.item()), "layout": str(layout)}
        logger.info("rank %d joined %s group of %d at %s", self.rank, backend, self.world_size, url)

    def _comm_device(self, backend: str) -> str:
        return self.device if backend == "nccl" else "cpu"

    def group_info(self) -> dict[str, Any] | None:
        """{"rank", "world_size", "backend", "all_reduce_sum", "layout"} as seen after the init check; None before."""
        return None if self._group is None else dict(self._group)

    # ---- jobs ---------------------------------------------------------------------------------

    def start(self, job_id: str, params: dict[str, Any], positive: np.ndarray, negative: np.ndarray | None,
              latents: np.ndarray | None = None) -> int:
        """Create a job at step 0 from resolved params and embeddings (L, D) float32; returns its total steps.

        latents (C, F', H', W') replaces the seeded noise (parity tests).
        """
        import torch

        from stages.params import ResolvedParams
        from stages.embeddings import PromptEmbeddings

        if job_id in self._jobs:
            raise ValueError(f"job {job_id!r} already exists on rank {self.rank}; drop it before starting it again")
        self._bind_device()
        resolved = ResolvedParams.model_validate(params)
        # torch.tensor copies: arrays from the object store are read-only.
        embeddings = PromptEmbeddings(torch.tensor(positive, dtype=torch.float32),
                                      None if negative is None else torch.tensor(negative, dtype=torch.float32))
        noise = None if latents is None else torch.tensor(latents, dtype=torch.float32)
        job = self._stage.start(resolved, embeddings, noise)
        self._jobs[job_id] = job
        return job.total_steps

    def run_steps(self, job_id: str, max_steps: int) -> dict[str, Any]:
        """Advance a job by up to max_steps; returns {"step", "total", "done", "step_times"} (this chunk's seconds).

        With world_size > 1 the chunk is framed by two small all_reduce checks, entered by every rank
        even after an error, so all ranks fail or succeed together and never strand one another:
        before it, that every rank knows the job, stands at the same step and runs the same number of
        steps (the forwards contain collectives, so a disagreement must stop the chunk before they
        start); after it, that no rank failed and all reached the same step.
        """
        if max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        self._bind_device()
        error: Exception | None = None
        job: DenoiseJob | None = None
        first = 0
        try:
            job = self._job(job_id)
            first = job.step
        except Exception as exc:  # noqa: BLE001  # re-raised below, after the group check
            error = exc
        if self.world_size > 1:
            self._agree(job_id, "at the start of the chunk", {"step": first, "steps": max_steps},
                        failed=error is not None)
        if error is not None:
            raise error  # every other rank raised in the check above: nobody waits at the end check
        assert job is not None
        try:
            self._stage.run_steps(job, max_steps)
        except Exception as exc:  # noqa: BLE001  # re-raised below, after the group check
            error = exc
        if self.world_size > 1:
            self._agree(job_id, "at the end of the chunk", {"step": -1 if job is None else job.step},
                        failed=error is not None)
        if error is not None:
            raise error
        assert job is not None
        return {"step": job.step, "total": job.total_steps, "done": job.done, "step_times": job.step_times[first:]}

    def _agree(self, job_id: str, when: str, named: dict[str, int], failed: bool) -> None:
        """One all_reduce(MAX) of (values, -values, failed): raises on every rank unless all ranks hold the
        same values and none failed (a failed rank re-raises its own error instead)."""
        values = list(named.values())
        import torch
        import torch.distributed as dist

        if self._group is None:
            raise RuntimeError(f"rank {self.rank} of {self.world_size} has no process group; "
                               f"call init_process_group first")
        backend = self._group["backend"]
        flags = torch.tensor([*values, *(-v for v in values), int(failed)], dtype=torch.int64,
                             device=self._comm_device(backend))
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        n = len(values)
        high, low, any_failed = flags[:n].tolist(), [-int(v) for v in flags[n:2 * n]], int(flags[-1])
        if any_failed:
            if not failed:
                raise RuntimeError(f"job {job_id!r}: another rank failed {when} (rank {self.rank} holds {named})")
            return
        if high != low:
            ranges = ", ".join(f"{name} {lo}..{hi}" for name, lo, hi in zip(named, low, high) if lo != hi)
            raise RuntimeError(f"job {job_id!r}: ranks disagree {when} ({ranges}); the group is inconsistent "
                               f"and must be restarted")

    def result(self, job_id: str) -> np.ndarray:
        """The finished job's latents (C, F', H', W') float32; the job is dropped."""
        job = self._job(job_id)
        if not job.done:
            raise ValueError(f"job {job_id!r} is at step {job.step} of {job.total_steps}; run the remaining steps "
                             f"before asking for the result")
        del self._jobs[job_id]
        return job.latents.detach().to("cpu").float().numpy()

    def drop(self, job_id: str) -> None:
        """Forget a job (cancellation or cleanup); dropping an unknown job is fine."""
        self._jobs.pop(job_id, None)

    def jobs(self) -> list[str]:
        return list(self._jobs)

    def ping(self) -> int:
        """This rank's number; answers once the weights are loaded."""
        return self.rank

    def _job(self, job_id: str) -> "DenoiseJob":
        try:
            return self._jobs[job_id]
        except KeyError:
            raise KeyError(f"unknown job {job_id!r} on rank {self.rank}; start it first (known: "
                           f"{sorted(self._jobs)})") from None


class DiTGroup:
    """A group of `cfg.dit.world_size` DiTRankActors in one STRICT_PACK placement group, driven from asyncio."""

    def __init__(self, cfg: ServiceConfig, group_index: int = 0, model: str | None = None) -> None:
        """model: checkpoint folder; None = cfg.model (None there too: the embedded default model)."""
        self.cfg = cfg
        self.group_index = group_index
        self._model_arg = model if model is not None else cfg.model
        self.device = cfg.actor_device(cfg.dit.num_gpus)
        self.backend = "nccl" if self.device == "cuda" else "gloo"
        if self.device == "cuda" and cfg.dit.num_gpus == 0 and cfg.dit.world_size > 1:
            raise ValueError(f"device is 'cuda' but dit.num_gpus is 0, so all {cfg.dit.world_size} ranks would share "
                             f"one GPU under NCCL; set dit.num_gpus to 1 (or device to 'cpu')")
        self._bundle = bundle_resources(cfg.dit.num_cpus, cfg.dit.num_gpus, STAGE)
        # ping gets its own thread (concurrency group) so a health check is answered during a chunk.
        self._remote_cls = ray.remote(concurrency_groups={HEALTH_GROUP: 1})(DiTRankActor)
        self._pg: PlacementGroup | None = None
        self.layout: ParallelLayout | None = None
        self._ranks: list[ActorHandle] = []
        self._broken: str | None = None

    @property
    def world_size(self) -> int:
        return self.cfg.dit.world_size

    @property
    def broken(self) -> bool:
        """True after a rank died: every call raises StageActorDied until restart()."""
        return self._broken is not None

    @property
    def ranks(self) -> list[ActorHandle]:
        """The rank actors, rank 0 first (for tests and diagnostics)."""
        return list(self._ranks)

    @property
    def placement_group(self) -> PlacementGroup | None:
        return self._pg

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Reserve the placement group, spawn the ranks, rendezvous at rank 0 and init the group on all ranks."""
        if self._ranks or self._pg is not None:
            raise RuntimeError(f"DiT group {self.group_index} is already running; use restart()")
        timeout = self.cfg.dit.init_timeout_s
        began = time.perf_counter()
        model = str(await asyncio.to_thread(resolve_model_folder, self._model_arg))
        self.layout = await asyncio.to_thread(self._resolve_layout, model)
        self._pg = await reserve_placement_group(f"{STAGE}{self.group_index}", [dict(self._bundle)] * self.world_size,
                                                 "STRICT_PACK", timeout)
        try:
            self._ranks = [self._spawn(rank, model) for rank in range(self.world_size)]
            await self._wait_loaded(timeout)
            host, port = await self._ranks[0].address.remote()
            url = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
            # All ranks at once: init_process_group blocks until every rank has joined (ray.md §2.2).
            refs = [r.init_process_group.remote(url, self.backend, timeout) for r in self._ranks]
            await asyncio.wait_for(self._gather(refs, "init_process_group"), timeout + 10)
        except asyncio.TimeoutError:
            await self._teardown()
            raise StageStartError(STAGE, f"DiT group {self.group_index}: process group did not form within "
                                         f"{timeout:g} s (dit.init_timeout_s)") from None
        except StageActorDied as exc:
            await self._teardown()
            raise StageStartError(STAGE, f"DiT group {self.group_index}: {exc.detail}\n{exc.__cause__}") from exc
        except BaseException:
            await self._teardown()
            raise
        self._broken = None
        logger.info("DiT group %d started: %d ranks, layout %s (%s, %s, bundle %s) in %.1f s", self.group_index,
                    self.world_size, self.layout, self.device, self.backend, self._bundle, time.perf_counter() - began)

    def _resolve_layout(self, model: str) -> ParallelLayout:
        """The configured (or automatic) layout for this model, or StageStartError saying why it cannot run."""
        checkpoint = WanCheckpoint.resolve(model)
        config, _ = read_dit_config(checkpoint.transformer_dirs[0])
        defaults = checkpoint.preset.defaults
        guided = defaults.guidance_scale != 1.0 or (checkpoint.preset.guidance_scale_2 or 1.0) != 1.0
        dit = self.cfg.dit
        try:
            return resolve_layout(self.world_size, config.num_heads, guided, dit.cfg_degree, dit.ring_degree,
                                  dit.ulysses_degree)
        except LayoutError as exc:
            raise StageStartError(STAGE, f"DiT group {self.group_index}: {exc}") from None

    async def restart(self) -> None:
        """Kill all ranks, release the placement group and start a fresh group (jobs on it are lost)."""
        logger.warning("restarting DiT group %d%s", self.group_index,
                       f" (broken: {self._broken})" if self._broken else "")
        await self._teardown()
        await self.start()

    async def shutdown(self) -> None:
        await self._teardown()

    def _spawn(self, rank: int, model: str) -> ActorHandle:
        assert self._pg is not None
        options: dict[str, Any] = dict(
            num_cpus=self.cfg.dit.num_cpus,
            num_gpus=self.cfg.dit.num_gpus,
            max_restarts=0,  # a restarted rank cannot rejoin the process group: the group is rebuilt instead
            max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=rank),
        )
        if self.device == "cuda":
            options["runtime_env"] = {"env_vars": dict(GPU_RANK_ENV)}
        assert self.layout is not None
        degrees = (self.layout.cfg_degree, self.layout.ring_degree, self.layout.ulysses_degree)
        return self._remote_cls.options(**options).remote(rank, self.world_size, model, self.cfg.dtype, self.device,
                                                          degrees)

    async def _wait_loaded(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._gather([self._ping_ref(r) for r in self._ranks], "loading"), timeout)
        except asyncio.TimeoutError:
            raise StageStartError(STAGE, f"DiT group {self.group_index}: ranks did not load within {timeout:g} s "
                                         f"(dit.init_timeout_s)") from None

    async def _teardown(self) -> None:
        for rank in self._ranks:
            kill_quietly(rank)
        self._ranks = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
        self._broken = None

    # ---- jobs ---------------------------------------------------------------------------------

    async def begin(self, job_id: str, params: Mapping[str, Any], positive: np.ndarray, negative: np.ndarray | None,
                    latents: np.ndarray | None = None) -> int:
        """Create the job on every rank from ResolvedParams fields and embeddings (L, D); returns total steps."""
        self._check_usable()
        if hasattr(params, "model_dump"):
            params = params.model_dump()  # a ResolvedParams instance
        # One object-store copy of each array for all ranks.
        args = [ray.put(positive), None if negative is None else ray.put(negative),
                None if latents is None else ray.put(latents)]
        refs = [r.start.remote(job_id, dict(params), *args) for r in self._ranks]
        try:
            totals = await self._gather(refs, f"start({job_id})")
        except StageActorDied:
            raise
        except Exception:
            await self._drop_everywhere(job_id)  # some ranks may have created it
            raise
        return int(totals[0])

    async def run_steps(self, job_id: str, max_steps: int) -> dict[str, Any]:
        """Advance the job by up to max_steps on all ranks; rank 0's {"step", "total", "done", "step_times"}."""
        self._check_usable()
        refs = [r.run_steps.remote(job_id, max_steps) for r in self._ranks]
        return (await self._gather(refs, f"run_steps({job_id})"))[0]

    async def result(self, job_id: str) -> np.ndarray:
        """The finished job's latents (C, F', H', W') float32 from rank 0; the job is dropped on every rank."""
        self._check_usable()
        (latents,) = await self._gather([self._ranks[0].result.remote(job_id)], f"result({job_id})")
        await self._drop_everywhere(job_id, first_rank=1)
        return latents

    async def drop(self, job_id: str) -> None:
        """Cancel: forget the job on every rank. Idempotent, and it never raises for a dead rank (the job
        died with it): the group is then marked broken and the next call raises StageActorDied.
        """
        if self._broken is not None or not self._ranks:
            return  # a broken or stopped group holds no jobs
        try:
            await self._drop_everywhere(job_id)
        except StageActorDied as exc:
            logger.warning("drop(%s): %s", job_id, exc)

    async def ping(self, timeout_s: float = 10.0) -> bool:
        """True when every rank answers in time; a dead rank breaks the group (False). Runs beside a chunk."""
        if self._broken is not None or not self._ranks:
            return False
        try:
            answers = await asyncio.wait_for(self._gather([self._ping_ref(r) for r in self._ranks], "ping"),
                                             timeout_s)
        except StageActorDied:
            return False
        except asyncio.TimeoutError:
            logger.warning("DiT group %d: ping got no answer within %g s", self.group_index, timeout_s)
            return False
        return list(answers) == list(range(self.world_size))

    # ---- fan-out ------------------------------------------------------------------------------

    def _ping_ref(self, rank: ActorHandle) -> ray.ObjectRef:
        return rank.ping.options(concurrency_group=HEALTH_GROUP).remote()

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise StageActorDied(STAGE, f"DiT group {self.group_index} is broken ({self._broken}); restart() it")
        if not self._ranks:
            raise RuntimeError(f"DiT group {self.group_index} is not running; call start() first")

    async def _drop_everywhere(self, job_id: str, first_rank: int = 0) -> None:
        targets = self._ranks[first_rank:]
        if targets:
            await self._gather([r.drop.remote(job_id) for r in targets], f"drop({job_id})", first_rank)

    async def _gather(self, refs: list[ray.ObjectRef], what: str, first_rank: int = 0) -> list[Any]:
        """Await one call per rank (refs[i] went to rank first_rank + i).

        The first rank death kills the group and raises StageActorDied at once (survivors would block
        in their next collective); otherwise the first error in rank order is raised.
        """
        futures = [asyncio.ensure_future(_await(ref)) for ref in refs]
        for future in futures:  # errors we stop waiting for must not be reported as "never retrieved"
            future.add_done_callback(_consume)
        pending: set[asyncio.Future[Any]] = set(futures)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for future in done:
                exc = future.exception()
                if is_actor_death(exc):
                    rank = first_rank + futures.index(future)
                    detail = (f"rank actor {rank} of DiT group {self.group_index} died during {what}: "
                              f"{first_line(exc)}")
                    self._break(detail)
                    raise StageActorDied(STAGE, detail) from exc
        return [future.result() for future in futures]

    def _break(self, reason: str) -> None:
        logger.error("DiT group %d broken: %s; killing all %d ranks", self.group_index, reason, len(self._ranks))
        self._broken = reason
        for rank in self._ranks:
            kill_quietly(rank)


async def _await(ref: ray.ObjectRef) -> Any:
    return await ref


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
