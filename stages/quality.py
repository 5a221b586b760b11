"""How close a cached (or otherwise approximate) output is to full compute: PSNR and SSIM per frame.

Both compare decoded uint8 frames (H, W, 3) of the same prompt and seed. PSNR is 10 log10(255^2 / MSE) over
all pixels and channels (identical frames count as MAX_PSNR); SSIM follows Wang et al. 2004 (11x11 Gaussian
window, sigma 1.5, K1 0.01, K2 0.03, L 255, "valid" windows), per RGB channel, averaged. The calibration tool
and the cache benchmark both measure with these.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

MAX_PSNR = 100.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 frames (H, W, 3); identical frames give MAX_PSNR."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return MAX_PSNR if mse == 0 else min(MAX_PSNR, 10 * math.log10(255.0 ** 2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two uint8 frames (H, W, 3): Gaussian 11x11 window, sigma 1.5, per channel, averaged."""
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-coords ** 2 / (2 * 1.5 ** 2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None].expand(3, 1, 11, 11)
    x = torch.from_numpy(a).double().permute(2, 0, 1)[None]
    y = torch.from_numpy(b).double().permute(2, 0, 1)[None]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=3)  # "valid" windows only, as the reference implementation

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(value.mean())


def video_quality(frames: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(mean PSNR, mean SSIM) over the frames of a video against the reference video."""
    return (float(np.mean([psnr(f, r) for f, r in zip(frames, reference)])),
            float(np.mean([ssim(f, r) for f, r in zip(frames, reference)])))
