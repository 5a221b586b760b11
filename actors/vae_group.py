"""Patch-parallel VAE decode on Ray: one decode replica = `vae.patch_parallel` rank actors.

For large frames one device's memory or time is the limit of the decode stage, and the Wan VAE
cannot be tiled exactly with a small halo. So with `vae.patch_parallel = N > 1` a decode replica
is a `VAEGroup`: N `VAERankActor`s forming one torch.distributed group (gloo on CPU, NCCL on
CUDA) in one STRICT_PACK placement group of N bundles, built by the same `RankGroup` machinery as
the DiT group. Each rank decodes one horizontal strip of rows with halo exchange
(`parallel.vae_decode.decode_patch_parallel`, exact up to float summation order) and every rank
ends with the full frames; rank 0 writes the media file and the JSON sidecar exactly as a
single `VAEDecoderActor` does, so the result and the dict returned are the same.

The engine drives `vae.replicas` such groups through a `GroupPool` (actors/pool.py), which has
the StagePool interface: a dead rank raises `StageActorDied("decode", ...)` for the job to be
retried while the group is rebuilt in the background. So does a rank whose decode raised while
the others are still running `vae.fault_grace_s` later (they wait in a halo exchange it left),
and a decode that outlives `vae.call_timeout_s` (rank_group.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import numpy as np
import ray

from actors.config import ServiceConfig
from actors.rank_group import RankActor, RankGroup
from actors.stage_actors import VAEDecoderActor, resolve_model_folder, write_result

logger = logging.getLogger(__name__)

STAGE = "decode"


class VAERankActor(RankActor):
    """One rank of a patch-parallel VAE group: the VAE in fp32, and this rank's process-group membership."""

    def __init__(self, rank: int, world_size: int, model: str, device: str) -> None:
        """model: checkpoint folder; device: "cpu" or "cuda" (bound to the GPU Ray assigned to this rank)."""
        self._init_rank(rank, world_size, device)
        self._decoder = VAEDecoderActor(model, self.device)  # the single-actor decoder, as a plain object
        logger.info("VAE rank %d/%d ready (pid %d)", rank, world_size, os.getpid())

    def decode(self, latents: np.ndarray, out_path: str, fps: int,
               record: dict[str, Any]) -> dict[str, Any] | None:
        """Every rank decodes its strip of `latents` (C, F', H', W') and receives the full frames; rank 0 writes
        `out_path` + sidecar and returns what VAEDecoderActor.decode returns, the other ranks return None.
        """
        self._bind_device()
        start = time.perf_counter()
        frames = self._decoder.frames(latents, parallel=True)
        if self.rank != 0:
            return None
        return write_result(frames, out_path, fps, record, time.perf_counter() - start)


class VAEGroup(RankGroup):
    """`cfg.vae.patch_parallel` VAERankActors in one STRICT_PACK placement group: one decode replica."""

    def __init__(self, cfg: ServiceConfig, index: int = 0, model: str | None = None,
                 actor_cls: type[VAERankActor] = VAERankActor) -> None:
        """model: checkpoint folder; None = cfg.model (None there too: the embedded default model);
        actor_cls: the rank class (a subclass in fault-injection tests)."""
        self._model_arg = model if model is not None else cfg.model
        self._call_timeout_s = cfg.vae.call_timeout_s
        vae = cfg.vae
        super().__init__(stage=STAGE, kind="VAE", index=index, actor_cls=actor_cls,
                         world_size=vae.patch_parallel, num_cpus=vae.num_cpus, num_gpus=vae.num_gpus,
                         device=cfg.actor_device(vae.num_gpus), init_timeout_s=vae.init_timeout_s,
                         section="vae", fault_grace_s=vae.fault_grace_s, health_timeout_s=vae.health_check_timeout_s)

    async def _rank_args(self) -> tuple[Any, ...]:
        return str(await asyncio.to_thread(resolve_model_folder, self._model_arg)), self.device

    async def decode(self, latents: np.ndarray | ray.ObjectRef, out_path: str, fps: int,
                     record: dict[str, Any]) -> dict[str, Any]:
        """latents (C, F', H', W'), or a reference to them -> media file + sidecar, decoded by all ranks; rank 0's
        result dict."""
        self._check_usable()
        ref = latents if isinstance(latents, ray.ObjectRef) else ray.put(latents)  # one copy for all ranks
        results = await self._gather([r.decode.remote(ref, out_path, fps, record) for r in self._ranks], "decode",
                                     budget_s=self._call_timeout_s, budget_key="vae.call_timeout_s")
        return results[0]
