"""Helpers for tests that start a Ray cluster of their own in a subprocess (`ray start`, `serve run`)."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def isolated_env(ray_tmp: Path) -> dict[str, str]:
    """This process's environment without Ray settings, with Ray's temp dir in `ray_tmp`: a `ray.init()`
    or `serve run` there starts a cluster of its own (it never finds another cluster's address file), and
    every process of that cluster names `ray_tmp` on its command line, so `stop_processes_naming` finds them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0")
    return env


def stop_processes_naming(path: Path) -> None:
    """SIGKILL every process whose command line names `path` (a cluster's temp dir); `ray stop` would also
    stop the test session's own Ray."""
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass
