"""Sharding helpers for one DiT forward over a `ParallelMesh` (used by stages/runner.py).

The runner keeps the latents replicated and shards only the expensive part, the blocks:

- CFG (cfg_degree 2): rank half c runs only branch c; the two velocities are all-gathered
  (`all_gather_cat` over the cfg group).
- Sequence (ring x ulysses): after the model's `begin` (token-local and cheap), each rank keeps its
  contiguous shard of the image/video tokens (padded at the end to a multiple of the sp degree,
  `take_shard`), the text rows of the RoPE tables and the image rows of its shard (`shard_rope`),
  runs every block on it (attention through `ContextParallelAttention`; everything else is
  token-local, and the text tokens of a joint stream stay replicated), runs the head on its shard and
  all-gathers the head outputs.

Why latents are replicated and not sharded between steps: the sampler step is elementwise on
S x 64 values and the per-step gather moves S x 64 values, against 4 all-to-alls of S x dim values
per layer for Ulysses (0.05 % of the traffic at 1.3B), while a replicated latent keeps the model,
sampler and job code identical to the single-rank path.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


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


def shard_rope(table: torch.Tensor, text_len: int, seq_len: int, degree: int, index: int) -> torch.Tensor:
    """RoPE rows of a rank: the `text_len` text rows (replicated), then its shard of the seq_len image rows."""
    image_rows = take_shard(table[text_len:], 0, seq_len, degree, index)
    return torch.cat([table[:text_len], image_rows]) if text_len else image_rows


def all_gather_cat(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """Concatenate the group's equally shaped tensors along dim, in group-rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
