"""Z-Image(-Turbo): the DiT and its presets.

    from models.z_image.transformer import ZImageTransformer          # the network (torch)
    from models.z_image.config import ZImageDiTConfig, get_preset, PRESETS   # description only (no torch)

Importing the package loads no torch; the network module is imported explicitly.
"""

from models.z_image.config import PRESETS, Z_IMAGE_LATENT, ZImageDiTConfig, ZImagePreset, get_preset

__all__ = ["PRESETS", "Z_IMAGE_LATENT", "ZImageDiTConfig", "ZImagePreset", "get_preset"]
