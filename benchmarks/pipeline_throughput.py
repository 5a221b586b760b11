"""Throughput of N concurrent requests through the StageEngine vs the same requests one after another in process.

Service: a `StageEngine` driven directly from this process (no HTTP): one text-encoder actor, one
DiT group of one rank and one VAE actor, each reserving num_cpus = floor(cores / 3, 4 decimals),
so the three reserve exactly the `--cores` the in-process run uses (Ray is started with
num_cpus = cores per engine). All N requests are submitted at once; the wall time runs from the
first submit to the last job finished. In-process: `Pipeline.generate` + writing the mp4 and
sidecar (the VAE actor writes them too) for the N requests in a row, with `--inproc-threads`
torch threads (default: cores). Unless `--no-one-thread-baseline`, the same in-process run with one
torch thread is a third subject, to separate the gain from pipelining from the gain of one thread
per stage. The service runs with its default configuration (one dispatch per job, rank 0 streaming a
progress event per step); unless `--no-dispatch-baseline`, a second engine with dit.step_events = false
(one dispatch per job and no per-step events: the least the engine can do per job) is its baseline,
reported as the default's paired throughput ratio against it. `--chunk-steps N` adds an engine with
dit.chunk_steps = N (N = 1: a dispatch per step, the old default) and the cost of one more dispatch.
All subjects run every repeat, the order rotating per repeat.

Threads in the actors: the stage actors do not take a thread count; Ray sets OMP_NUM_THREADS =
max(1, floor(num_cpus)) in each actor process before torch loads, so with 2 cores each actor
(num_cpus 0.6666) computes with ONE torch thread: 3 threads on 2 cores when all stages are busy.
The benchmark reads each actor's torch.get_num_threads() (through Ray's `__ray_call__`) and records
it; `--actor-threads K` sets it from the outside the same way (torch.set_num_threads(K)).

Request choice: on the tiny model the text encoder costs a few ms whatever the request, so only
denoise and decode can be balanced. Denoising costs ~4-5 ms per step at small sizes (2 forwards
with CFG on a few dozen tokens, mostly fixed costs) while decoding grows with frames x pixels, so
the default 32x32, 5 frames, 30 steps gives denoise ~= decode (~0.13 s each with one thread) in
process; "few steps at 64x64x17" would be decode-bound (~1.5 s decode vs ~0.1 s denoise). The
request is small so that the in-process run with 2 threads, which slows down many times over when
other processes load the 2 cores, still fits the time budget. The printed in-process stage times
show the balance.

Reported per subject (medians over repeats): throughput (requests/s), service / in-process ratio
(paired per repeat), per-stage mean service time from the jobs' `timings`, the bound 1 / max stage
mean (one actor per stage) and the achieved fraction of it, and overlap: the fraction of the wall
time during which at least two (three) stages were busy, from the jobs' `stage_times` (a stage is
busy while any job is inside it; for denoise that includes the engine's time between chunks).

    .venv/bin/python benchmarks/pipeline_throughput.py --requests 8 --repeats 3 --size 32x32x5x30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (RESULTS, STAGES, Size, busy_time, command, loadavg, machine, mean,  # noqa: E402
                                median, ms, probe_job_store_update_ms, probe_ray_call_ms, table,
                                time_with_at_least, write_tiny_model)

logger = logging.getLogger("pipeline_throughput")

DEFAULT, ONE_DISPATCH = "service_default", "service_one_dispatch_no_events"


def _actor_threads(actor: Any) -> dict[str, Any]:
    """Runs inside a stage actor through __ray_call__."""
    import os

    import torch

    return {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "pid": os.getpid()}


def _set_actor_threads(actor: Any, n: int) -> None:
    import torch

    torch.set_num_threads(n)


def stage_actors(engine: Any) -> dict[str, Any]:
    return {"text_encode": engine.text_pool.actors[0], "denoise": engine.dit_groups[0].ranks[0],
            "decode": engine.vae_pool.actors[0]}


async def actor_threads(engine: Any, set_to: int | None) -> dict[str, Any]:
    actors = stage_actors(engine)
    if set_to is not None:
        await asyncio.gather(*(a.__ray_call__.remote(_set_actor_threads, set_to) for a in actors.values()))
    found = await asyncio.gather(*(a.__ray_call__.remote(_actor_threads) for a in actors.values()))
    return dict(zip(actors, found))


def run_in_process(pipe: Any, requests: list[dict], threads: int, out_dir: Path) -> dict[str, Any]:
    import torch

    from stages.media import write_media, write_sidecar

    torch.set_num_threads(threads)
    per_stage: dict[str, list[float]] = {s: [] for s in (*STAGES, "write")}
    start = time.perf_counter()
    for params in requests:
        result = pipe.generate(params)
        mark = time.perf_counter()
        path = write_media(result.frames, out_dir / f"inproc-{params['seed']}.mp4", result.params.fps)
        write_sidecar(path, {"params": result.params.model_dump(), "timings_s": result.timings})
        for s in STAGES:
            per_stage[s].append(result.timings[s])
        per_stage["write"].append(time.perf_counter() - mark)
    wall = time.perf_counter() - start
    stage_mean = {s: mean(v) for s, v in per_stage.items()}
    stage_mean["decode_write"] = stage_mean["decode"] + stage_mean["write"]
    return {"wall_s": wall, "throughput_rps": len(requests) / wall, "stage_mean_s": stage_mean}


async def run_service(engine: Any, requests: list[dict]) -> dict[str, Any]:
    t0 = time.time()
    start = time.perf_counter()
    records = [await engine.submit(p) for p in requests]
    finals = await asyncio.gather(*(engine.wait(r.id) for r in records))
    wall = time.perf_counter() - start
    bad = [f"{r.id}: {r.status} {r.error}" for r in finals if r.status != "succeeded"]
    if bad:
        raise RuntimeError("jobs did not succeed: " + "; ".join(bad))
    t1 = max(r.finished_at for r in finals)
    intervals = {s: [r.stage_times[s] for r in finals] for s in STAGES}
    window = t1 - t0
    stage_mean = {s: mean(r.timings[s] for r in finals) for s in STAGES}
    slowest = max(STAGES, key=lambda s: stage_mean[s])
    bound = 1 / stage_mean[slowest]
    throughput = len(requests) / wall
    return {
        "wall_s": wall,
        "throughput_rps": throughput,
        "stage_mean_s": stage_mean,
        # busy time of each stage / N: per-request cost of the stage as the pool saw it (text batches requests)
        "stage_busy_per_request_s": {s: busy_time(intervals[s], t0, t1) / len(finals) for s in STAGES},
        "stage_utilisation": {s: busy_time(intervals[s], t0, t1) / window for s in STAGES},
        "slowest_stage": slowest,
        "bound_rps": bound,
        "fraction_of_bound": throughput / bound,
        "overlap_ge2_fraction": time_with_at_least(intervals, 2, t0, t1) / window,
        "overlap_all3_fraction": time_with_at_least(intervals, 3, t0, t1) / window,
        "job_latency_mean_s": mean(r.finished_at - r.created_at for r in finals),
        "stage_times": [{"id": r.id, "created_at": r.created_at, "finished_at": r.finished_at, **r.stage_times}
                        for r in finals],
    }


async def bench(args: argparse.Namespace, model: str, tmp: Path) -> dict[str, Any]:
    from actors.config import ServiceConfig
    from actors.engine import StageEngine
    from stages.pipeline import Pipeline

    share = math.floor(args.cores / 3 * 1e4) / 1e4
    modes = service_modes(args)
    engines: dict[str, Any] = {}
    started = time.perf_counter()
    for name, overrides in modes.items():
        cfg = ServiceConfig.load(overrides={
            "model": model, "job_store": str(tmp / f"{name}.sqlite"), "output_dir": str(tmp / name),
            "text_encoder.num_cpus": share, "dit.num_cpus": share, "vae.num_cpus": share,
            "scheduler.max_pending_jobs": max(32, args.requests), **overrides})
        engines[name] = StageEngine(cfg)
    try:
        await asyncio.gather(*(e.start() for e in engines.values()))
        startup_s = time.perf_counter() - started
        threads = {name: await actor_threads(e, args.actor_threads) for name, e in engines.items()}
        logger.info("engines up in %.1f s; actor torch threads %s", startup_s,
                    {n: {s: t["torch_threads"] for s, t in th.items()} for n, th in threads.items()})

        pipe = Pipeline.from_pretrained(model)
        inproc_out = tmp / "inproc"
        inproc_out.mkdir()
        subjects: dict[str, Any] = {}
        for name, engine in engines.items():
            subjects[name] = (lambda e: lambda reqs: run_service(e, reqs))(engine)
        inproc_threads = [args.inproc_threads] + ([1] if not args.no_one_thread_baseline and args.inproc_threads != 1
                                                  else [])
        for t in inproc_threads:
            subjects[f"in_process_{t}t"] = (lambda t: lambda reqs: run_in_process(pipe, reqs, t, inproc_out))(t)
        baseline = f"in_process_{args.inproc_threads}t"

        async def call(name: str, reqs: list[dict]) -> dict[str, Any]:
            out = subjects[name](reqs)
            return await out if asyncio.iscoroutine(out) else out

        size = args.size
        warm = [size.params(seed=100_000 + i) for i in range(args.warmup)]
        warmup_s = {}
        for name in subjects:
            if warm:
                t = time.perf_counter()
                await call(name, warm)
                warmup_s[name] = time.perf_counter() - t

        runs: dict[str, list[dict]] = {name: [] for name in subjects}
        names = list(subjects)
        for i in range(args.repeats):
            reqs = [size.params(seed=i * args.requests + j) for j in range(args.requests)]
            for name in names[i % len(names):] + names[:i % len(names)]:
                runs[name].append(await call(name, reqs))
            logger.info("repeat %d/%d: %s (load %s)", i + 1, args.repeats,
                        ", ".join(f"{n} {runs[n][-1]['throughput_rps']:.2f} req/s" for n in names), loadavg()[0])
        probes = {"job_store_update_ms": probe_job_store_update_ms(tmp), "ray_noop_call_ms": probe_ray_call_ms()}
    finally:
        await asyncio.gather(*(e.shutdown() for e in engines.values()), return_exceptions=True)

    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        s: dict[str, Any] = {"throughput_rps_median": median(r["throughput_rps"] for r in rs),
                             "wall_s_median": median(r["wall_s"] for r in rs),
                             "stage_mean_s": {k: median(r["stage_mean_s"][k] for r in rs)
                                              for k in rs[0]["stage_mean_s"]}}
        for ref in (baseline, "in_process_1t"):
            if ref in runs:
                s[f"ratio_vs_{ref}_paired_median"] = median(r["throughput_rps"] / b["throughput_rps"]
                                                            for r, b in zip(rs, runs[ref]))
        if name in engines:
            for key in ("bound_rps", "fraction_of_bound", "overlap_ge2_fraction", "overlap_all3_fraction",
                        "job_latency_mean_s"):
                s[key] = median(r[key] for r in rs)
            s["stage_busy_per_request_s"] = {k: median(r["stage_busy_per_request_s"][k] for r in rs) for k in STAGES}
            s["stage_utilisation"] = {k: median(r["stage_utilisation"][k] for r in rs) for k in STAGES}
            s["slowest_stage"] = [r["slowest_stage"] for r in rs]
            s["overrides"] = modes[name]
            s["dispatches_per_job"] = dispatches(modes[name], size.steps)
        summary[name] = s
    if ONE_DISPATCH in runs:
        summary[DEFAULT]["ratio_vs_one_dispatch_paired_median"] = median(
            r["throughput_rps"] / b["throughput_rps"] for r, b in zip(runs[DEFAULT], runs[ONE_DISPATCH]))
    per_dispatch = None
    chunked = [n for n in modes if n not in (DEFAULT, ONE_DISPATCH)]
    if chunked and summary[chunked[0]]["dispatches_per_job"] > 1:  # the same requests, interleaved
        extra_s = summary[chunked[0]]["stage_mean_s"]["denoise"] - summary[DEFAULT]["stage_mean_s"]["denoise"]
        per_dispatch = 1000 * extra_s / (summary[chunked[0]]["dispatches_per_job"] - 1)
    return {"startup_s": startup_s, "denoise_ms_per_extra_dispatch": per_dispatch, "actor_threads": threads,
            "cpus_per_actor": share, "warmup_s": warmup_s, "baseline": baseline, "summary": summary, "runs": runs,
            "probes": probes}


def service_modes(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Engine name -> its config overrides: the default, the one-dispatch baseline, an optional chunked one."""
    modes: dict[str, dict[str, Any]] = {DEFAULT: {}}
    if not args.no_dispatch_baseline:
        modes[ONE_DISPATCH] = {"dit.step_events": False}
    if args.chunk_steps is not None:
        modes[f"service_chunk{args.chunk_steps}"] = {"dit.chunk_steps": args.chunk_steps}
    return modes


def dispatches(overrides: dict[str, Any], steps: int) -> int:
    """DiT dispatches per job of an engine with these overrides."""
    chunk = overrides.get("dit.chunk_steps")
    return 1 if chunk is None else -(-steps // chunk)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8, help="concurrent requests per batch (N)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed requests per subject first")
    parser.add_argument("--size", type=Size.parse, default=Size.parse("32x32x5x30"),
                        help="HEIGHTxWIDTHxFRAMESxSTEPS of every request")
    parser.add_argument("--cores", type=int, default=2, help="CPUs of the in-process run = sum of the actors' num_cpus")
    parser.add_argument("--inproc-threads", type=int, default=None, help="torch threads in process (default: --cores)")
    parser.add_argument("--no-one-thread-baseline", action="store_true", help="skip the 1-thread in-process subject")
    parser.add_argument("--chunk-steps", type=int, default=None,
                        help="also run an engine with dit.chunk_steps = N (1: one dispatch per step)")
    parser.add_argument("--no-dispatch-baseline", action="store_true",
                        help="skip the engine without per-step events (dit.step_events = false)")
    parser.add_argument("--actor-threads", type=int, default=None,
                        help="torch.set_num_threads(K) in every stage actor (default: leave Ray's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS / "pipeline_throughput.json")
    args = parser.parse_args(argv)
    args.inproc_threads = args.inproc_threads or args.cores
    if args.requests < 1 or args.repeats < 1 or args.cores < 1 or not 1 <= (args.chunk_steps or 1) <= 1000:
        parser.error("--requests, --repeats, --cores must be >= 1 and --chunk-steps in 1..1000")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import ray

    load_before = loadavg()
    began = time.perf_counter()
    n_engines = len(service_modes(args))
    with tempfile.TemporaryDirectory(prefix="sd-pipeline-throughput-") as tmp_name:
        tmp = Path(tmp_name)
        model = write_tiny_model(tmp)
        # each engine's actors reserve exactly --cores; only one engine works at a time
        ray.init(address="local", num_cpus=args.cores * n_engines, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
        try:
            out = asyncio.run(bench(args, model, tmp))
        finally:
            ray.shutdown()

    size = args.size
    base = out["summary"][out["baseline"]]
    report = {
        "description": f"{args.requests} concurrent requests through the StageEngine (1 actor per stage, "
                       f"num_cpus {out['cpus_per_actor']} each = {args.cores} cores) vs the same requests in a row "
                       f"in process (Pipeline.generate + mp4/sidecar write); subjects interleaved per repeat",
        "request": {"size": size.spec, "height": size.height, "width": size.width, "num_frames": size.frames,
                    "num_inference_steps": size.steps, "guidance": "default (CFG on)",
                    "choice": "denoise ~= decode in process on wan-tiny; the text encoder costs a few ms whatever "
                              "the request, so it cannot be balanced (it is never the bottleneck)",
                    "in_process_stage_mean_s": base["stage_mean_s"]},
        "config": {"requests": args.requests, "repeats": args.repeats, "warmup": args.warmup, "cores": args.cores,
                   "inproc_threads": args.inproc_threads, "chunk_steps": args.chunk_steps,
                   "engines": service_modes(args), "actor_threads_set": args.actor_threads},
        "machine": machine(load_before, actor_threads=out["actor_threads"],
                           actor_threads_note="actors take no thread count; Ray sets OMP_NUM_THREADS = "
                                              "max(1, floor(num_cpus)) in each actor process"),
        "command": command("pipeline_throughput.py", argv),
        "wall_s": time.perf_counter() - began,
        **{k: v for k, v in out.items() if k != "actor_threads"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))

    summ = out["summary"]
    baseline = out["baseline"]
    rows = []
    for name, s in summ.items():
        sm = s["stage_mean_s"]
        decode = sm["decode_write"] if "decode_write" in sm else sm["decode"]
        is_service = "bound_rps" in s
        rows.append([
            name, f"{s['throughput_rps_median']:.2f}", f"{s[f'ratio_vs_{baseline}_paired_median']:.2f}x",
            f"{s['ratio_vs_in_process_1t_paired_median']:.2f}x" if "ratio_vs_in_process_1t_paired_median" in s else "",
            ms(sm["text_encode"]), ms(sm["denoise"]), ms(decode),
            f"{s['bound_rps']:.2f} ({s['slowest_stage'][0]})" if is_service else "",
            f"{s['fraction_of_bound']:.0%}" if is_service else "",
            f"{s['overlap_ge2_fraction']:.0%} / {s['overlap_all3_fraction']:.0%}" if is_service else "",
            " / ".join(f"{s['stage_utilisation'][k]:.0%}" for k in STAGES) if is_service else "",
        ])
    threads = {n: "/".join(str(t["torch_threads"]) for t in th.values()) for n, th in out["actor_threads"].items()}
    print(f"\n{args.requests} requests of {size.height}x{size.width}, {size.frames} frames, {size.steps} steps "
          f"(chosen so denoise ~= decode in process; text encode is a few ms whatever the request); medians of "
          f"{args.repeats} interleaved repeats; {args.cores} cores: in process {args.inproc_threads} torch threads, "
          f"actors num_cpus {out['cpus_per_actor']} each, torch threads per actor (text/DiT/VAE) {threads}; "
          f"load avg 1m {load_before[0]} -> {loadavg()[0]}\n")
    print(table(["subject", "throughput (req/s)", f"vs {baseline} (paired)", "vs in_process_1t (paired)",
                 "text encode ms/req",
                 "denoise ms/req", "decode+write ms/req", "bound 1/max stage (req/s)", "achieved / bound",
                 ">=2 / 3 stages busy", "busy text/DiT/VAE"], rows))
    pr = out["probes"]
    per_dispatch = out["denoise_ms_per_extra_dispatch"]
    ratio = summ[DEFAULT].get("ratio_vs_one_dispatch_paired_median")
    print(f"\ndefault service (per-step events) vs one dispatch per job without events: "
          f"{'n/a' if ratio is None else f'{ratio:.3f}x'} throughput (paired median).")
    print(f"stage times are means per request (service: from the jobs' timings, while the other stages run; "
          f"in process: alone). Service denoise cost per extra dispatch (--chunk-steps engine minus the default, "
          f"over the extra dispatches): {'n/a' if per_dispatch is None else f'{per_dispatch:.1f} ms'}. "
          f"Floors measured in this run: job-store update {pr['job_store_update_ms']:.1f} ms, no-op Ray call "
          f"{pr['ray_noop_call_ms']:.1f} ms.")
    return report


if __name__ == "__main__":
    main()
