"""The one block-loop runner: a denoiser forward as begin -> blocks -> head, on one rank or over a mesh.

Every family's DiT exposes the block protocol of models/denoiser.py, and every path (single rank,
CFG parallel, Ulysses / Ring / hybrid) runs through `BlockRunner`, so a feature cache or any other
per-forward policy hooks the same three places everywhere (`ForwardHooks`): around the whole forward
of a step, around each block, and around each attention call (the seam carries `AttentionMeta`).
Under context parallelism the hooks run on every rank on that rank's shard; a hook that decides to skip
work must make every rank decide alike (flexcache/ agrees through a collective).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Sequence

import torch
from torch import nn

from flexcache.hooks import NO_HOOKS, ForwardHooks, StepInfo, Streams
from models.attention import AttentionFn, AttentionMeta, auto_attention
from models.conditioning import Conditioning
from models.denoiser import BlockDenoiser
from parallel.attention import ContextParallelAttention
from parallel.dit import all_gather_cat, shard_bounds, shard_rope, take_shard
from parallel.mesh import ParallelMesh

logger = logging.getLogger(__name__)

class BlockRunner:
    """Runs forwards of one DiT module (`BlockDenoiser`), on one rank or on every rank of `mesh` together.

    The runner owns the model's attention seam: it installs one function that calls the hooks around
    `attn_fn` (single rank) or around `ContextParallelAttention` over `attn_fn` (sequence parallel).
    With a mesh, every rank of it must make the same calls together; each returns the full velocity.
    """

    def __init__(self, model: BlockDenoiser, mesh: ParallelMesh | None = None,
                 attn_fn: AttentionFn = auto_attention) -> None:
        self.model = model
        self.mesh = mesh
        sp_degree = mesh.layout.sp_degree if mesh is not None else 1
        self._cp_attention = ContextParallelAttention(mesh, attn_fn) if sp_degree > 1 else None
        self._inner: AttentionFn = self._cp_attention or attn_fn
        self._hooks = NO_HOOKS
        self._info = StepInfo(-1, 0.0, 1)
        self._warned_unguided = False
        model.set_attention(self._seam)

    def _reduce(self, values: torch.Tensor) -> torch.Tensor:
        """Sum `values` over the ranks that share this forward's tokens (the sequence-parallel group)."""
        mesh = self.mesh
        if mesh is None or mesh.layout.sp_degree == 1:
            return values
        summed = values.clone()
        torch.distributed.all_reduce(summed, group=mesh.sp_group)
        return summed

    def _seam(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        return self._hooks.attention(self._info, meta, self._inner, q, k, v)

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor, t: torch.Tensor, conditioning: Sequence[Conditioning],
                 guidance: torch.Tensor | None = None, hooks: ForwardHooks = NO_HOOKS,
                 step: int = -1) -> torch.Tensor:
        """Velocity for latents (B, C, ...) of B branches at t (B,), one conditioning per branch."""
        mesh = self.mesh
        batch = latents.shape[0]
        if mesh is not None and mesh.layout.cfg_degree > 1:
            if batch == mesh.layout.cfg_degree:
                # CFG parallel: this half runs its branch only, then the halves swap velocities.
                row = slice(mesh.cfg_index, mesh.cfg_index + 1)
                v = self._run(latents[row], t[row], conditioning[row], None if guidance is None else guidance[row],
                              hooks, step)
                return all_gather_cat(v, mesh.cfg_group, dim=0)
            if not self._warned_unguided:
                # An unguided request (B = 1) on a CFG-parallel group: both halves compute the same
                # branch, correct but without the CFG speed-up.
                logger.warning("batch of %d on a cfg_degree %d group: every CFG half computes the whole "
                               "batch (no CFG speed-up for unguided requests)", batch, mesh.layout.cfg_degree)
                self._warned_unguided = True
        return self._run(latents, t, conditioning, guidance, hooks, step)

    def _run(self, latents: torch.Tensor, t: torch.Tensor, conditioning: Sequence[Conditioning],
             guidance: torch.Tensor | None, hooks: ForwardHooks, step: int) -> torch.Tensor:
        self._hooks = hooks
        self._info = StepInfo(step, float(t.reshape(-1)[0]), latents.shape[0], len(self.model.blocks),
                              self._reduce, latents=latents)
        try:
            return hooks.step(self._info, lambda: self._forward(latents, t, conditioning, guidance, hooks))
        finally:
            self._hooks = NO_HOOKS

    def _forward(self, latents: torch.Tensor, t: torch.Tensor, conditioning: Sequence[Conditioning],
                 guidance: torch.Tensor | None, hooks: ForwardHooks) -> torch.Tensor:
        model, mesh = self.model, self.mesh
        state = model.begin(latents, t, conditioning, guidance)
        seq_len = state.img.shape[1]
        degree = mesh.layout.sp_degree if mesh is not None else 1
        if degree > 1:
            index = mesh.sp_index  # type: ignore[union-attr]
            state = state.with_tokens(
                take_shard(state.img, 1, seq_len, degree, index),
                tuple(shard_rope(table, state.text_len, seq_len, degree, index) for table in state.rope))
            self._cp_attention.seq_len = seq_len  # type: ignore[union-attr]
            start, stop, _ = shard_bounds(seq_len, degree, index)
            self._info = replace(self._info, real_tokens=max(min(stop, seq_len) - start, 0))
        hooks.begin(self._info, lambda name: model.cache_signal(state, name))
        img, txt = state.img, state.txt
        for index, block in enumerate(model.blocks):
            def compute(img: torch.Tensor, txt: torch.Tensor | None, block: nn.Module = block) -> Streams:
                return model.run_block(block, img, txt, state)
            img, txt = hooks.block(self._info, index, block, compute, img, txt)
        patches = model.run_head(img, state)
        if degree > 1:
            patches = all_gather_cat(patches, mesh.sp_group, dim=1)[:, :seq_len]  # type: ignore[union-attr]
        return model.to_latents(patches, state)
