"""The quality metrics of the calibration tool and the cache benchmark, on hand-checkable cases."""

from __future__ import annotations

import numpy as np
import pytest

from stages.quality import MAX_PSNR, psnr, ssim


def test_psnr_and_ssim() -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert psnr(frame, frame) == MAX_PSNR and ssim(frame, frame) == pytest.approx(1.0)
    shifted = np.clip(frame.astype(int) + 10, 0, 255).astype(np.uint8)
    mse = np.mean((shifted.astype(float) - frame) ** 2)
    assert psnr(frame, shifted) == pytest.approx(10 * np.log10(255 ** 2 / mse))
    noisy = np.clip(frame + rng.normal(0, 40, frame.shape), 0, 255).astype(np.uint8)
    assert 0 < ssim(frame, noisy) < ssim(frame, shifted) < 1
