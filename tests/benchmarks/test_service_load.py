"""The service load benchmark (benchmarks/service_load.py): a short real run above capacity, in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.service_load import _percentile

REPO = Path(__file__).resolve().parents[2]


def test_percentile_is_nearest_rank() -> None:
    assert _percentile([], 0.5) is None
    assert _percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert _percentile([float(v) for v in range(1, 101)], 0.95) == 95.0


@pytest.mark.slow
def test_overload_is_refused_with_retry_after_and_nothing_accepted_is_lost(tmp_path: Path) -> None:
    """A queue of 2 and 12 creates per second of jobs that take about 0.2-0.5 s each (the embedded model's
    64x64x17 frames, 8 steps): the service can finish at most a few per second, so some answers must be 429,
    and every accepted job completes."""
    out = tmp_path / "load.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/service_load.py", "--clients", "4", "--rate", "12", "--duration", "3",
         "--drain", "90", "--size", "64x64x17x8", "--set", "scheduler.max_pending_jobs=2",
         "--set", "scheduler.retry_after_s=1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["offered"] == result["accepted"] + result["refused_429"] + sum(result["other_status"].values())
    assert result["refused_429"] > 0 and result["retry_after_values"] == ["1"], result
    assert result["other_status"] == {}, result["other_status"]
    assert result["lost"] == 0 and result["failed"] == 0
    assert result["completed"] == result["accepted"] > 0
    assert result["ingress_rss_mb"]["peak"] > 0 and out.with_suffix(".png").stat().st_size > 0
