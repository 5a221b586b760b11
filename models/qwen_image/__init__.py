"""Qwen-Image: the DiT and its presets.

    from models.qwen_image.transformer import QwenImageTransformer          # the network (torch)
    from models.qwen_image.config import QwenImageDiTConfig, get_preset, PRESETS   # description only (no torch)

Importing the package loads no torch; the network module is imported explicitly.
"""

from models.qwen_image.config import (
    PRESETS,
    QWEN_IMAGE_LATENT,
    QwenImageDiTConfig,
    QwenImagePreset,
    get_preset,
)

__all__ = ["PRESETS", "QWEN_IMAGE_LATENT", "QwenImageDiTConfig", "QwenImagePreset", "get_preset"]
