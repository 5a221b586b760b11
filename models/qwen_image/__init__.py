"""Qwen-Image: the DiT, its text encoder and VAE, presets and the registry entry.

    from models.qwen_image.transformer import QwenImageTransformer          # the DiT (torch)
    from models.qwen_image.text_encoder import QwenImageTextEncoder         # Qwen2.5-VL's language model (torch)
    from models.qwen_image.vae import QwenImageVAE                          # the Wan2.1 VAE on images (torch)
    from models.qwen_image.config import QwenImageDiTConfig, get_preset, PRESETS   # description only (no torch)

Importing the package loads no torch; the network modules are imported explicitly. `family.py` is the registry
entry, `tiny.py` writes random tiny release folders.
"""

from models.qwen_image.config import (
    PRESETS,
    QWEN_IMAGE_LATENT,
    QwenImageDiTConfig,
    QwenImagePreset,
    get_preset,
    match_preset,
)

__all__ = ["PRESETS", "QWEN_IMAGE_LATENT", "QwenImageDiTConfig", "QwenImagePreset", "get_preset", "match_preset"]
