"""The attention seam: every attention call of a model goes through one function of this type.

Layout is (B, L, H, D) for q, k and v and for the result, the layout flash-attn uses, so a
context-parallel implementation (parallel/) can swap sequence and head dimensions without copies
in the model. Each call also says what it is (`AttentionMeta`): which layer, whether it is self-,
cross- or joint attention, how many text rows lead a joint sequence and which text tokens are real.
Backends, context parallelism and feature caches act on that, never on the model's code. The
model receives the function in its constructor (or `set_attention`) and never imports parallel/.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

AttentionKind = Literal["self", "cross", "joint"]
"""self: image/video tokens attend to themselves; cross: image/video queries, text keys and values;
joint: one sequence of text tokens (first) and image tokens (FLUX, Qwen-Image, SD3)."""


@dataclass(frozen=True)
class AttentionMeta:
    """What one attention call is, for the function behind the seam.

    layer: the block index in forward order (0-based over every block kind); kind: see `AttentionKind`;
    text_len: for joint attention, the number of text rows that lead q, k and v (0 otherwise);
    text_mask: (B, text_len) or, for cross-attention, (B, Lk) bool, True where a text key is a real
    token; None means every key counts. Image/video keys are never masked.
    """

    layer: int
    kind: AttentionKind = "self"
    text_len: int = 0
    text_mask: torch.Tensor | None = None

    def key_mask(self, num_keys: int) -> torch.Tensor | None:
        """(B, 1, 1, num_keys) bool SDPA mask over the call's keys (text rows per `text_mask`, the rest True)."""
        if self.text_mask is None:
            return None
        mask = self.text_mask.to(torch.bool)
        if self.kind == "joint":
            rest = torch.ones(mask.shape[0], num_keys - mask.shape[1], dtype=torch.bool, device=mask.device)
            mask = torch.cat([mask, rest], dim=1)
        return mask[:, None, None, :]


SELF_ATTENTION = AttentionMeta(layer=-1)
"""Meta for a call made outside any model (tests, benchmarks): unmasked self-attention."""

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMeta], torch.Tensor]
"""(q (B, Lq, H, D), k/v (B, Lk, H, D), meta) -> (B, Lq, H, D); softmax scale 1/sqrt(D), keys masked per meta."""

_FLASH_AVAILABLE = importlib.util.find_spec("flash_attn") is not None


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   meta: AttentionMeta = SELF_ATTENTION) -> torch.Tensor:
    """PyTorch scaled-dot-product attention; the CPU twin of flash-attn."""
    mask = meta.key_mask(k.shape[1])
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    meta: AttentionMeta = SELF_ATTENTION) -> torch.Tensor:
    """flash-attn 2 on CUDA; q/k/v are cast to bf16 as the official Wan pipeline does. Unmasked calls only."""
    from flash_attn import flash_attn_func  # imported lazily: GPU extra only

    if meta.text_mask is not None:
        raise ValueError("flash_attention takes no key mask; masked calls go to sdpa_attention (auto_attention "
                         "routes them)")
    dtype = q.dtype
    half = (torch.float16, torch.bfloat16)
    cast = (lambda t: t) if dtype in half else (lambda t: t.to(torch.bfloat16))
    return flash_attn_func(cast(q), cast(k), cast(v)).to(dtype)


def auto_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   meta: AttentionMeta = SELF_ATTENTION) -> torch.Tensor:
    """flash-attn for unmasked calls on CUDA when it is installed, SDPA otherwise."""
    if q.is_cuda and _FLASH_AVAILABLE and meta.text_mask is None:
        return flash_attention(q, k, v, meta)
    return sdpa_attention(q, k, v, meta)
