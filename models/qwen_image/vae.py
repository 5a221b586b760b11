"""The Qwen-Image VAE: the Wan2.1 VAE network run on single images.

diffusers' `AutoencoderKLQwenImage` (the release's vae/) is the Wan2.1 video VAE architecture, fine-tuned: the
same causal 3-D convolutions, blocks, 8x spatial stride, state-dict keys and shapes as `AutoencoderKLWan`, and
the same per-channel latent normalisation (z - mean) / std with its own mean/std from vae/config.json. An image
is a video of one frame (T = 1), for which the causal schedule reduces to a single chunk. So this module
reuses `models.wan.vae.WanVAE` as it is and only adds and removes the frame axis:

    encode: image (B, 3, H, W) in [-1, 1] -> normalised latents (B, z, H/8, W/8)
    decode: normalised latents (B, z, h, w) -> image (B, 3, 8h, 8w) in [-1, 1] (clamped, as the reference)

`decode(latents, spatial=...)` keeps the `SpatialSplit` seam, so the exact strip-parallel decode
(`parallel.vae_decode.decode_patch_parallel`) and `stages.decode.DecodeStage` work unchanged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from models.loading import CheckpointError, save_safetensors_sharded
from models.wan.config import WanVAEConfig
from models.wan.vae import SpatialSplit, WanVAE
from models.wan.vae_keys import original_to_diffusers

__all__ = ["DIFFUSERS_CLASS", "QwenImageVAE", "config_to_diffusers_json"]

logger = logging.getLogger(__name__)

DIFFUSERS_CLASS = "AutoencoderKLQwenImage"
VAE_DIR = "vae"


class QwenImageVAE(WanVAE):
    """The Wan2.1 VAE on images: (B, 3, H, W) <-> normalised latents (B, z, H/8, W/8), fp32 out.

    The parameters (and so the checkpoint keys, in either layout) are the Wan VAE's; only the frame axis is
    handled here.
    """

    @staticmethod
    def _check_image_latents(latents: torch.Tensor, z: int) -> None:
        if latents.ndim != 4 or latents.shape[1] != z:
            raise ValueError(f"Qwen-Image latents must be (B, {z}, H, W) (one image, no frame axis), got "
                             f"{tuple(latents.shape)}")

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """image (B, 3, H, W) in [-1, 1], H and W multiples of 8 -> normalised posterior mean (B, z, H/8, W/8)."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
        return super().encode(image[:, :, None])[:, :, 0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, spatial: SpatialSplit | None = None) -> torch.Tensor:
        """Normalised latents (B, z, h, w) -> image (B, 3, 8h, 8w) in [-1, 1], fp32.

        With `spatial`, `latents` is this rank's row strip and the result its strip of pixel rows."""
        self._check_image_latents(latents, self.config.z_dim)
        return super().decode(latents[:, :, None], spatial)[:, :, 0]

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,  # type: ignore[override]
                        device: torch.device | str = "cpu") -> "QwenImageVAE":
        """Load the diffusers vae/ folder (config.json naming `AutoencoderKLQwenImage` + safetensors) of a release
        folder, or that vae/ folder itself. Strict: every missing, unexpected or mis-shaped key is an error."""
        path = Path(path).expanduser()
        folder = path / VAE_DIR if (path / VAE_DIR / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"no Qwen-Image VAE at {path}: expected a diffusers {VAE_DIR}/ folder with "
                                  f"config.json ({DIFFUSERS_CLASS}) and diffusion_pytorch_model.safetensors")
        model = super().from_pretrained(folder, dtype=dtype, device=device)
        assert isinstance(model, cls)
        return model

    def save_pretrained(self, path: str | Path, layout: str = "diffusers") -> None:
        """Write a diffusers vae/ folder as the release has it: config.json (`AutoencoderKLQwenImage`) and
        `diffusion_pytorch_model.safetensors` with diffusers' keys."""
        if layout != "diffusers":
            raise ValueError(f"the Qwen-Image VAE is released in the diffusers layout only; got layout {layout!r}")
        path = Path(path)
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_safetensors_sharded(original_to_diffusers(sd, self.config), path)
        (path / "config.json").write_text(json.dumps(config_to_diffusers_json(self.config), indent=2))
        logger.info("saved Qwen-Image VAE to %s", path)


def config_to_diffusers_json(config: WanVAEConfig) -> dict[str, Any]:
    """A config.json that diffusers `AutoencoderKLQwenImage.from_pretrained` reads (its parameter names)."""
    return {
        "_class_name": DIFFUSERS_CLASS,
        "base_dim": config.base_dim,
        "z_dim": config.z_dim,
        "dim_mult": list(config.dim_mult),
        "num_res_blocks": config.num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": list(config.temperal_downsample),
        "dropout": 0.0,
        "input_channels": 3,
        "latents_mean": list(config.latents_mean),
        "latents_std": list(config.latents_std),
    }
