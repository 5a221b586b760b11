"""Context-parallel scaling on CPU: one rank x one thread vs two ranks x one thread each, Ulysses and Ring.

One DiT forward (batch 1, one guidance branch: CFG parallel is not measured here) of a Wan2.1-1.3B-wide
model (dim 1536, 12 heads, ffn 8960, text 512 x 4096) cut to `--layers` blocks, every parameter random
from `--seed` (each rank builds the same weights), on a long sequence: by default 3 latent frames of
the 480p grid (16 x 3 x 60 x 104 latent -> 3 x 30 x 52 = 4,680 tokens). bf16 by default, the faster
dtype on this CPU (benchmarks/dit_forward.py: 2.9x fp32).

All subjects run in ONE `parallel.launch.run_local` spawn of 2 ranks (gloo, `--threads` torch threads
per rank), interleaved forward by forward: every round runs each subject once, the order rotating per
round. The subjects:
- baseline: the plain model forward on rank 0 while rank 1 waits in a barrier (its CPU time over that
  wait is recorded: a blocked gloo barrier sleeps);
- concurrent: the same plain full forward on every rank at once, no communication. Not a parallel
  method: how much two busy ranks slow each other down on this machine (shared memory bandwidth,
  caches, clock), which no context-parallel method can avoid;
- ulysses2, ring2 (`--layouts`): `stages.runner.BlockRunner` over the 2 ranks.
Each subject has its own copy of the weights, built from the same seed (the prepacked fp32 GEMM
weights depend on the row count, which differs between 1 and 2 ranks). Why one spawn and not one per
subject: on this shared machine a first version that ran baseline, ulysses2, ring2, baseline in four
spawns (~30 s each) saw the same subject 40 % faster or slower from one window to the next, more than
the effect measured; interleaving forward by forward puts every subject in the same windows.

Timing: `--warmup` untimed rounds (the first also prepacks the GEMM weights), then `--repeats` timed
rounds; a forward is preceded by a `dist.barrier()`, every rank times its own forward and a parallel
forward counts its slowest rank (max over ranks). A subject's time is the median over the rounds used
(see Disturbance);
speedup = baseline median / subject median; also recorded: the median of the per-round ratios
("paired", cancels drifts slower than a round) and the ratio of the fastest forwards ("best-of":
other jobs only ever add time); parallel efficiency = speedup / ranks.

Disturbance: around every forward rank 0 reads the machine's busy CPU time (/proc/stat, 10 ms ticks)
and subtracts the ranks' own CPU time: what is left is other processes' work, as the cores they kept
busy. With 2 cores one foreign busy thread makes a 2-rank forward wait for the rank that shares its
core (up to 2x slower), while the 1-rank baseline still has a core to itself, so a disturbed round
says nothing about scaling. A round is clean when other processes kept <= 0.1 core busy during each
of its forwards; the table uses the clean rounds when there are at least 2, else all rounds, and
the all-rounds speedups are printed and stored next to it. The run is flagged as contaminated when
fewer than 2 rounds are clean or the rounds used spread (median absolute deviation) by more than 10 %
of their median: re-run on a quiet machine. The second check is needed because /proc/stat only sees
this VM: other guests of the host slow its cores too (measured here: the same baseline forward took
2.9 to 5.5 s within two minutes with nothing else running in the VM and ~0 steal).

Checks and explanations recorded next to the times:
- max |parallel - single-rank| of the velocity (rank 0's, which all-gathered the full output), against
  a bound relative to the output's scale, so a fast but wrong run is visible (the run fails after
  writing the JSON);
- the FLOP bound of the speedup: the text MLP, the time MLP and the per-layer cross-attention K/V
  projections of the 512 text tokens run on every rank (Amdahl); everything else divides by the ranks;
  the contention bound multiplies it by baseline / concurrent (the ranks compute at the concurrent speed);
- a probe of the collectives one forward does, timed on the same ranks after the forwards with the
  same tensor shapes: Ulysses' all-to-all (4 per layer), Ring's K/V exchange (ring2: 1 per layer,
  overlapped with attention on the local block) and the final all-gather of the head output.

    .venv/bin/python -m benchmarks.cp_scaling --layers 2 --frames 3 --height 60 --width 104 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runnable as `python benchmarks/cp_scaling.py`

from benchmarks._common import RESULTS, command, loadavg, machine, median, table  # noqa: E402
from benchmarks.dit_forward import forward_flops  # noqa: E402
from models.random_init import randomize_parameters  # noqa: E402
from models.wan.config import WanDiTConfig, get_preset  # noqa: E402
from models.wan.transformer import WanTransformer  # noqa: E402
from models.conditioning import Conditioning  # noqa: E402
from parallel.dit import shard_bounds  # noqa: E402
from stages.runner import BlockRunner  # noqa: E402
from parallel.launch import run_local  # noqa: E402
from parallel.mesh import LayoutError, ParallelLayout, ParallelMesh  # noqa: E402

logger = logging.getLogger("cp_scaling")

BASELINE = "baseline"
CONCURRENT = "concurrent"
NOISE_LIMIT = 0.10
"""A round is disturbed when other processes kept more than this many cores busy during one of its
forwards; the run is contaminated when the rounds used still spread (median absolute deviation) by more
than this fraction of their median."""
MIN_CLEAN_ROUNDS = 2
"""The table uses only the undisturbed rounds when there are at least this many, else all rounds (flagged)."""
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}
"""Largest accepted max |parallel - single| / max |single| per dtype. The parallel paths add the same
terms in another order (log-sum-exp merge in fp32, per-shard GEMMs); a wrong RoPE slice or a missing
mask gives differences of the order of the output itself."""


@dataclass(frozen=True)
class Spec:
    """What every rank builds and runs: the same model, inputs and loop."""

    config: WanDiTConfig
    dtype: str
    latent: tuple[int, int, int, int]  # (C, F, H, W)
    seed: int
    warmup: int
    repeats: int

    @property
    def grid(self) -> tuple[int, int, int]:
        pt, ph, pw = self.config.patch_size
        return self.latent[1] // pt, self.latent[2] // ph, self.latent[3] // pw

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)


# ---------------------------------------------------------------------------------------------
# Layouts and arithmetic
# ---------------------------------------------------------------------------------------------
def parse_layout(name: str) -> ParallelLayout:
    """'ulysses2', 'ring2', 'ring2xulysses2' (the `str(ParallelLayout)` form) -> ParallelLayout."""
    degrees: dict[str, int] = {}
    for part in name.split("x"):
        match = re.fullmatch(r"(cfg|ring|ulysses)(\d+)", part)
        if match is None or match[1] in degrees:
            raise ValueError(f"layout {name!r} must look like ulysses2, ring2 or ring2xulysses2")
        degrees[match[1]] = int(match[2])
    return ParallelLayout(cfg_degree=degrees.get("cfg", 1), ring_degree=degrees.get("ring", 1),
                          ulysses_degree=degrees.get("ulysses", 1))


def replicated_flops(cfg: WanDiTConfig) -> float:
    """FLOPs of one forward (batch 1) that every sequence-parallel rank repeats in full: the text MLP
    and time MLP (`prepare`) and each layer's cross-attention K/V projections of the text tokens."""
    d, text = cfg.dim, cfg.text_len
    text_mlp = 2 * text * (cfg.text_dim * d + d * d)
    time_mlp = 2 * (cfg.freq_dim * d + d * d + 6 * d * d)
    cross_kv = 2 * text * d * 2 * d
    return float(text_mlp + time_mlp + cfg.num_layers * cross_kv)


def flop_bound_speedup(total: float, replicated: float, ranks: int) -> float:
    """Amdahl: the speedup if the non-replicated FLOPs split perfectly over `ranks` and nothing else cost."""
    return total / (replicated + (total - replicated) / ranks)


def scaling_rows(baseline: Sequence[float], subjects: dict[str, Sequence[float]],
                 ranks: dict[str, int]) -> list[dict[str, Any]]:
    """One row per subject from per-repeat forward times in seconds (repeat i of every list ran in round i).

    speedup = median(baseline) / median(subject); paired_speedup = median over repeats of
    baseline[i] / subject[i]; best_speedup = min(baseline) / min(subject) (other jobs only ever add
    time, so the fastest repeat is the least disturbed); efficiency = speedup / ranks.
    """
    reference = median(baseline)
    rows = []
    for name, times in subjects.items():
        med = median(times)
        speedup = reference / med
        rows.append({"method": name, "ranks": ranks[name], "median_s": med, "speedup": speedup,
                     "paired_speedup": median(b / s for b, s in zip(baseline, times)),
                     "best_s": min(times), "best_speedup": min(baseline) / min(times),
                     "efficiency": speedup / ranks[name]})
    return rows


def noise(times: Sequence[float]) -> dict[str, float]:
    """spread = (slowest - fastest) / fastest; rel_mad = median |t - median| / median (robust to one outlier)."""
    med = median(times)
    return {"spread": max(times) / min(times) - 1, "rel_mad": median(abs(t - med) for t in times) / med}


def foreign_cores(times: dict[str, Sequence[float]],
                  foreign_cpu_s: dict[str, Sequence[float]]) -> dict[str, list[float]]:
    """Per subject and round: CPU seconds other processes used during the forward / its duration."""
    return {n: [c / t for c, t in zip(foreign_cpu_s[n], ts)] for n, ts in times.items()}


def clean_rounds(cores: dict[str, Sequence[float]], limit: float = NOISE_LIMIT) -> list[int]:
    """The rounds in which other processes kept at most `limit` cores busy during every subject's forward.
    NaN (no /proc/stat) counts as clean."""
    rounds = len(next(iter(cores.values())))
    return [i for i in range(rounds) if not any(c[i] > limit for c in cores.values())]


def machine_cpu_s() -> tuple[float, float]:
    """(busy, steal): CPU seconds this machine's CPUs have run any process, and run other guests of the
    hypervisor, since boot, summed over CPUs (/proc/stat; NaN where it does not exist)."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    except (OSError, ValueError):
        return math.nan, math.nan
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def rotated(names: Sequence[str], i: int) -> list[str]:
    """The subjects' order in round i: rotated by one each round, so each runs first equally often."""
    k = i % len(names)
    return [*names[k:], *names[:k]]


# ---------------------------------------------------------------------------------------------
# The ranks (run in the spawned processes)
# ---------------------------------------------------------------------------------------------
def build(spec: Spec) -> tuple[WanTransformer, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The seeded model (weights cast to spec.dtype) and inputs: x (1, C, F, H, W) fp32, t (1,),
    context (1, text_len, text_dim)."""
    model = WanTransformer(spec.config)
    randomize_parameters(model, seed=spec.seed)
    model.cast_weights(getattr(torch, spec.dtype)).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(spec.seed + 1)
    x = torch.randn(1, *spec.latent, generator=gen)
    context = torch.randn(1, spec.config.text_len, spec.config.text_dim, generator=gen)
    return model, x, torch.full((1,), 700.0), context


def _median_time(fn: Callable[[], Any], n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def probe_collectives(spec: Spec, mesh: ParallelMesh, n: int = 5) -> dict[str, float]:
    """Median seconds of each collective one forward of this layout does, at the forward's shapes,
    and `per_forward_s`, their sum over a forward (for Ring an upper bound: it overlaps attention)."""
    cfg, layout = spec.config, mesh.layout
    dtype = getattr(torch, spec.dtype)
    shard = shard_bounds(spec.tokens, layout.sp_degree, 0)[2]
    out: dict[str, float] = {}
    per_forward = 0.0
    if layout.ulysses_degree > 1:
        # seq_to_heads / heads_to_seq send a (u, B, Ls, H/u, D) tensor: the bytes of (B, Ls, H, D)
        send = torch.randn(1, shard, cfg.num_heads, cfg.head_dim).to(dtype)
        recv = torch.empty_like(send)
        out["all_to_all_s"] = _median_time(
            lambda: dist.all_to_all_single(recv, send, group=mesh.ulysses_group), n)
        per_forward += 4 * cfg.num_layers * out["all_to_all_s"]
    if layout.ring_degree > 1:
        # ring_attention passes a stacked (2, B, Lb, h, D) K/V block r - 1 times per layer
        heads = cfg.num_heads // layout.ulysses_degree
        kv = torch.randn(2, 1, shard * layout.ulysses_degree, heads, cfg.head_dim).to(dtype)
        incoming = torch.empty_like(kv)

        def exchange() -> None:
            works = [dist.isend(kv, dst=mesh.ring_next, group=mesh.ring_group),
                     dist.irecv(incoming, src=mesh.ring_prev, group=mesh.ring_group)]
            for work in works:
                work.wait()

        out["ring_exchange_s"] = _median_time(exchange, n)
        per_forward += (layout.ring_degree - 1) * cfg.num_layers * out["ring_exchange_s"]
    # the head output (B, Ls, prod(patch) * out_dim) fp32, all-gathered once per forward
    head = torch.randn(1, shard, math.prod(cfg.patch_size) * cfg.out_dim)
    parts = [torch.empty_like(head) for _ in range(layout.sp_degree)]
    out["all_gather_s"] = _median_time(lambda: dist.all_gather(parts, head, group=mesh.sp_group), n)
    out["per_forward_s"] = per_forward + out["all_gather_s"]
    return out


def run_ranks(rank: int, world_size: int, spec: Spec, layouts: dict[str, ParallelLayout]) -> dict[str, Any]:
    """Every subject on this rank, interleaved: `spec.warmup` + `spec.repeats` rounds of one forward each.

    The baseline runs on rank 0 only (the other ranks wait in a barrier and record their CPU time
    meanwhile); `concurrent` runs the same plain forward on every rank at once. Returns per subject this
    rank's forward times (timed rounds) and warm-up times, and on rank 0 the CPU time other processes
    used during each forward, the max |subject - baseline| of the velocity and max |baseline|.
    """
    if rank == 0:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    began = time.perf_counter()
    model, x, t, context = build(spec)
    forwards: dict[str, Callable[[], torch.Tensor]] = {}
    if rank == 0:
        forwards[BASELINE] = lambda: model(x, t, context)
    forwards[CONCURRENT] = lambda: model(x, t, context)
    meshes = {}
    for name, layout in layouts.items():  # collective: every rank creates the groups in the same order
        mesh = ParallelMesh.build(layout)
        assert mesh is not None, "every layout spans the whole group"
        meshes[name] = mesh
        runner = BlockRunner(copy.deepcopy(model), mesh)
        conditioning = [Conditioning(c) for c in context]
        forwards[name] = lambda r=runner: r(x, t, conditioning)
    setup_s = time.perf_counter() - began

    names = [BASELINE, CONCURRENT, *layouts]
    times: dict[str, list[float]] = {n: [] for n in names}
    warmup: dict[str, list[float]] = {n: [] for n in names}
    # Rank 0, per timed forward: CPU seconds other processes used meanwhile (machine busy time minus
    # the ranks' own) and the hypervisor's steal; other ranks: their CPU time during a baseline forward.
    foreign_cpu_s: dict[str, list[float]] = {n: [] for n in names}
    steal_s: dict[str, list[float]] = {n: [] for n in names}
    idle_cpu_s: list[float] = []
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for i in range(spec.warmup + spec.repeats):
            timed = i >= spec.warmup
            for name in rotated(names, i):
                dist.barrier()
                (busy, steal), cpu, start = machine_cpu_s(), time.process_time(), time.perf_counter()
                if name in forwards:
                    outputs[name] = forwards[name]()
                elapsed = time.perf_counter() - start
                dist.barrier()  # every rank is done (the others waited here during the baseline)
                own = torch.tensor([time.process_time() - cpu], dtype=torch.float64)
                if rank != 0 and name == BASELINE and timed:
                    idle_cpu_s.append(own.item())
                dist.all_reduce(own)
                if rank == 0 and timed:
                    busy_end, steal_end = machine_cpu_s()
                    foreign_cpu_s[name].append(busy_end - busy - own.item())
                    steal_s[name].append(steal_end - steal)
                if name in forwards:
                    (times if timed else warmup)[name].append(elapsed)
            if rank == 0:
                kind = "warm-up" if i < spec.warmup else f"repeat {i - spec.warmup + 1}/{spec.repeats}"
                logger.info("    %s: %s", kind, ", ".join(
                    f"{n} {(warmup if i < spec.warmup else times)[n][-1]:.2f} s" for n in names))
        comm = {name: probe_collectives(spec, mesh) for name, mesh in meshes.items()}
    result: dict[str, Any] = {"times_s": times, "warmup_s": warmup, "setup_s": setup_s, "idle_cpu_s": idle_cpu_s,
                              "foreign_cpu_s": foreign_cpu_s, "steal_s": steal_s,
                              "torch_threads": torch.get_num_threads(), "comm_probe": comm}
    if rank == 0:
        reference = outputs[BASELINE].float()
        result["out_absmax"] = reference.abs().max().item()
        result["max_abs_diff"] = {n: (outputs[n].float() - reference).abs().max().item() for n in outputs}
    return result


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b", help="DiT shape (models/wan/config.py PRESETS)")
    parser.add_argument("--layers", type=int, default=2, help="blocks kept of the preset's DiT")
    parser.add_argument("--frames", type=int, default=3, help="latent frames F")
    parser.add_argument("--height", type=int, default=60, help="latent height H (tokens: H/2 rows; 480p: 60)")
    parser.add_argument("--width", type=int, default=104, help="latent width W (tokens: W/2 columns; 832 px: 104)")
    parser.add_argument("--dtype", choices=tuple(TOLERANCE), default="bfloat16")
    parser.add_argument("--layouts", default="ulysses2,ring2",
                        help="parallel subjects, comma-separated, all on the same number of ranks")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (the baseline's too)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (one forward per subject each)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "cp_scaling.json")
    args = parser.parse_args(argv)
    if min(args.layers, args.frames, args.threads, args.repeats) < 1 or args.warmup < 0:
        parser.error("--layers, --frames, --threads and --repeats must be >= 1, --warmup >= 0")
    if args.height % 2 or args.width % 2:
        parser.error(f"--height ({args.height}) and --width ({args.width}) must be even (patch 1x2x2)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    config = replace(get_preset(args.preset).dit, num_layers=args.layers)
    spec = Spec(config=config, dtype=args.dtype, latent=(config.in_dim, args.frames, args.height, args.width),
                seed=args.seed, warmup=args.warmup, repeats=args.repeats)
    layouts: dict[str, ParallelLayout] = {}
    for name in filter(None, (s.strip() for s in args.layouts.split(","))):
        try:
            layout = parse_layout(name)
            layout.validate(layout.world_size, config.num_heads, guided=False)
        except (ValueError, LayoutError) as err:
            parser.error(f"--layouts {name}: {err}")
        layouts[str(layout)] = layout
    sizes = {layout.world_size for layout in layouts.values()}
    if len(sizes) != 1 or 1 in sizes:
        parser.error(f"--layouts must all use the same number (> 1) of ranks; got {args.layouts} "
                     f"({', '.join(f'{n}: {l.world_size}' for n, l in layouts.items())})")
    world = sizes.pop()

    load_before = loadavg()
    began = time.perf_counter()
    logger.info("%d tokens (grid %s), dim %d, %d heads, %d layers, %s, %d thread(s) per rank; %d ranks; "
                "%d warm-up + %d timed rounds of %s (order rotating)", spec.tokens, spec.grid, config.dim,
                config.num_heads, config.num_layers, args.dtype, args.threads, world, args.warmup, args.repeats,
                ", ".join([BASELINE, CONCURRENT, *layouts]))
    ranks = run_local(run_ranks, world, spec, layouts, backend="gloo", threads_per_rank=args.threads)
    wall_s = time.perf_counter() - began

    names = [BASELINE, CONCURRENT, *layouts]
    all_times = {n: [max(ts) for ts in zip(*(r["times_s"][n] for r in ranks if r["times_s"][n]))] for n in names}
    cores = foreign_cores(all_times, ranks[0]["foreign_cpu_s"])
    clean = clean_rounds(cores)
    used = clean if len(clean) >= MIN_CLEAN_ROUNDS else list(range(args.repeats))
    times = {n: [ts[i] for i in used] for n, ts in all_times.items()}
    world_of = {n: l.world_size for n, l in layouts.items()}
    rows = scaling_rows(times[BASELINE], {n: times[n] for n in layouts}, world_of)
    rows_all = scaling_rows(all_times[BASELINE], {n: all_times[n] for n in layouts}, world_of)
    contention = median(times[BASELINE]) / median(times[CONCURRENT])  # < 1: a rank slows while the other computes
    total = forward_flops(config, 1, spec.tokens)
    replicated = replicated_flops(config)
    out_absmax = ranks[0]["out_absmax"]
    for row in rows:
        name = row["method"]
        row["times_s"] = times[name]
        row["max_abs_diff"] = ranks[0]["max_abs_diff"][name]
        row["rel_diff"] = row["max_abs_diff"] / out_absmax
        row["output_matches"] = row["rel_diff"] <= TOLERANCE[args.dtype]
        row["flop_bound_speedup"] = flop_bound_speedup(total, replicated, row["ranks"])
        row["contention_bound_speedup"] = row["flop_bound_speedup"] * contention
        row["comm_probe"] = ranks[0]["comm_probe"][name]
    noises = {n: noise(ts) for n, ts in times.items()}
    contaminated = len(clean) < MIN_CLEAN_ROUNDS or any(v["rel_mad"] > NOISE_LIMIT for v in noises.values())

    report = {
        "description": f"one DiT forward (batch 1): 1 rank x {args.threads} thread(s) vs {world} ranks x "
                       f"{args.threads} thread(s) (gloo, local spawn), subjects interleaved forward by forward "
                       f"in one spawn; baseline = plain model forward on rank 0",
        "settings": {"preset": args.preset, "tokens": spec.tokens, "grid": list(spec.grid), "latent": list(spec.latent),
                     "dim": config.dim, "ffn_dim": config.ffn_dim, "num_heads": config.num_heads,
                     "layers": config.num_layers, "text_len": config.text_len, "text_dim": config.text_dim,
                     "batch": 1, "dtype": args.dtype, "threads_per_rank": args.threads, "ranks": world,
                     "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed, "backend": "gloo",
                     "timing": "barrier before each forward; parallel forward = max over ranks; median over the "
                               "rounds used; subject order rotates per round"},
        "machine": machine(list(load_before), date=datetime.now(timezone.utc).isoformat(timespec="seconds")),
        "command": command("cp_scaling.py", argv),
        "wall_s": wall_s,
        "flops": {"per_forward_gflop": total / 1e9, "replicated_per_rank_gflop": replicated / 1e9},
        "rounds": {"clean": clean, "used": used, "of": args.repeats,
                   "rule": f"a round is clean when other processes kept <= {NOISE_LIMIT} cores busy during each of "
                           f"its forwards; the results use the clean rounds if there are >= {MIN_CLEAN_ROUNDS}, "
                           f"else all rounds"},
        "contaminated": contaminated,
        "noise_of_rounds_used": noises,
        "baseline": {"median_s": median(times[BASELINE]), "times_s": times[BASELINE],
                     "warmup_s": ranks[0]["warmup_s"][BASELINE], "gflops": total / median(times[BASELINE]) / 1e9,
                     "idle_rank_cpu_s_per_forward": [r["idle_cpu_s"] for r in ranks[1:]]},
        "concurrent": {"median_s": median(times[CONCURRENT]), "times_s": times[CONCURRENT],
                       "baseline_over_concurrent": contention,
                       "max_abs_diff": ranks[0]["max_abs_diff"][CONCURRENT],
                       "meaning": "the plain full forward on every rank at once (max over ranks), no communication: "
                                  "the slowdown two busy ranks cause each other on this machine"},
        "out_absmax": out_absmax,
        "tolerance_rel": TOLERANCE[args.dtype],
        "results": rows,
        "results_all_rounds": rows_all,
        "all_rounds": {"times_s": all_times, "foreign_cores": cores, "cpu_steal_s": ranks[0]["steal_s"]},
        "per_rank": [{k: r[k] for k in ("times_s", "warmup_s", "setup_s", "torch_threads")} for r in ranks],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))

    header = ["method", "ranks", "median s / forward", "speedup vs 1 rank", "parallel efficiency", "FLOP bound",
              "contention bound", "comm probe s / forward", "max abs diff (rel)"]
    body = [[BASELINE, 1, f"{median(times[BASELINE]):.3f}", "1.00x", "100%", "", "", "0", "0"]]
    body += [[r["method"], r["ranks"], f"{r['median_s']:.3f}", f"{r['speedup']:.2f}x", f"{r['efficiency']:.0%}",
              f"{r['flop_bound_speedup']:.2f}x", f"{r['contention_bound_speedup']:.2f}x",
              f"{r['comm_probe']['per_forward_s']:.3f}",
              f"{r['max_abs_diff']:.2e} ({r['rel_diff']:.1e}){'' if r['output_matches'] else ' MISMATCH'}"]
             for r in rows]
    idle = [c for r in ranks[1:] for c in r["idle_cpu_s"]]
    which = (f"the {len(used)} rounds (of {args.repeats}) in which no other process kept > {NOISE_LIMIT} core busy"
             if used == clean else f"all {args.repeats} rounds: only {len(clean)} undisturbed")
    other = ", ".join(f"{r['method']} {r['speedup']:.2f}x (paired {r['paired_speedup']:.2f}x, best-of "
                      f"{r['best_speedup']:.2f}x)" for r in rows_all)
    print(f"\nmedians over {which}:\n")
    print(table(header, body))
    print(f"\n{spec.tokens} tokens, dim {config.dim}, {config.num_layers} layers, {args.dtype}, {args.threads} "
          f"thread(s) per rank; |out| max {out_absmax:.2f}.\n"
          f"concurrent (the plain forward on all {world} ranks at once, no communication): "
          f"{median(times[CONCURRENT]):.3f} s; baseline / concurrent {contention:.2f}.\n"
          f"all {args.repeats} rounds: {other}; cores other processes kept busy per round (max over subjects): "
          + ", ".join(f"{max(c[i] for c in cores.values()):.2f}" for i in range(args.repeats))
          + ".\nspread (rel. MAD) of the rounds used: "
          + ", ".join(f"{n} {v['spread']:.0%} ({v['rel_mad']:.0%})" for n, v in noises.items())
          + f"{'. CONTAMINATED: re-run on a quiet machine' if contaminated else ''}.\n"
          f"idle rank CPU during a baseline forward <= {max(idle, default=0.0):.3f} s; load avg 1m {load_before[0]} "
          f"-> {loadavg()[0]}; wall {wall_s:.0f} s.\nJSON: {args.out}")
    bad = [r["method"] for r in rows if not r["output_matches"]]
    if bad:
        raise SystemExit(f"parallel output differs from the single-rank output by more than "
                         f"{TOLERANCE[args.dtype]:g} x |out| for {', '.join(bad)} (see {args.out})")
    return report


if __name__ == "__main__":
    main()
