"""Exact patch-parallel (strip-parallel) FLUX.1 VAE decode: each rank decodes a horizontal strip of rows.

The same scheme as the Wan decode (`parallel.vae_decode`): every 3x3 conv pads H with its neighbours'
boundary rows (halo exchange), and the mid-block attention all-gathers the small latent-resolution map.
The FLUX decoder adds one thing Wan's does not need: its GroupNorms average over the whole image, so
each norm all-reduces its per-group sums across the strips, in two passes (the mean, then the summed
squared deviations from it, which avoids the cancellation of E[x^2] - E[x]^2). The result equals the
single-rank decode up to float summation order.

`FluxRowSplit` plugs into the `spatial` seam of `models.flux.vae.FluxVAE.decode`; `decode_patch_parallel_flux`
splits the latents, decodes this rank's strip and all-gathers the pixel strips.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from models.flux.vae import FluxVAE
from parallel.vae_decode import RowSplit, decode_patch_parallel

__all__ = ["FluxRowSplit", "decode_patch_parallel_flux"]

class FluxRowSplit(RowSplit):
    """`RowSplit`'s halo exchange and row gather, plus GroupNorm statistics over all strips."""

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        buf = self._comm(t)
        dist.all_reduce(buf, group=self.group)
        return buf.to(t.device)

    def group_norm(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        """norm(x) for x (B, C, h, W), this strip's rows, with the mean and variance of the whole image."""
        if self.world_size == 1:
            return norm(x)
        b, c, h, w = x.shape
        groups = norm.num_groups
        count = (c // groups) * w * self._scale(h) * sum(self.rows)  # elements per group in the whole image
        xg = x.reshape(b, groups, -1)
        mean = self._all_reduce(xg.sum(dim=-1)) / count
        centred = xg - mean[..., None]
        var = self._all_reduce(centred.square().sum(dim=-1)) / count
        y = (centred * torch.rsqrt(var[..., None] + norm.eps)).reshape(b, c, h, w)
        return y * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]


def decode_patch_parallel_flux(vae: FluxVAE, latents: torch.Tensor,
                               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Normalised latents (B, 16, H', W'), the same on every rank of `group` -> the full images
    (B, 3, 8H', 8W') on every rank; equal to `vae.decode(latents)` up to float summation order
    (`parallel.vae_decode.decode_patch_parallel` with the FLUX split)."""
    return decode_patch_parallel(vae, latents, group, split_cls=FluxRowSplit)
