"""Load on a local service: clients create, poll and download videos above capacity for a fixed time.

Starts a local Ray (Ray's default resources: one CPU per core) and the Serve app with the default
service config (the embedded default model, automatic resources) on 127.0.0.1 and a free port, then
offers `--rate` creates per second for `--duration` seconds from `--clients` client coroutines
(open loop: a client fires on its own clock whatever the service answers, so the offered rate does
not fall to the service's pace). Every accepted job is followed by a tracker that polls
GET /v1/videos/{id} every `--poll-ms` until the job is final and then downloads its content. After
the offered load stops, accepted jobs get `--drain` seconds to finish. Traffic goes to loopback only
and every loop is bounded by those two times, so the run stops by itself.

Reported: offered, accepted (200), refused (429, with Retry-After), other answers, completed
(content downloaded), failed, lost (accepted but not final after the drain: must be 0), the
latency of accepted jobs (POST to content downloaded) and of the create call, throughput, and the
resident memory of the ingress replica process (sampled every 0.5 s: the peak must stay bounded,
i.e. close to its value after warm-up) and of the stage actors. JSON in benchmarks/results/, and
a PNG of answers per second and the ingress memory over time.

    .venv/bin/python benchmarks/service_load.py --clients 8 --rate 4 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS, PROMPT, Size, command, loadavg, machine, table  # noqa: E402
from parallel.launch import free_port  # noqa: E402

logger = logging.getLogger("service_load")

TERMINAL = ("succeeded", "failed", "cancelled")
# Process titles Ray gives actor processes ("ray::<Class>" / "ray::ServeReplica:<app>:<deployment>").
ROLES = {"ingress": "ServeReplica", "text_encode": "ray::TextEncoderActor", "denoise": "ray::DiTRankActor",
         "decode": "ray::VAEDecoderActor"}


@dataclass
class Tally:
    """What the clients saw; times are seconds since the start of the offered load."""

    offered: int = 0
    accepted: list[str] = field(default_factory=list)
    refused: int = 0
    retry_after: set[str] = field(default_factory=set)
    other: dict[str, int] = field(default_factory=dict)
    completed: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)  # POST -> content downloaded, completed jobs
    create_latencies: list[float] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)  # (t, "accepted"|"refused"|"completed"|...)


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _find_pids() -> dict[str, list[int]]:
    """Pids of the service's processes by role, from their command lines (Ray sets them to the actor's name)."""
    found: dict[str, list[int]] = {role: [] for role in ROLES}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for role, marker in ROLES.items():
            if cmdline.startswith(marker) or (role == "ingress" and "ServeReplica" in cmdline
                                               and "VideoService" in cmdline):
                found[role].append(int(proc.name))
                break
    return found


async def sample_memory(stop: asyncio.Event, t0: float, period_s: float = 0.5) -> dict[str, Any]:
    """Resident memory of each role's processes (MB) every `period_s` until `stop`; returns series and peaks."""
    pids = _find_pids()
    series: list[tuple[float, float]] = []
    peaks: dict[str, float] = {}
    while not stop.is_set():
        for role, role_pids in pids.items():
            total = sum(r for r in (_rss_mb(p) for p in role_pids) if r is not None)
            if role_pids:
                peaks[role] = max(peaks.get(role, 0.0), total)
            if role == "ingress" and role_pids:
                series.append((time.monotonic() - t0, total))
        try:
            await asyncio.wait_for(stop.wait(), period_s)
        except asyncio.TimeoutError:
            pass
    return {"ingress_series_mb": series, "peak_mb": peaks, "pids": pids}


async def track(client: Any, video_id: str, posted: float, t0: float, tally: Tally, poll_s: float,
                deadline: float) -> None:
    """Poll until the job is final (or the drain deadline passes), then download the content."""
    while time.monotonic() < deadline:
        body = (await client.get(f"/v1/videos/{video_id}")).json()
        status = body.get("job_status")
        if status == "succeeded":
            content = await client.get(f"/v1/videos/{video_id}/content")
            if content.status_code == 200 and content.content:
                tally.completed += 1
                tally.latencies.append(time.monotonic() - posted)
                tally.events.append((time.monotonic() - t0, "completed"))
            else:
                tally.failed += 1
                tally.events.append((time.monotonic() - t0, "failed"))
            return
        if status in TERMINAL:
            tally.failed += 1
            tally.events.append((time.monotonic() - t0, "failed"))
            return
        await asyncio.sleep(poll_s)


async def offer_load(base_url: str, request: dict[str, Any], clients: int, rate: float, duration_s: float,
                     drain_s: float, poll_s: float) -> tuple[Tally, dict[str, Any], float]:
    """Run the load; returns the tally, the memory record and the wall time from first create to last final."""
    import httpx

    tally = Tally()
    stop_sampling = asyncio.Event()
    t0 = time.monotonic()
    sampler = asyncio.create_task(sample_memory(stop_sampling, t0))
    trackers: list[asyncio.Task[None]] = []
    end_offer = t0 + duration_s
    deadline = end_offer + drain_s
    interval = clients / rate  # each client's period between creates

    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        async def one_client(index: int) -> None:
            next_at = t0 + index * interval / clients  # stagger the clients evenly
            seed = index
            while next_at < end_offer:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at += interval
                seed += clients
                tally.offered += 1
                posted = time.monotonic()
                response = await client.post("/v1/videos", json={**request, "seed": seed})
                tally.create_latencies.append(time.monotonic() - posted)
                now = time.monotonic() - t0
                if response.status_code == 200:
                    video_id = response.json()["id"]
                    tally.accepted.append(video_id)
                    tally.events.append((now, "accepted"))
                    trackers.append(asyncio.create_task(track(client, video_id, posted, t0, tally, poll_s,
                                                              deadline)))
                elif response.status_code == 429:
                    tally.refused += 1
                    tally.retry_after.add(response.headers.get("Retry-After", "missing"))
                    tally.events.append((now, "refused"))
                else:
                    key = str(response.status_code)
                    tally.other[key] = tally.other.get(key, 0) + 1
                    tally.events.append((now, "other"))

        await asyncio.gather(*(one_client(i) for i in range(clients)))
        if trackers:
            await asyncio.wait(trackers)
        wall = time.monotonic() - t0
        final = {}
        for video_id in tally.accepted:  # the service's own word on every accepted job
            final[video_id] = (await client.get(f"/v1/videos/{video_id}")).json().get("job_status")
    stop_sampling.set()
    memory = await sampler
    memory["final_status"] = final
    return tally, memory, wall


def serve_locally(work: Path, overrides: Sequence[str]) -> str:
    """The Serve app with the default service config (plus overrides) on 127.0.0.1; returns its base URL."""
    from ray import serve

    from actors.config import ServiceConfig
    from serve_app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServiceConfig.load(overrides=[f"job_store={work / 'jobs.sqlite'}", f"output_dir={work / 'out'}",
                                        *overrides])
    serve.run(build_app(cfg), name="load", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def summarise(tally: Tally, memory: dict[str, Any], wall: float, args: argparse.Namespace) -> dict[str, Any]:
    final = memory.pop("final_status")
    lost = [v for v, status in final.items() if status not in TERMINAL]
    series = memory["ingress_series_mb"]
    warm = [mb for t, mb in series if t >= min(5.0, args.duration / 4)]
    return {
        "offered": tally.offered, "accepted": len(tally.accepted), "refused_429": tally.refused,
        "retry_after_values": sorted(tally.retry_after), "other_status": tally.other,
        "completed": tally.completed, "failed": tally.failed, "lost": len(lost), "lost_ids": lost,
        "final_status_counts": {s: list(final.values()).count(s) for s in sorted(set(final.values()), key=str)},
        "latency_s": {"p50": _percentile(tally.latencies, 0.5), "p95": _percentile(tally.latencies, 0.95),
                      "max": max(tally.latencies, default=None)},
        "create_latency_ms": {"p50": 1000 * (_percentile(tally.create_latencies, 0.5) or 0),
                              "p95": 1000 * (_percentile(tally.create_latencies, 0.95) or 0)},
        "throughput_per_s": tally.completed / wall if wall else None,
        "wall_s": wall,
        "ingress_rss_mb": {"after_warmup": warm[0] if warm else None, "peak": max(warm, default=None),
                           "end": series[-1][1] if series else None},
        "peak_rss_mb_by_role": memory["peak_mb"],
        "ingress_series_mb": series,
        "events": tally.events,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """Answers per second (accepted, refused, completed) and the ingress's resident memory over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = result["events"]
    seconds = int(max((t for t, _ in events), default=0)) + 1
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for kind, colour in (("accepted", "tab:blue"), ("refused", "tab:orange"), ("completed", "tab:green")):
        counts = [0] * seconds
        for t, k in events:
            if k == kind:
                counts[int(t)] += 1
        top.step(range(seconds), counts, where="post", label=kind, color=colour)
    top.axvline(result["config"]["duration_s"], color="grey", linestyle="--", linewidth=1)
    top.set_ylabel("answers per second")
    top.legend()
    top.set_title(f"{result['config']['rate']:g} creates/s offered for {result['config']['duration_s']:g} s; "
                  f"lost {result['lost']}")
    series = result["ingress_series_mb"]
    bottom.plot([t for t, _ in series], [mb for _, mb in series], color="tab:purple")
    bottom.set_ylabel("ingress RSS (MB)")
    bottom.set_xlabel("seconds since the first create")
    bottom.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="client coroutines sharing the offered rate")
    parser.add_argument("--rate", type=float, default=4.0, help="creates per second offered (above capacity)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of offered load")
    parser.add_argument("--drain", type=float, default=180.0, help="seconds accepted jobs get to finish after it")
    parser.add_argument("--poll-ms", type=float, default=250.0, help="status poll period of each tracker")
    parser.add_argument("--size", default=None, help="HEIGHTxWIDTHxFRAMESxSTEPS; default: the model's defaults")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="service config override (default: none, the out-of-the-box service)")
    parser.add_argument("--num-cpus", type=int, default=None, help="Ray's CPUs (default: Ray's, one per core)")
    parser.add_argument("--out", type=Path, default=RESULTS / "service_load.json")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    if args.rate <= 0 or args.clients < 1 or args.duration <= 0:
        parser.error("--rate and --duration must be > 0 and --clients >= 1")

    import ray

    request: dict[str, Any] = {"prompt": PROMPT}
    if args.size:
        size = Size.parse(args.size)
        request = {k: v for k, v in size.params(0).items() if k != "seed"}
    load_before = loadavg()
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="service-load-") as tmp:
            base_url = serve_locally(Path(tmp), args.set)
            tally, memory, wall = asyncio.run(offer_load(base_url, request, args.clients, args.rate, args.duration,
                                                         args.drain, args.poll_ms / 1000))
    finally:
        ray.shutdown()
    result = summarise(tally, memory, wall, args)
    result["config"] = {"clients": args.clients, "rate": args.rate, "duration_s": args.duration,
                        "drain_s": args.drain, "poll_ms": args.poll_ms, "request": request,
                        "overrides": args.set, "ray_num_cpus": args.num_cpus or os.cpu_count()}
    result["command"] = command("service_load.py", argv)
    result["machine"] = machine(load_before)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_plot:
        plot(result, args.out.with_suffix(".png"))
    print(table(["offered", "accepted", "refused 429", "other", "completed", "failed", "lost", "p50 s", "p95 s",
                 "req/s", "ingress RSS MB (warm / peak / end)"],
                [[result["offered"], result["accepted"], result["refused_429"], sum(result["other_status"].values()),
                  result["completed"], result["failed"], result["lost"],
                  f"{result['latency_s']['p50'] or float('nan'):.2f}",
                  f"{result['latency_s']['p95'] or float('nan'):.2f}", f"{result['throughput_per_s']:.2f}",
                  " / ".join(f"{v:.0f}" if v is not None else "n/a" for v in result["ingress_rss_mb"].values())]]))
    return result


if __name__ == "__main__":
    main()
