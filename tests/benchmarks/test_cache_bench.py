"""The cache benchmark's metrics against hand-checkable cases, and one tiny end-to-end run of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from benchmarks import cache_bench as bench  # noqa: E402


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
