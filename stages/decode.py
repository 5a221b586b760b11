"""Stage 3: latents -> video frames (Wan-VAE decode), as uint8 pixels."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from models.wan.vae import WanVAE
from parallel.vae_decode import decode_patch_parallel

logger = logging.getLogger(__name__)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """video (3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8, rounded as diffusers' video processor does."""
    pixels = ((video.float().clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).contiguous().cpu().numpy()


class DecodeStage:
    """Decodes one request's latents; the VAE always runs in fp32 (as the reference does)."""

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        self.device = next(vae.parameters()).device

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "DecodeStage":
        return cls(WanVAE.from_pretrained(path, dtype=torch.float32, device=device))

    @torch.inference_mode()
    def run(self, latents: torch.Tensor, parallel: bool = False) -> np.ndarray:
        """latents (C, F', H', W') normalised -> frames (4(F'-1)+1, 8H', 8W', 3) uint8.

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
            video = decode_patch_parallel(self.vae, z)[0]
        else:
            if world_size > 1:
                logger.debug("%d latent rows cannot be split over %d ranks; each rank decodes the whole frame",
                             z.shape[-2], world_size)
            video = self.vae.decode(z)[0]
        return to_uint8_frames(video)
