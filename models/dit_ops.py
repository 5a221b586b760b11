"""Small pieces several DiT families share with the same math: fp32 RMSNorm, the adaLN modulation, an
fp32-result Linear, the complex-pair RoPE product, and FLUX-order 2x2 latent packing. A family module reads like
its paper and imports these instead of carrying its own copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RopeTables = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, in fp32 (diffusers' RMSNorm computes the variance in fp32 too)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * self.weight.float()


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LN(x) * (1 + scale) + shift in fp32 with a non-affine LayerNorm, in the references' operation order
    (bit-identical to diffusers' adaLN; folding the modulation into the LayerNorm's affine is not)."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps) * (1 + scale) + shift


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer` applied in its weight dtype, result fp32."""
    return layer(x.to(layer.weight.dtype)).float()


def apply_complex_rope(x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
    """x (B, L, H, D) rotated pairwise (x[2i], x[2i+1]) by (L, D/2) cos / sin tables, as the complex product
    the Qwen-Image and Z-Image references compute, in fp32."""
    cos, sin = rope
    rot = torch.complex(cos, sin)[None, :, None, :]
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rot).flatten(3).type_as(x)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, 2h, 2w) -> (B, h*w, 4C); token (row, col) row-major, feature index c*4 + ph*2 + pw."""
    b, c, height, width = latents.shape
    x = latents.reshape(b, c, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (height // 2) * (width // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of `pack_latents`: (B, h*w, 4C) -> (B, C, 2h, 2w)."""
    h, w = grid
    b, _, features = tokens.shape
    x = tokens.reshape(b, h, w, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, features // 4, 2 * h, 2 * w)
