"""Seeded random weights for every parameter of a module.

Parity tests need every parameter random (reference inits zero some, e.g. Wan's head weight, and
set norms to one, which hides mistakes); the embedded placeholder checkpoint needs the same.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize_parameters(module: nn.Module, seed: int = 0, scale: float = 1.0) -> nn.Module:
    """Fill every parameter from a seeded Gaussian, shaped so activations stay O(1).

    Matrices and kernels: N(0, scale^2 / fan_in). 1-D tensors whose name suggests a scale
    (norm weights, gammas): 1 + 0.1 N(0, 1). Every other 1-D tensor (biases, modulation tables): 0.1 N(0, 1).
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        is_norm_scale = leaf in ("gamma", "scale") or (leaf == "weight" and ("norm" in name or param.ndim == 1))
        if is_norm_scale and param.ndim <= 4 and param.numel() == param.shape[0]:
            value = 1.0 + 0.1 * noise
        elif param.ndim >= 2 and leaf != "modulation" and "scale_shift_table" not in name:
            fan_in = param[0].numel()
            value = noise * (scale / fan_in ** 0.5)
        else:
            value = 0.1 * noise
        param.copy_(value.to(param.dtype))
    return module
