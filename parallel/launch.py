"""Run a function on N local ranks that form one torch.distributed group (gloo on CPU, NCCL on CUDA).

Used where no Ray DiT group exists: the CLI's multi-rank generate, the scaling benchmark and the
multi-process tests. Each rank is a fresh `spawn` process (CUDA and threads do not survive fork);
results come back through a queue, and a failing rank fails the whole call with its traceback
instead of leaving the others blocked in a collective (the survivors are terminated).

torch is imported inside the functions that use it: the Ray rank groups import `free_port` from here in
the engine process, which must not load torch.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

logger = logging.getLogger(__name__)


class RankFailed(RuntimeError):
    """A rank raised or died; the message carries its traceback."""


def default_backend() -> str:
    """NCCL when CUDA is available, gloo otherwise: the same code path runs on both."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now ("" = every interface, for a rendezvous other nodes reach)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _rank_main(rank: int, world_size: int, url: str, backend: str, threads: int | None, timeout_s: float,
               results: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        import torch
        import torch.distributed as dist

        if threads is not None:
            torch.set_num_threads(threads)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=url, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001  # reported to the parent, which raises RankFailed
        results.put((rank, False, traceback.format_exc()))


def run_local(fn: Callable[..., Any], world_size: int, *args: Any, backend: str | None = None,
              threads_per_rank: int | None = None, timeout_s: float = 600.0) -> list[Any]:
    """fn(rank, world_size, *args) on world_size spawned ranks in one process group; returns the
    per-rank return values, rank 0 first.

    fn must be importable by name (a module-level function) and its arguments and result picklable.
    threads_per_rank sets torch's intra-op threads in each rank (benchmarks pin it to 1).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    import torch.multiprocessing as mp

    backend = backend or default_backend()
    url = f"tcp://127.0.0.1:{free_port()}"
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(rank, world_size, url, backend, threads_per_rank, timeout_s,
                                                  results, fn, args), daemon=True)
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s + 60
    try:
        while len(values) < world_size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in values]
                if dead:
                    raise RankFailed(f"rank {dead[0]} of {world_size} died with exit code "
                                     f"{procs[dead[0]].exitcode} before returning") from None
                if time.monotonic() > deadline:
                    raise RankFailed(f"ranks {sorted(set(range(world_size)) - set(values))} did not finish "
                                     f"within {timeout_s:g} s") from None
                continue
            if not ok:
                raise RankFailed(f"rank {rank} of {world_size} failed:\n{value}")
            values[rank] = value
    finally:
        for proc in procs:
            proc.join(timeout=5 if len(values) == world_size else 0.1)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
    return [values[rank] for rank in range(world_size)]


def env_world() -> tuple[int, int] | None:
    """(rank, world_size) when launched by torchrun (RANK/WORLD_SIZE set), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None
