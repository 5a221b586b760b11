"""One DiT forward spread over a `ParallelMesh`: CFG branches over the cfg axis, tokens over ring x ulysses.

`ContextParallelDiT(model, mesh)` is called exactly like the model, `wrapper(x, t, context) -> v`
with the full batch (B = 2 for [cond, uncond] under guidance) and the full latents, and returns the
full velocity on every rank, so the sampler step runs unchanged and redundantly on every rank and
the latents stay replicated. What is sharded is the expensive part, the blocks:

- CFG (cfg_degree 2): rank half c runs only batch row c; the two velocities are all-gathered.
- Sequence (ring x ulysses): after `model.prepare` (patch/time/text embedding, token-local and
  cheap), each rank keeps its contiguous token shard (the sequence padded at the end to a multiple
  of the sp degree) and the matching rows of the RoPE tables, runs every block on it (self-attention
  through `ContextParallelAttention`, the model's attention seam; modulation, cross-attention and
  FFN are token-local), runs the head on its shard and all-gathers the S x 64 head outputs.

Why latents are replicated and not sharded between steps: the sampler step is elementwise on
S x 64 values and the per-step gather moves S x 64 values, against 4 all-to-alls of S x dim values
per layer for Ulysses (0.05 % of the traffic at 1.3B), while a replicated latent keeps the model,
sampler and job code identical to the single-rank path.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.wan.transformer import WanTransformer
from parallel.attention import ContextParallelAttention
from parallel.mesh import ParallelMesh

logger = logging.getLogger(__name__)


def shard_bounds(seq_len: int, degree: int, index: int) -> tuple[int, int, int]:
    """(start, stop, shard) of shard `index` when seq_len tokens are padded to degree * shard."""
    shard = math.ceil(seq_len / degree)
    return index * shard, (index + 1) * shard, shard


def take_shard(x: torch.Tensor, dim: int, seq_len: int, degree: int, index: int) -> torch.Tensor:
    """This rank's slice along `dim`, zero-padded past seq_len so every shard has the same length."""
    start, stop, _ = shard_bounds(seq_len, degree, index)
    part = x.narrow(dim, min(start, seq_len), max(min(stop, seq_len) - start, 0))
    missing = (stop - start) - part.shape[dim]
    if missing:
        pad = [0, 0] * (x.ndim - 1 - dim % x.ndim) + [0, missing]
        part = F.pad(part, pad)
    return part


def all_gather_cat(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """Concatenate the group's equally shaped tensors along dim, in group-rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class ContextParallelDiT:
    """A WanTransformer whose forward runs on every rank of `mesh` together (a collective call)."""

    def __init__(self, model: WanTransformer, mesh: ParallelMesh) -> None:
        self.model = model
        self.mesh = mesh
        self.attention = ContextParallelAttention(mesh)
        if mesh.layout.sp_degree > 1:
            model.set_attention(self.attention)
        self._warned_unguided = False

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Same contract as WanTransformer.forward: x (B, C, F, H, W), t (B,), context -> v like x."""
        mesh = self.mesh
        batch = x.shape[0]
        if mesh.layout.cfg_degree == 1:
            return self._forward_sequence(x, t, context)
        if batch != mesh.layout.cfg_degree:
            # An unguided request (B = 1) on a CFG-parallel group: both halves compute the same
            # branch, correct but without the CFG speed-up.
            if not self._warned_unguided:
                logger.warning("batch of %d on a cfg_degree %d group: every CFG half computes the whole "
                               "batch (no CFG speed-up for unguided requests)", batch, mesh.layout.cfg_degree)
                self._warned_unguided = True
            return self._forward_sequence(x, t, context)
        row = mesh.cfg_index
        t = torch.as_tensor(t, device=x.device)
        t_row = t[row: row + 1] if t.ndim else t
        v = self._forward_sequence(x[row: row + 1], t_row, [context[row]])
        return all_gather_cat(v, mesh.cfg_group, dim=0)

    def _forward_sequence(self, x: torch.Tensor, t: torch.Tensor,
                          context: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        model, mesh = self.model, self.mesh
        degree = mesh.layout.sp_degree
        if degree == 1:
            return model(x, t, context)
        state = model.prepare(x, t, context)
        seq_len = state.x.shape[1]
        tokens = take_shard(state.x, 1, seq_len, degree, mesh.sp_index)
        cos, sin = (take_shard(table, 0, seq_len, degree, mesh.sp_index) for table in state.rope)
        self.attention.seq_len = seq_len
        h = tokens
        for block in model.blocks:
            h = block(h, state.e0, state.context, (cos, sin))
        patches = all_gather_cat(model.head(h, state.e), mesh.sp_group, dim=1)[:, :seq_len]
        return model.unpatchify(patches, state.grid).to(state.dtype)
