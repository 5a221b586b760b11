"""Stage 3: latents -> video frames (Wan-VAE decode), as uint8 pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from models.wan.vae import WanVAE
from parallel.vae_decode import decode_patch_parallel


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
    def run(self, latents: torch.Tensor, parallel: bool = False,
            group: dist.ProcessGroup | None = None) -> np.ndarray:
        """latents (C, F', H', W') normalised -> frames (4(F'-1)+1, 8H', 8W', 3) uint8.

        parallel: a collective call in which each rank of `group` (default: the whole process group)
        decodes one strip of rows (parallel.vae_decode, equal to the single-rank decode).
        """
        x = latents.to(self.device, torch.float32)[None]
        video = decode_patch_parallel(self.vae, x, group)[0] if parallel else self.vae.decode(x)[0]
        return to_uint8_frames(video)
