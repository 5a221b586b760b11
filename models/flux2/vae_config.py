"""The FLUX.2 autoencoder as a frozen, torch-free description.

The engine reads presets without importing torch, so this module imports nothing but the standard library
and the (equally torch-free) FLUX.1 autoencoder config it extends; tests/models/flux2/test_vae.py pins that.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.flux.vae_config import FluxVAEConfig

__all__ = ["FLUX2_VAE", "Flux2VAEConfig"]


@dataclass(frozen=True)
class Flux2VAEConfig:
    """Shape and latent statistics of the FLUX.2 KL autoencoder.

    The network is FLUX.1's (same levels, ResNets, GroupNorms and mid attention) with `latent_channels` (32)
    and a 1x1 `quant_conv` after the encoder and `post_quant_conv` before the decoder. The DiT does not see
    those 32-channel latents: each 2x2 patch of them is folded into `patch * patch * latent_channels` (128)
    channels and normalised with the running mean and variance of a BatchNorm (`batch_norm_eps`); there is no
    scale or shift factor. `batch_norm_momentum` is only the checkpoint's training setting (the statistics are
    never updated here). block_out_channels, layers_per_block, norm_num_groups: as in `FluxVAEConfig`.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 32
    norm_num_groups: int = 32
    batch_norm_eps: float = 1e-4
    batch_norm_momentum: float = 0.1
    patch: int = 2

    def __post_init__(self) -> None:
        self.autoencoder  # noqa: B018 - FluxVAEConfig checks the shared fields
        if self.patch != 2:
            raise ValueError(f"patch must be 2 (FLUX.2 folds 2x2 latent patches into channels), got {self.patch}")
        if self.batch_norm_eps <= 0:
            raise ValueError(f"batch_norm_eps must be > 0, got {self.batch_norm_eps}")

    @property
    def autoencoder(self) -> FluxVAEConfig:
        """The FLUX.1-style encoder/decoder shape (no latent scale/shift: FLUX.2 normalises with its BatchNorm)."""
        return FluxVAEConfig(in_channels=self.in_channels, out_channels=self.out_channels,
                             block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                             latent_channels=self.latent_channels, norm_num_groups=self.norm_num_groups,
                             scaling_factor=1.0, shift_factor=0.0)

    @property
    def dit_channels(self) -> int:
        """Channels of the normalised latents the DiT denoises (128 for the release)."""
        return self.latent_channels * self.patch * self.patch

    @property
    def spatial_stride(self) -> int:
        """Pixels per row/column of the DiT's latents: the autoencoder's 8 times the 2x2 patch (16)."""
        return self.autoencoder.spatial_stride * self.patch


FLUX2_VAE = Flux2VAEConfig()
"""The autoencoder shipped with FLUX.2 (dev and klein): 84,046,115 parameters plus 257 BatchNorm buffer values."""
