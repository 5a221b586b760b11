"""The FLUX.1 autoencoder ("ae") as a frozen, torch-free description.

The engine reads presets without importing torch, so this module imports nothing but the standard
library (tests/models/flux/test_vae.py pins that).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FLUX1_VAE", "FluxVAEConfig"]


@dataclass(frozen=True)
class FluxVAEConfig:
    """Shape and latent normalisation of a FLUX-style KL autoencoder (2-D, no quant convs).

    block_out_channels: width of each resolution level, highest resolution first; every level but the
        last halves H and W in the encoder (so the spatial stride is 2 ** (levels - 1)).
    layers_per_block: ResNet blocks per encoder level; the decoder has one more per level.
    latent_channels: channels of the latent z (the encoder emits twice that: mean and log-variance).
    norm_num_groups: GroupNorm groups of every norm (eps 1e-6, as in the released model).
    scaling_factor, shift_factor: latents seen by the DiT are (z - shift) * scale.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self) -> None:
        if not self.block_out_channels:
            raise ValueError("block_out_channels must list at least one level width")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {self.block_out_channels} must all be multiples of "
                             f"norm_num_groups ({self.norm_num_groups}); {bad} are not")
        if self.layers_per_block < 1 or self.latent_channels < 1:
            raise ValueError(f"layers_per_block ({self.layers_per_block}) and latent_channels "
                             f"({self.latent_channels}) must be >= 1")
        if self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scaling_factor}")

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent cell along H and W (8 for FLUX.1)."""
        return 2 ** (len(self.block_out_channels) - 1)


FLUX1_VAE = FluxVAEConfig()
"""The autoencoder shipped with FLUX.1-dev and FLUX.1-schnell (`ae.safetensors`, 83,819,683 parameters)."""
