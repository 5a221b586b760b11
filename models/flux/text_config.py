"""FLUX.1's text conditioning as frozen, torch-free presets: prompt lengths and the released encoders' shapes.

The engine reads these without torch or transformers. The architecture dicts are the keyword
arguments of transformers' `CLIPTextConfig` / `T5Config` for the released encoders (CLIP ViT-L/14's
text tower and the T5 v1.1 XXL encoder), used to check parameter counts on the meta device and to
describe what a release folder must hold; loading always reads the folder's own config.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["CLIP_L_ARCH", "FLUX1_DEV_TEXT", "FLUX1_SCHNELL_TEXT", "FluxTextConfig", "T5_XXL_ARCH"]


@dataclass(frozen=True)
class FluxTextConfig:
    """How prompts are encoded for one FLUX.1 variant.

    clip_max_length: CLIP's padded prompt length (its 77 positions).
    t5_max_length: T5's padded prompt length, i.e. the number of text tokens the DiT attends to
        (dev 512; schnell 256, the length its reference inference code uses).
    context_dim / pooled_dim: widths the DiT expects from T5 (rows) and CLIP (pooled vector).
    """

    clip_max_length: int = 77
    t5_max_length: int = 512
    context_dim: int = 4096
    pooled_dim: int = 768

    def __post_init__(self) -> None:
        if not 1 <= self.t5_max_length <= 512:
            raise ValueError(f"t5_max_length must be in 1..512, got {self.t5_max_length}")
        if self.clip_max_length != 77:
            raise ValueError(f"clip_max_length must be 77 (CLIP-L's positions), got {self.clip_max_length}")


FLUX1_DEV_TEXT = FluxTextConfig(t5_max_length=512)
FLUX1_SCHNELL_TEXT = FluxTextConfig(t5_max_length=256)

CLIP_L_ARCH: Mapping[str, Any] = MappingProxyType({
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 768,
})
"""CLIPTextConfig kwargs of the released CLIP-L text tower (123,060,480 parameters)."""

T5_XXL_ARCH: Mapping[str, Any] = MappingProxyType({
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False,
})
"""T5Config kwargs of the released T5 v1.1 XXL encoder (4,762,310,656 parameters, embedding counted once)."""
