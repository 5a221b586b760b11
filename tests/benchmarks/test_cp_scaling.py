"""The context-parallel scaling benchmark (benchmarks/cp_scaling.py): its arithmetic, and one tiny end-to-end run."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import cp_scaling as cp
from benchmarks.dit_forward import forward_flops
from models.wan.config import WAN21_T2V_1_3B
from parallel.mesh import ParallelLayout


def test_speedup_efficiency_and_paired_ratio_from_per_round_times() -> None:
    baseline = [4.0, 5.0, 6.0]
    rows = cp.scaling_rows(baseline, {"ulysses2": [2.0, 2.0, 4.0], "ring2": [5.0, 5.0, 5.0]},
                           {"ulysses2": 2, "ring2": 2})
    uly, ring = rows
    assert uly["method"] == "ulysses2" and uly["median_s"] == 2.0
    assert uly["speedup"] == pytest.approx(2.5) and uly["efficiency"] == pytest.approx(1.25)
    assert uly["paired_speedup"] == pytest.approx(2.0)  # median of 4/2, 5/2, 6/4
    assert uly["best_s"] == 2.0 and uly["best_speedup"] == pytest.approx(2.0)
    assert ring["speedup"] == pytest.approx(1.0) and ring["efficiency"] == pytest.approx(0.5)


def test_noise_measures_spread_and_median_absolute_deviation() -> None:
    v = cp.noise([1.0, 1.5, 2.0])
    assert v["spread"] == pytest.approx(1.0) and v["rel_mad"] == pytest.approx(1 / 3)


def test_rounds_where_another_process_kept_a_core_busy_are_not_clean() -> None:
    times = {"baseline": [4.0, 4.0, 4.0], "ulysses2": [2.0, 4.0, 2.0]}
    foreign = {"baseline": [0.0, 0.1, 4.0], "ulysses2": [0.1, 3.6, 0.0]}  # CPU s of other processes
    cores = cp.foreign_cores(times, foreign)
    assert cores == {"baseline": [0.0, 0.025, 1.0], "ulysses2": [0.05, 0.9, 0.0]}
    assert cp.clean_rounds(cores) == [0]
    assert cp.clean_rounds(cores, limit=1.0) == [0, 1, 2]
    assert cp.clean_rounds({"a": [math.nan, 0.0]}) == [0, 1]  # no /proc/stat: nothing is known to disturb


def test_flop_bound_counts_the_text_side_as_replicated() -> None:
    cfg = WAN21_T2V_1_3B
    total = forward_flops(cfg, 1, 4680)
    replicated = cp.replicated_flops(cfg)
    assert 0 < replicated < total
    assert cp.flop_bound_speedup(total, replicated, 1) == pytest.approx(1.0)
    assert 1.9 < cp.flop_bound_speedup(total, replicated, 2) < 2.0
    assert cp.flop_bound_speedup(total, 0.0, 2) == pytest.approx(2.0)


def test_layout_names_round_trip_and_bad_names_fail() -> None:
    for layout in (ParallelLayout(ulysses_degree=2), ParallelLayout(ring_degree=2),
                   ParallelLayout(ring_degree=2, ulysses_degree=4)):
        assert cp.parse_layout(str(layout)) == layout
    for bad in ("ulysses", "ring2xring2", "tree2"):
        with pytest.raises(ValueError, match="must look like"):
            cp.parse_layout(bad)


def test_every_subject_leads_a_round_in_turn() -> None:
    names = ["baseline", "concurrent", "ulysses2"]
    assert [cp.rotated(names, i)[0] for i in range(4)] == ["baseline", "concurrent", "ulysses2", "baseline"]
    assert sorted(cp.rotated(names, 1)) == sorted(names)


@pytest.mark.slow
def test_tiny_run_writes_the_report_and_parallel_outputs_match(tmp_path) -> None:
    """wan-tiny on 35 tokens (odd: both layouts pad), fp32, one round: ~10 s, mostly spawning the 2 ranks."""
    out = tmp_path / "cp.json"
    report = cp.main(["--preset", "wan-tiny", "--frames", "1", "--height", "10", "--width", "14", "--dtype",
                      "float32", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["settings"]["tokens"] == 35 and saved["settings"]["dim"] == 64
    assert {"torch", "cores", "date"} <= set(saved["machine"])
    assert [r["method"] for r in saved["results"]] == ["ulysses2", "ring2"]
    for row in report["results"]:
        assert row["ranks"] == 2 and row["median_s"] > 0 and math.isfinite(row["speedup"])
        assert row["efficiency"] == pytest.approx(row["speedup"] / 2)
        assert row["output_matches"] and row["rel_diff"] < 1e-5
    assert saved["per_rank"][0]["torch_threads"] == saved["per_rank"][1]["torch_threads"] == 1
