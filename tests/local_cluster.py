"""Helpers for tests that start a Ray cluster of their own in a subprocess (`ray start`, `serve run`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from parallel.launch import free_port

RAY = str(Path(sys.executable).with_name("ray"))


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


@dataclass(frozen=True)
class HeadNode:
    """A `ray start --head` cluster: the environment that reaches it (job and serve CLIs), its ports."""

    env: dict[str, str]
    dashboard: str  # http://127.0.0.1:<port>: `ray job submit`, `serve deploy -a`
    metrics_port: int  # Prometheus metrics of the node


@contextmanager
def head_node(temp: Path) -> Iterator[HeadNode]:
    """A separate local Ray cluster started as a user would (`ray start --head`: Ray's default resources,
    as many CPUs as the machine has cores), stopped through its own temp dir's processes."""
    env = isolated_env(temp)
    env["RAY_AUTH_MODE"] = "disabled"
    dashboard, metrics = free_port(), free_port()
    # Every port explicit: a default one (e.g. the agent's 52365) may be held by another Ray on this machine,
    # and the job agent then never comes up ("No available agent to submit job").
    ports = [f"--{name}={free_port()}" for name in (
        "port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "node-manager-port", "object-manager-port", "ray-client-server-port")]
    subprocess.run([RAY, "start", "--head", *ports, f"--metrics-export-port={metrics}", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp}",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=120)
    url = f"http://127.0.0.1:{dashboard}"
    env["RAY_API_SERVER_ADDRESS"] = env["RAY_ADDRESS"] = url
    try:
        yield HeadNode(env, url, metrics)
    finally:
        stop_processes_naming(temp)
        shutil.rmtree(temp, ignore_errors=True)
