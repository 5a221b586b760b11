"""Stage 3: latents -> video frames or an image (the family's VAE decode), as uint8 pixels."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from models.family import ModelDescription
from models.registry import describe, family_module
from parallel.vae_decode import RowSplit, decode_patch_parallel

logger = logging.getLogger(__name__)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """video (3, T, H, W) or an image (3, H, W) in [-1, 1] -> (T, H, W, 3) uint8 (T = 1 for an image),
    rounded as diffusers' video and image processors do."""
    if video.ndim == 3:
        video = video[:, None]
    pixels = ((video.float().clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def _row_split(vae: Any) -> type[RowSplit]:
    """The strip split of a VAE: plain halo exchange, or with image-wide GroupNorm sums (FLUX.1)."""
    if getattr(vae, "image_wide_norms", False):
        from parallel.flux_vae_decode import FluxRowSplit

        return FluxRowSplit
    return RowSplit


class DecodeStage:
    """Decodes one request's latents; the VAE always runs in fp32 (as the references do).

    vae: any family's VAE with `decode(latents (B, C, [F,] H', W'), spatial=...) -> pixels in [-1, 1]`.
    """

    def __init__(self, vae: Any) -> None:
        self.vae = vae
        self.device = next(vae.parameters()).device

    @classmethod
    def from_pretrained(cls, model: ModelDescription | str | Path, device: str | torch.device = "cpu"
                        ) -> "DecodeStage":
        """The VAE of a checkpoint folder (or its description), by the family's factory."""
        model = model if isinstance(model, ModelDescription) else describe(model)
        return cls(family_module(model.family).load_decoder(model, device=device))

    @torch.inference_mode()
    def run(self, latents: torch.Tensor, parallel: bool = False) -> np.ndarray:
        """latents (C, [F',] H', W') normalised -> frames (T, 8H', 8W', 3) uint8 (video: T = 4(F'-1)+1; image: 1).

        parallel: every rank of the default torch.distributed group calls this with the same latents
        and decodes one strip of rows (`decode_patch_parallel`); every rank gets the full frames,
        equal to the single-rank decode up to float summation order. A frame with fewer latent rows
        than ranks cannot be split, so then every rank decodes it whole (still exact, and small).
        """
        if parallel and not dist.is_initialized():
            raise RuntimeError("a parallel decode needs the torch.distributed process group of its ranks; "
                               "init it first (every rank), or decode with parallel=False")
        z = latents.to(self.device, torch.float32)[None]
        world_size = dist.get_world_size() if parallel else 1
        if world_size > 1 and z.shape[-2] >= world_size:
            pixels = decode_patch_parallel(self.vae, z, split_cls=_row_split(self.vae))[0]
        else:
            if world_size > 1:
                logger.debug("%d latent rows cannot be split over %d ranks; each rank decodes the whole frame",
                             z.shape[-2], world_size)
            pixels = self.vae.decode(z)[0]
        return to_uint8_frames(pixels)
