"""The attention seam: every self-attention in a model calls one function of this type.

Layout is (B, L, H, D) for q, k and v and for the result, the layout flash-attn uses, so a
context-parallel implementation (parallel/) can swap sequence and head dimensions without copies
in the model. The model receives the function in its constructor and never imports parallel/.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""q: (B, Lq, H, D), k/v: (B, Lk, H, D) -> (B, Lq, H, D); softmax scale 1/sqrt(D), no mask."""

_FLASH_AVAILABLE = importlib.util.find_spec("flash_attn") is not None


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch scaled-dot-product attention; the CPU twin of flash-attn."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """flash-attn 2/3 on CUDA; q/k/v are cast to bf16 as the official Wan pipeline does."""
    from flash_attn import flash_attn_func  # imported lazily: GPU extra only

    dtype = q.dtype
    half = (torch.float16, torch.bfloat16)
    cast = (lambda t: t) if dtype in half else (lambda t: t.to(torch.bfloat16))
    return flash_attn_func(cast(q), cast(k), cast(v)).to(dtype)


def auto_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """flash-attn when the tensors are on CUDA and flash-attn is installed, SDPA otherwise."""
    if q.is_cuda and _FLASH_AVAILABLE:
        return flash_attention(q, k, v)
    return sdpa_attention(q, k, v)
