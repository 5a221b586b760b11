"""FLUX.2 autoencoder: the FLUX.1 network with 32 latent channels, quant convs, and BatchNorm-normalised 2x2 patches.

Read top-down: encoder and decoder (FLUX.1's, each with its 1x1 quant conv) -> `Flux2VAE` (normalised
encode/decode, loading) -> config files. The building blocks are those of `models.flux.vae` (imported, not
copied), so the math is FLUX.1's: GroupNorm (eps 1e-6) + SiLU + 3x3 conv ResNets, one single-head attention
over all pixels in each mid block, asymmetric-pad stride-2 downsampling, nearest 2x upsampling.

What FLUX.2 adds, in the order the reference pipeline runs it:
- encode: encoder -> `quant_conv` (1x1, 64 -> 64) -> posterior mean (first 32 channels) -> fold every 2x2
  patch into channels, (B, 32, H/8, W/8) -> (B, 128, H/16, W/16) with channel c * 4 + 2 * di + dj ->
  (z - running_mean) / sqrt(running_var + eps) with the BatchNorm's running statistics (eps 1e-4).
- decode: the inverse: z * sqrt(running_var + eps) + running_mean -> unfold the patches -> `post_quant_conv`
  (1x1, 32 -> 32) -> decoder.
The BatchNorm is never run as a layer (its statistics are fixed), so the DiT's latents have no scale or
shift factor. Encode returns the posterior mean, as the reference image-conditioning path does.

Parameter names equal the keys of BFL's original file (FLUX.1's names plus `encoder.quant_conv`,
`decoder.post_quant_conv` and `bn.*`); the diffusers `vae/` folder goes through `models.flux2.vae_keys`.

Strip-parallel decode: `decode(latents, spatial=...)` runs on a strip of the DiT's latent rows. The BatchNorm
statistics, the patch unfold (each latent row becomes two) and `post_quant_conv` act per row, so the split
(`parallel.flux_vae_decode.FluxRowSplit`: halo rows for the 3x3 convs, image-wide GroupNorm statistics, the
gathered mid attention) is the FLUX.1 decoder's, unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.config_files import read_json
from models.flux.vae import Decoder, Encoder, RowSplit, infer_config_from_original as flux1_config_from_original
from models.flux2.vae_config import FLUX2_VAE, Flux2VAEConfig
from models.flux2.vae_keys import (
    diffusers_to_original,
    original_to_diffusers,
    strip_original_prefix,
    with_batch_counter,
)
from models.loading import (
    CheckpointError,
    StateDict,
    load_safetensors_dir,
    load_safetensors_file,
    load_strict,
    load_torch_file,
    meta_device,
    save_safetensors_sharded,
)

__all__ = ["DIFFUSERS_CLASS", "ORIGINAL_FILENAMES", "Flux2VAE", "config_from_diffusers_json",
           "config_to_diffusers_json", "infer_config_from_original", "patchify", "unpatchify"]

logger = logging.getLogger(__name__)

DIFFUSERS_CLASS = "AutoencoderKLFlux2"
ORIGINAL_FILENAMES = ("flux2-vae.safetensors", "flux2-vae.sft", "ae.safetensors")
"""Names looked for in a folder holding BFL's original file: diffusers' conversion script's default
(`flux2-vae.sft`, a safetensors file) and FLUX.1's `ae.safetensors`. A file path of any name also loads."""
_SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


# ---------------------------------------------------------------------------------------------
# 1. Encoder and decoder: FLUX.1's, each with its 1x1 quant conv
# ---------------------------------------------------------------------------------------------
class Flux2Encoder(Encoder):
    """(B, in, H, W) -> (B, 2 * latent, H/8, W/8): FLUX.1's encoder, then `quant_conv` on mean and log-variance."""

    def __init__(self, config: Flux2VAEConfig) -> None:
        super().__init__(config.autoencoder)
        moments = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(moments, moments, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(super().forward(x))


class Flux2Decoder(Decoder):
    """(B, latent, h, w) -> (B, out, 8h, 8w): `post_quant_conv`, then FLUX.1's decoder (with its row split)."""

    def __init__(self, config: Flux2VAEConfig) -> None:
        super().__init__(config.autoencoder)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, kernel_size=1)

    def forward(self, z: torch.Tensor, split: RowSplit | None = None) -> torch.Tensor:
        return super().forward(self.post_quant_conv(z), split)


def patchify(z: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """(B, C, h, w) -> (B, C * p * p, h / p, w / p); channel c * p * p + p * di + dj holds pixel
    (p i + di, p j + dj)."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // patch, patch, w // patch, patch).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(b, c * patch * patch, h // patch, w // patch)


def unpatchify(z: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """Inverse of `patchify`: (B, C * p * p, h, w) -> (B, C, p h, p w)."""
    b, c, h, w = z.shape
    z = z.reshape(b, c // (patch * patch), patch, patch, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(b, c // (patch * patch), h * patch, w * patch)


# ---------------------------------------------------------------------------------------------
# 2. The autoencoder
# ---------------------------------------------------------------------------------------------
class Flux2VAE(nn.Module):
    """FLUX.2 autoencoder: images in [-1, 1] <-> the DiT's normalised latents (B, 128, H/16, W/16)."""

    image_wide_norms = True
    """Its decoder's GroupNorms average over the whole image: a strip-parallel decode must share their sums."""

    def __init__(self, config: Flux2VAEConfig = FLUX2_VAE) -> None:
        super().__init__()
        self.config = config
        self.encoder = Flux2Encoder(config)
        self.decoder = Flux2Decoder(config)
        # Only its running statistics are used (fixed; the layer is never run, so never updates them).
        self.bn = nn.BatchNorm2d(config.dit_channels, eps=config.batch_norm_eps,
                                 momentum=config.batch_norm_momentum, affine=False, track_running_stats=True)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    def _statistics(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The BatchNorm's mean and sqrt(var + eps), (1, 128, 1, 1), computed as the reference pipeline does."""
        mean = self.bn.running_mean.view(1, -1, 1, 1).to(dtype)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.config.batch_norm_eps).to(dtype)
        return mean, std

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1], H and W multiples of 16 -> normalised posterior mean (B, 128, H/16, W/16)."""
        s = self.config.spatial_stride
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"images must be (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}")
        if images.shape[-2] % s or images.shape[-1] % s:
            raise ValueError(f"image height and width must be multiples of {s}, got "
                             f"{images.shape[-2]}x{images.shape[-1]}; crop or resize to a multiple of {s}")
        moments = self.encoder(images.to(self.dtype))
        z = patchify(moments[:, : self.config.latent_channels], self.config.patch)
        mean, std = self._statistics(z.dtype)
        return (z - mean) / std

    def decode(self, latents: torch.Tensor, spatial: RowSplit | None = None) -> torch.Tensor:
        """Normalised latents (B, 128, h, w) -> images (B, 3, 16h, 16w), nominally in [-1, 1] (not clamped).

        With `spatial`, `latents` is this rank's strip of latent rows and the result its strip of pixel rows.
        """
        if latents.ndim != 4 or latents.shape[1] != self.config.dit_channels:
            raise ValueError(f"latents must be (B, {self.config.dit_channels}, h, w) (the DiT's normalised 2x2 "
                             f"patches), got {tuple(latents.shape)}")
        z = latents.to(self.dtype)
        mean, std = self._statistics(z.dtype)
        return self.decoder(unpatchify(z * std + mean, self.config.patch), spatial)

    # ---- checkpoints ----
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> "Flux2VAE":
        """Load BFL's original file (the file, or a folder holding one of `ORIGINAL_FILENAMES`), a diffusers
        `vae/` folder (config.json + safetensors), or a diffusers release folder with a `vae/` subfolder.

        The original file carries no config: widths and depths are read off its tensors, GroupNorm uses 32
        groups and the BatchNorm eps is the release's 1e-4. Every missing, unexpected or mis-shaped key is an error.
        """
        path = Path(path)
        if path.is_dir():
            original = next((path / n for n in ORIGINAL_FILENAMES if (path / n).is_file()), None)
            if original is not None:
                path = original
            elif not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
                path = path / "vae"
        if path.is_file():
            raw = load_safetensors_file(path) if path.suffix in _SAFETENSORS_SUFFIXES else load_torch_file(path)
            sd = with_batch_counter(strip_original_prefix(raw))
            config = infer_config_from_original(sd, source=str(path))
            source = str(path)
        elif path.is_dir() and (path / "config.json").is_file():
            config_path = path / "config.json"
            config = config_from_diffusers_json(read_json(config_path), source=str(config_path))
            raw, source = load_safetensors_dir(path)
            sd = with_batch_counter(diffusers_to_original(raw, config))
        else:
            raise CheckpointError(f"no FLUX.2 VAE at {path}: expected BFL's file ({' or '.join(ORIGINAL_FILENAMES)}) "
                                  f"or a folder holding one, a diffusers vae/ folder with config.json, or a release "
                                  f"folder with vae/")
        logger.info("loading FLUX.2 VAE from %s (widths %s, %d latent channels)", source,
                    config.block_out_channels, config.latent_channels)
        with meta_device():
            model = cls(config)
        return load_strict(model, sd, source, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, layout: str = "original") -> None:
        """layout "original" -> `path` is BFL's safetensors file; "diffusers" -> folder with config.json +
        `diffusion_pytorch_model.safetensors`."""
        import json

        from safetensors.torch import save_file

        path = Path(path)
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if layout == "original":
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(sd, str(path))
        elif layout == "diffusers":
            save_safetensors_sharded(original_to_diffusers(sd, self.config), path)
            (path / "config.json").write_text(json.dumps(config_to_diffusers_json(self.config), indent=2))
        else:
            raise ValueError(f"layout must be 'original' or 'diffusers', got {layout!r}")


# ---------------------------------------------------------------------------------------------
# 3. Configs of checkpoints
# ---------------------------------------------------------------------------------------------
def infer_config_from_original(sd: StateDict, source: str = "<state dict>") -> Flux2VAEConfig:
    """Read the level widths, depth, channels and latent width off an original-layout state dict."""
    base = flux1_config_from_original(sd, source)
    if "bn.running_mean" not in sd or "encoder.quant_conv.weight" not in sd:
        raise CheckpointError(f"{source} is a FLUX.1-style autoencoder without FLUX.2's bn.running_mean and "
                              f"encoder.quant_conv.weight; load it with models.flux.vae.FluxVAE")
    return Flux2VAEConfig(in_channels=base.in_channels, out_channels=base.out_channels,
                          block_out_channels=base.block_out_channels, layers_per_block=base.layers_per_block,
                          latent_channels=base.latent_channels)


def config_from_diffusers_json(cfg: dict[str, Any], source: str = "config.json") -> Flux2VAEConfig:
    """diffusers `AutoencoderKLFlux2` config.json -> Flux2VAEConfig; refuses settings this network does not have."""
    if cfg.get("_class_name") != DIFFUSERS_CLASS:
        raise CheckpointError(f"{source} describes {cfg.get('_class_name')!r}, not {DIFFUSERS_CLASS!r}")
    widths = [int(c) for c in cfg.get("block_out_channels", FLUX2_VAE.block_out_channels)]
    levels = len(widths)
    decoder_widths = cfg.get("decoder_block_out_channels")
    unsupported = {
        "use_quant_conv": (cfg.get("use_quant_conv", True), True),
        "use_post_quant_conv": (cfg.get("use_post_quant_conv", True), True),
        "mid_block_add_attention": (cfg.get("mid_block_add_attention", True), True),
        "act_fn": (cfg.get("act_fn", "silu"), "silu"),
        "patch_size": (list(cfg.get("patch_size", [2, 2])), [2, 2]),
        "decoder_block_out_channels": (None if decoder_widths is None else [int(c) for c in decoder_widths],
                                       None if decoder_widths is None else widths),
        "down_block_types": (list(cfg.get("down_block_types", ["DownEncoderBlock2D"] * levels)),
                             ["DownEncoderBlock2D"] * levels),
        "up_block_types": (list(cfg.get("up_block_types", ["UpDecoderBlock2D"] * levels)),
                           ["UpDecoderBlock2D"] * levels),
    }
    bad = [f"{k}={got!r} (need {want!r})" for k, (got, want) in unsupported.items() if got != want]
    if bad:
        raise CheckpointError(f"{source}: not a FLUX.2 autoencoder; unsupported settings: {', '.join(bad)}")
    try:
        return Flux2VAEConfig(
            in_channels=int(cfg.get("in_channels", 3)),
            out_channels=int(cfg.get("out_channels", 3)),
            block_out_channels=tuple(widths),
            layers_per_block=int(cfg.get("layers_per_block", 2)),
            latent_channels=int(cfg.get("latent_channels", 32)),
            norm_num_groups=int(cfg.get("norm_num_groups", 32)),
            batch_norm_eps=float(cfg.get("batch_norm_eps", 1e-4)),
            batch_norm_momentum=float(cfg.get("batch_norm_momentum", 0.1)),
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: bad autoencoder setting ({exc})") from None


def config_to_diffusers_json(config: Flux2VAEConfig) -> dict[str, Any]:
    """Flux2VAEConfig -> a config.json that diffusers `AutoencoderKLFlux2.from_pretrained` accepts."""
    levels = len(config.block_out_channels)
    return {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": "0.42.1",
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(config.block_out_channels),
        "decoder_block_out_channels": None,
        "layers_per_block": config.layers_per_block,
        "act_fn": "silu",
        "latent_channels": config.latent_channels,
        "norm_num_groups": config.norm_num_groups,
        "sample_size": 1024,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
        "batch_norm_eps": config.batch_norm_eps,
        "batch_norm_momentum": config.batch_norm_momentum,
        "patch_size": [config.patch, config.patch],
    }
