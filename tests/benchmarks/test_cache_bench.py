"""The cache benchmark's metrics against hand-checkable cases, and one tiny end-to-end run of it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from benchmarks import cache_bench as bench  # noqa: E402


def test_psnr_and_ssim() -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert bench.psnr(frame, frame) == bench.MAX_PSNR and bench.ssim(frame, frame) == pytest.approx(1.0)
    shifted = np.clip(frame.astype(int) + 10, 0, 255).astype(np.uint8)
    mse = np.mean((shifted.astype(float) - frame) ** 2)
    assert bench.psnr(frame, shifted) == pytest.approx(10 * np.log10(255 ** 2 / mse))
    noisy = np.clip(frame + rng.normal(0, 40, frame.shape), 0, 255).astype(np.uint8)
    assert 0 < bench.ssim(frame, noisy) < bench.ssim(frame, shifted) < 1


def test_pareto_front() -> None:
    points = [(1.0, 40.0, "a"), (2.0, 30.0, "b"), (1.5, 29.0, "c"), (3.0, 20.0, "d"), (2.0, 25.0, "e")]
    assert bench.pareto(points) == ["a", "b", "d"]


def test_a_tiny_run_writes_json_plot_and_sheet(tmp_path: Path) -> None:
    out = tmp_path / "cache.json"
    report = bench.main(["--prompts", "1", "--steps", "6", "--only", "easycache 0.1", "pab s2c3",
                         "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["setting"] for r in saved["results"]] == ["easycache 0.1", "pab s2c3"] == \
        [r["setting"] for r in report["results"]]
    assert all(r["dit_speedup"] > 0 and 0 < r["ssim"] <= 1 for r in saved["results"])
    assert out.with_suffix(".png").stat().st_size > 0 and (tmp_path / "cache_sheet.png").stat().st_size > 0
