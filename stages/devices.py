"""Device defaults shared by the in-process Pipeline and the stage actors.

A module of its own so that a DiT or VAE rank can ask for the default dtype without importing the
Pipeline, which imports all three stages (and with the text encoder, transformers).
"""

from __future__ import annotations

import torch


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA (as the official pipeline runs), fp32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
