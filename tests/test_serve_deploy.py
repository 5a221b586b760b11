"""`serve deploy` as an operator runs it, on a `ray start --head` cluster with Ray's default resources:
a deployed config, then a changed one while jobs run (a hot upgrade), loses no accepted job; and the
service's metrics reach the node's Prometheus endpoint."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from parallel.launch import free_port
from tests.local_cluster import HeadNode

pytestmark = pytest.mark.slow

SERVE = str(Path(sys.executable).with_name("serve"))
JOB = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 200}  # ~1 s of denoising each


def _deploy(node: HeadNode, config: Path, port: int, args: dict[str, Any]) -> None:
    config.write_text(yaml.safe_dump({
        "proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": "smartdiff", "route_prefix": "/", "import_path": "serve_app:app_builder",
                          "args": args}]}))
    done = subprocess.run([SERVE, "deploy", str(config), "-a", node.dashboard], env=node.env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=10)
    except httpx.HTTPError:
        return None


def _until(what: str, predicate: Any, timeout_s: float = 240) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} not reached in {timeout_s:g} s")


def test_serve_deploy_then_a_changed_config_loses_no_job(head_node: HeadNode, tiny_model: str,
                                                         tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = {"model": tiny_model, "job_store": str(tmp_path / "jobs.sqlite"), "output_dir": str(tmp_path / "out")}
    _deploy(head_node, tmp_path / "v1.yaml", port, args)
    try:
        _until("ready", lambda: (r := _get(f"{base}/readyz")) is not None and r.status_code == 200)
        with httpx.Client(base_url=base, timeout=60) as client:
            ids = [client.post("/v1/videos", json={"prompt": f"job {i}", "seed": i, **JOB}).json()["id"]
                   for i in range(4)]
            _until("a job denoising", lambda: client.get(f"/v1/videos/{ids[0]}").json()["job_status"] == "denoising")
            _deploy(head_node, tmp_path / "v2.yaml", port, {**args, "vae.replicas": 2})  # the hot upgrade

            def final(video_id: str) -> str | None:
                response = _get(f"{base}/v1/videos/{video_id}")  # None while no replica answers
                status = None if response is None or response.status_code != 200 else response.json()["job_status"]
                return status if status in ("succeeded", "failed", "cancelled") else None

            assert [_until(f"{i} final", lambda i=i: final(i)) for i in ids] == ["succeeded"] * 4
            _until("the new replica ready", lambda: (r := _get(f"{base}/readyz")) is not None and r.status_code == 200)
            config = subprocess.run([SERVE, "config", "-a", head_node.dashboard], env=head_node.env,
                                    capture_output=True, text=True, timeout=60).stdout
            assert "vae.replicas: 2" in config, config
            after = client.post("/v1/videos", json={"prompt": "after the upgrade", "seed": 9,
                                                    **JOB, "num_inference_steps": 2}).json()["id"]
            assert _until("after final", lambda: final(after)) == "succeeded"

        # The engine's metrics, exported by Ray on the node's Prometheus endpoint.
        metrics_url = f"http://127.0.0.1:{head_node.metrics_port}/metrics"
        scrape = _until("smartdiff metrics in the scrape", lambda: (r := _get(metrics_url)) is not None
                        and "ray_smartdiff_jobs_total" in r.text and r.text, timeout_s=90)
        assert 'status="succeeded"' in scrape and "ray_smartdiff_stage_latency_s_bucket" in scrape
    finally:
        subprocess.run([SERVE, "shutdown", "-y", "-a", head_node.dashboard], env=head_node.env, capture_output=True,
                       timeout=120)
