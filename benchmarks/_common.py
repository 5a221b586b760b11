"""Shared helpers of the service benchmarks (serve_overhead.py, pipeline_throughput.py).

Request sizes, the tiny model in a temp folder, the machine record (load average before/after),
interval arithmetic over the jobs' `stage_times`, and the markdown table printer.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("text_encode", "denoise", "decode")
PROMPT = "a red circle moving left on a white background"


@dataclass(frozen=True)
class Size:
    """One request shape: HEIGHTxWIDTHxFRAMESxSTEPS, e.g. 64x64x17x20."""

    height: int
    width: int
    frames: int
    steps: int

    @classmethod
    def parse(cls, text: str) -> "Size":
        try:
            h, w, f, s = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"size must look like HEIGHTxWIDTHxFRAMESxSTEPS (e.g. 64x64x17x20), "
                             f"got {text!r}") from None
        return cls(h, w, f, s)

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}f x{self.steps}st"

    @property
    def spec(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}x{self.steps}"

    def params(self, seed: int, **extra: Any) -> dict[str, Any]:
        return {"prompt": PROMPT, "height": self.height, "width": self.width, "num_frames": self.frames,
                "num_inference_steps": self.steps, "seed": seed, **extra}


def parse_sizes(text: str) -> list[Size]:
    return [Size.parse(s) for s in text.split(",") if s.strip()]


def write_tiny_model(folder: Path) -> str:
    """wan-tiny with seeded random weights in `folder` (never the user's cache)."""
    from models.wan.default_model import write_random_checkpoint

    return str(write_random_checkpoint(folder / "wan-tiny"))



def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def machine(load_before: Sequence[float], **extra: Any) -> dict[str, Any]:
    import ray
    import torch

    return {"cores": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "loadavg_1m_5m_15m_before": list(load_before), "loadavg_1m_5m_15m_after": loadavg(),
            "env_OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "note": "shared machine; other jobs may have been running", **extra}


def command(script: str, argv: Sequence[str] | None) -> str:
    return (f".venv/bin/python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else math.nan


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.fmean(values) if values else math.nan


# ---------------------------------------------------------------------------------------------
# Intervals (epoch seconds) from JobRecord.stage_times
# ---------------------------------------------------------------------------------------------
def union(intervals: Iterable[Sequence[float]]) -> list[tuple[float, float]]:
    """Merged, sorted, non-overlapping intervals."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted((float(a), float(b)) for a, b in intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def busy_time(intervals: Iterable[Sequence[float]], lo: float = -math.inf, hi: float = math.inf) -> float:
    return sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in union(intervals))


def time_with_at_least(stage_intervals: dict[str, list[Sequence[float]]], k: int, lo: float, hi: float) -> float:
    """Seconds within [lo, hi] during which at least `k` stages were busy (a stage is busy while any job is in it)."""
    events: list[tuple[float, int]] = []
    for intervals in stage_intervals.values():
        for a, b in union(intervals):
            a, b = max(a, lo), min(b, hi)
            if b > a:
                events += [(a, 1), (b, -1)]
    events.sort(key=lambda e: (e[0], e[1]))  # ends before starts at the same instant
    total, depth, last = 0.0, 0, lo
    for t, delta in events:
        if depth >= k:
            total += t - last
        depth += delta
        last = t
    return total


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float) -> str:
    return "n/a" if seconds is None or math.isnan(seconds) else f"{1000 * seconds:.0f}"


# ---------------------------------------------------------------------------------------------
# Probes of the per-dispatch costs (to explain overheads)
# ---------------------------------------------------------------------------------------------
def probe_job_store_update_ms(folder: Path, n: int = 30) -> float:
    """Median ms of one `JobStore.update` (one SQLite transaction, synchronous=FULL) in `folder`.

    The engine does one per denoise chunk and a few per stage boundary.
    """
    import time

    from actors.job_store import JobStore

    store = JobStore(folder / "probe-jobs.sqlite")
    job = store.create({"prompt": "probe"})
    times = []
    for i in range(n):
        start = time.perf_counter()
        store.update(job.id, step=i)
        times.append(time.perf_counter() - start)
    return 1000 * median(times)


def probe_ray_call_ms(n: int = 50) -> float:
    """Median ms of a no-op Ray actor method call awaited from the driver (the floor of one dispatch)."""
    import time

    import ray

    @ray.remote(num_cpus=0)
    class Noop:
        def call(self, x: Any = None) -> Any:
            return x

    actor = Noop.remote()
    ray.get(actor.call.remote())
    times = []
    for _ in range(n):
        start = time.perf_counter()
        ray.get(actor.call.remote())
        times.append(time.perf_counter() - start)
    ray.kill(actor)
    return 1000 * median(times)
