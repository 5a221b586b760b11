"""Qwen-Image: the DiT, its text encoder and VAE, presets and the registry entry.

    from models.qwen_image import QwenImageTransformer, QwenImageTextEncoder, QwenImageVAE   # the networks (torch)
    from models.qwen_image import QwenImageDiTConfig, get_preset, PRESETS                    # description only (no torch)

The networks are imported on first use (PEP 562 module `__getattr__`), so `import models.qwen_image` for the
presets loads no torch. `family.py` is the registry entry, `tiny.py` writes random tiny release folders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.lazy_exports import lazy_exports
from models.qwen_image.config import (
    PRESETS,
    QWEN_IMAGE_LATENT,
    QwenImageDiTConfig,
    QwenImagePreset,
    get_preset,
    match_preset,
)

if TYPE_CHECKING:
    from models.qwen_image.text_encoder import QwenImageTextEncoder
    from models.qwen_image.transformer import QwenImageTransformer
    from models.qwen_image.vae import QwenImageVAE

# Public name -> the module that defines it; imported when the name is first read.
_LAZY = {
    "QwenImageTransformer": "models.qwen_image.transformer",
    "QwenImageTextEncoder": "models.qwen_image.text_encoder",
    "QwenImageVAE": "models.qwen_image.vae",
}

__all__ = ["PRESETS", "QWEN_IMAGE_LATENT", "QwenImageDiTConfig", "QwenImagePreset", "QwenImageTextEncoder",
           "QwenImageTransformer", "QwenImageVAE", "get_preset", "match_preset"]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
