"""HTTP service end to end vs the in-process pipeline, for the same request, in one run.

Service: POST /v1/videos, wait for completion on the server-sent events stream
GET /v1/videos/{id}/events (no polling bias; `--detect poll --poll-ms 10` polls instead), then
GET /v1/videos/{id}/content (the mp4 bytes). In-process: `Pipeline.generate` + writing the same
mp4 and JSON sidecar, in this process. The tiny model (wan-tiny, seeded random weights) is written
to a temp folder. The service runs with its default configuration (one dispatch per job, rank 0
streaming a progress event per step, which the client's SSE stream delivers); `--chunk-steps N` adds a
second Serve application beside it with dit.chunk_steps = N (N = 1: one Ray call per denoising step,
the old default) and the cost of one more dispatch. Every repeat runs every subject
on the same request (same seed), the order rotating per repeat, so slow drifts of a shared machine
hit all subjects alike; "paired" numbers are medians of per-repeat ratios / differences.

Threads: the in-process run uses `--threads` torch threads and every stage actor reserves
num_cpus = `--threads`; Ray then sets OMP_NUM_THREADS = floor(num_cpus) in the actor, so each
stage computes with the same thread count in both paths (requests run one at a time, so the
stages never compete). The default 1 keeps the comparison stable on a shared 2-core machine.

Service breakdown, from the job's `timings` (seconds per stage) and `stage_times` (epoch
intervals) plus the client's clock: POST -> text-encode start, the three stages (decode includes
writing the mp4 + sidecar in the VAE actor), the gaps between stages, decode end -> client
notified, and the download; "queue + dispatch overhead" = total - sum of the three stages.

    .venv/bin/python benchmarks/serve_overhead.py --sizes 64x64x17x20,32x32x5x4 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallel.launch import free_port  # noqa: E402
from benchmarks._common import (RESULTS, STAGES, Size, command, loadavg, machine, median,  # noqa: E402
                                ms, parse_sizes, probe_job_store_update_ms, probe_ray_call_ms, table,
                                write_tiny_model)

logger = logging.getLogger("serve_overhead")

TERMINAL = ("succeeded", "failed", "cancelled")
# service breakdown keys, in time order; their sum is the total
PARTS = ("post_to_encode_start", "text_encode", "encode_to_denoise", "denoise", "denoise_to_decode", "decode",
         "decode_end_to_notified", "download")


def run_in_process(pipe: Any, size: Size, seed: int, out_dir: Path) -> dict[str, float]:
    from stages.media import write_media, write_sidecar

    start = time.perf_counter()
    result = pipe.generate(size.params(seed))
    generated = time.perf_counter()
    path = write_media(result.frames, out_dir / f"inproc-{seed}.mp4", result.params.fps)
    write_sidecar(path, {"params": result.params.model_dump(), "timings_s": result.timings, "output": str(path)})
    end = time.perf_counter()
    t = result.timings
    out = {"text_encode": t["text_encode"], "denoise": t["denoise"], "decode": t["decode"],
           "write": end - generated, "decode_write": t["decode"] + end - generated, "total": end - start}
    out["stage_sum"] = out["text_encode"] + out["denoise"] + out["decode_write"]
    out["other"] = out["total"] - out["stage_sum"]
    return out


def wait_sse(client: Any, prefix: str, video_id: str) -> str:
    with client.stream("GET", f"{prefix}/v1/videos/{video_id}/events") as stream:
        stream.raise_for_status()
        for line in stream.iter_lines():
            if line.startswith("event:") and line.split(":", 1)[1].strip() in TERMINAL:
                return line.split(":", 1)[1].strip()
    raise RuntimeError(f"event stream of {video_id} ended without a final status")


def wait_poll(client: Any, prefix: str, video_id: str, interval_s: float) -> str:
    while True:
        status = client.get(f"{prefix}/v1/videos/{video_id}").json()["job_status"]
        if status in TERMINAL:
            return status
        time.sleep(interval_s)


def run_service(client: Any, prefix: str, size: Size, seed: int, args: argparse.Namespace) -> dict[str, float]:
    t0 = time.time()
    created = client.post(f"{prefix}/v1/videos", json=size.params(seed))
    created.raise_for_status()
    video_id = created.json()["id"]
    t_posted = time.time()
    if args.detect == "sse":
        status = wait_sse(client, prefix, video_id)
    else:
        status = wait_poll(client, prefix, video_id, args.poll_ms / 1000)
    t_done = time.time()
    if status != "succeeded":
        raise RuntimeError(f"{video_id} {status}: {client.get(f'{prefix}/v1/videos/{video_id}').text}")
    content = client.get(f"{prefix}/v1/videos/{video_id}/content")
    content.raise_for_status()
    t_end = time.time()
    video = client.get(f"{prefix}/v1/videos/{video_id}").json()  # not timed
    st, timings = video["stage_times"], video["timings"]
    out = {
        "post_response": t_posted - t0,
        "post_to_encode_start": st["text_encode"][0] - t0,
        "text_encode": timings["text_encode"],
        "encode_to_denoise": st["denoise"][0] - st["text_encode"][1],
        "denoise": timings["denoise"],
        "denoise_to_decode": st["decode"][0] - st["denoise"][1],
        "decode": timings["decode"],
        "decode_end_to_notified": t_done - st["decode"][1],
        "download": t_end - t_done,
        "total": t_end - t0,
        "mp4_bytes": len(content.content),
    }
    out["stage_sum"] = sum(timings[s] for s in STAGES)
    out["queue_dispatch_overhead"] = out["total"] - out["stage_sum"]
    return out


def summarise(size: Size, mode: str, chunk: int | None, service: list[dict], inproc: list[dict]) -> dict[str, Any]:
    keys = list(service[0])
    med_s = {k: median(r[k] for r in service) for k in keys}
    med_i = {k: median(r[k] for r in inproc) for k in inproc[0]}
    dispatches = 1 if chunk is None else -(-size.steps // chunk)
    return {
        "size": size.spec, "mode": mode, "chunk_steps": chunk, "dispatches_per_job": dispatches,
        "median_s": {"service": med_s, "in_process": med_i},
        "ratio_service_over_in_process": med_s["total"] / med_i["total"],
        "paired_ratio_median": median(s["total"] / i["total"] for s, i in zip(service, inproc)),
        "overhead_ms": 1000 * (med_s["total"] - med_i["total"]),
        "paired_overhead_ms_median": 1000 * median(s["total"] - i["total"] for s, i in zip(service, inproc)),
        # what the service spends around the same denoising work, per dispatch
        "denoise_extra_ms_per_dispatch": 1000 * (med_s["denoise"] - med_i["denoise"]) / dispatches,
        "samples": {"service": service, "in_process": inproc},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64x64x17x20,32x32x5x4", help="HEIGHTxWIDTHxFRAMESxSTEPS, comma-separated")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1, help="untimed requests per size and subject first")
    parser.add_argument("--chunk-steps", type=int, default=None,
                        help="also run a service with dit.chunk_steps = N (1: one dispatch per step)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in-process = num_cpus per stage actor")
    parser.add_argument("--detect", choices=("sse", "poll"), default="sse", help="how the client sees completion")
    parser.add_argument("--poll-ms", type=float, default=10.0, help="poll interval with --detect poll")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_overhead.json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or not 1 <= (args.chunk_steps or 1) <= 1000:
        parser.error("--repeats and --threads must be >= 1, --chunk-steps in 1..1000")
    sizes = parse_sizes(args.sizes)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    import httpx
    import ray
    import torch
    from ray import serve

    from actors.config import ServiceConfig
    from serve_app import build_app
    from stages.pipeline import Pipeline

    load_before = loadavg()
    began = time.perf_counter()
    modes: list[tuple[str, int | None]] = [("default", None)]
    if args.chunk_steps is not None:
        modes.append((f"chunk{args.chunk_steps}", args.chunk_steps))
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="sd-serve-overhead-") as tmp_name:
        tmp = Path(tmp_name)
        model = write_tiny_model(tmp)
        pipe = Pipeline.from_pretrained(model)
        inproc_out = tmp / "inproc"
        inproc_out.mkdir()
        # logical CPUs: every actor of every app reserves --threads; requests run one at a time
        ray.init(address="local", num_cpus=3 * args.threads * len(modes) + 2, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING)
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            started = time.perf_counter()
            targets = []
            for mode, chunk in modes:
                cfg = ServiceConfig.load(overrides={
                    "model": model, "job_store": str(tmp / f"{mode}.sqlite"), "output_dir": str(tmp / mode),
                    "text_encoder.num_cpus": args.threads, "vae.num_cpus": args.threads,
                    "dit.num_cpus": args.threads, **({} if chunk is None else {"dit.chunk_steps": chunk})})
                targets.append(serve.RunTarget(build_app(cfg), name=f"sd-bench-{mode}", route_prefix=f"/{mode}"))
            serve.run_many(targets)  # the apps start side by side
            startup_s = time.perf_counter() - started
            logger.info("services up in %.1f s (%s)", startup_s, ", ".join(m for m, _ in modes))

            subjects = ["in_process"] + [m for m, _ in modes]
            samples: dict[tuple[str, str], list[dict]] = {(s.spec, sub): [] for s in sizes for sub in subjects}
            warm: dict[str, dict[str, float]] = {}
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:

                def run(subject: str, size: Size, seed: int) -> dict[str, float]:
                    if subject == "in_process":
                        return run_in_process(pipe, size, seed, inproc_out)
                    return run_service(client, f"/{subject}", size, seed, args)

                for size in sizes:
                    for subject in subjects:
                        for w in range(args.warmup):
                            warm.setdefault(size.spec, {})[subject] = run(subject, size, 10_000 + w)["total"]
                for i in range(args.repeats):
                    for size in sizes:
                        order = subjects[i % len(subjects):] + subjects[:i % len(subjects)]
                        for subject in order:
                            samples[(size.spec, subject)].append(run(subject, size, seed=i))
                    logger.info("repeat %d/%d done (load %s)", i + 1, args.repeats, loadavg()[0])
            probes = {"job_store_update_ms": probe_job_store_update_ms(tmp), "ray_noop_call_ms": probe_ray_call_ms()}
        finally:
            serve.shutdown()
            ray.shutdown()

    results = [summarise(size, mode, chunk, samples[(size.spec, mode)], samples[(size.spec, "in_process")])
               for size in sizes for mode, chunk in modes]
    # denoise cost of one more dispatch: the two services ran the same requests, interleaved
    per_dispatch: dict[str, float] = {}
    if len(modes) == 2:
        for size in sizes:
            a, b = (r for r in results if r["size"] == size.spec)
            if a["dispatches_per_job"] != b["dispatches_per_job"]:
                per_dispatch[size.spec] = 1000 * (a["median_s"]["service"]["denoise"] - b["median_s"]["service"][
                    "denoise"]) / (a["dispatches_per_job"] - b["dispatches_per_job"])
    report = {
        "description": "HTTP end to end (POST, completion via " + ("SSE" if args.detect == "sse" else
                       f"polling every {args.poll_ms:g} ms") + ", GET content) vs in-process Pipeline.generate + "
                       "writing the same mp4/sidecar; same request and seed per repeat, subjects interleaved",
        "config": {"sizes": [s.spec for s in sizes], "repeats": args.repeats, "warmup": args.warmup,
                   "threads": args.threads, "modes": dict(modes), "detect": args.detect,
                   "poll_ms": args.poll_ms if args.detect == "poll" else None, "model": "wan-tiny (random weights)",
                   "guidance": "default (CFG on: 2 DiT forwards per step)"},
        "machine": machine(load_before, threads=args.threads,
                           actor_threads="Ray sets OMP_NUM_THREADS=floor(num_cpus)=threads in each stage actor"),
        "command": command("serve_overhead.py", argv),
        "service_startup_s": startup_s,
        # per-dispatch cost floors, measured on this machine during the run: the engine does one job-store
        # update (SQLite commit, synchronous=FULL, i.e. an fsync) and one Ray call per denoise dispatch
        "probes": probes,
        "denoise_ms_per_extra_dispatch": per_dispatch,
        "warmup_total_s": warm,
        "wall_s": time.perf_counter() - began,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))

    rows = []
    for r in results:
        m = r["median_s"]
        rows.append([r["size"], f"{r['mode']} ({r['dispatches_per_job']} disp.)", ms(m["in_process"]["total"]),
                     ms(m["service"]["total"]), f"{r['ratio_service_over_in_process']:.2f}x "
                     f"({r['paired_ratio_median']:.2f}x)",
                     f"{r['overhead_ms']:.0f} ({r['paired_overhead_ms_median']:.0f})",
                     f"{r['denoise_extra_ms_per_dispatch']:.1f}"])
    print(f"\nmedians of {args.repeats} interleaved repeats, {args.threads} torch thread(s) per stage; "
          f"load avg 1m {load_before[0]} -> {loadavg()[0]}\n")
    print(table(["size (HxWxFxSteps)", "service mode", "in-process (ms)", "service (ms)",
                 "service / in-process (paired)", "overhead ms (paired)",
                 "(service - in-process) denoise ms / dispatch"], rows))
    rows = []
    for r in results:
        s, i = r["median_s"]["service"], r["median_s"]["in_process"]
        rows.append([r["size"], "in-process", "", ms(i["text_encode"]), "", ms(i["denoise"]), "", ms(i["decode_write"]),
                     "", "", ms(i["total"]), ms(i["stage_sum"]), ms(i["other"])])
        rows.append([r["size"], r["mode"], *(ms(s[k]) for k in PARTS), ms(s["total"]), ms(s["stage_sum"]),
                     ms(s["queue_dispatch_overhead"])])
    print("\nservice denoise cost per extra dispatch (--chunk-steps service minus the default, over the extra "
          "dispatches): " + (", ".join(f"{k} {v:.1f} ms" for k, v in per_dispatch.items()) or "n/a")
          + f"; floors measured in this run: job-store update (SQLite commit, synchronous=FULL) "
          f"{probes['job_store_update_ms']:.1f} ms, no-op Ray actor call {probes['ray_noop_call_ms']:.1f} ms")
    print("\nservice time by stage (medians per column, ms; decode includes writing the mp4 + sidecar; the last "
          "two columns are medians of per-request sums / residuals, so columns need not add up):\n")
    print(table(["size", "path", "POST -> encode start", "text encode", "gap", "denoise", "gap", "decode + write",
                 "decode end -> notified", "download", "total", "sum of stages", "queue + dispatch overhead"], rows))
    return report


if __name__ == "__main__":
    main()
