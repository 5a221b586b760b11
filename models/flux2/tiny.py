"""Tiny FLUX.2-klein checkpoints with seeded random weights, in the exact diffusers release layout (tests, demos)."""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


@torch.no_grad()
def randomize_batch_norm(module: M, seed: int = 0) -> M:
    """Seeded random running statistics for every BatchNorm in `module`: mean 0.5 N(0, 1), var exp(0.5 N(0, 1))
    (positive), so latent normalisation is never the identity a fresh BatchNorm would be."""
    generator = torch.Generator("cpu").manual_seed(seed)
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.running_mean is not None:
            shape = sub.running_mean.shape
            sub.running_mean.copy_(0.5 * torch.randn(shape, generator=generator))
            sub.running_var.copy_(torch.exp(0.5 * torch.randn(shape, generator=generator)))
    return module
