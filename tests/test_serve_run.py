"""`serve run serve_app:app` exactly as the README writes it, as a new user runs it: Ray's default resources
(as many CPUs as the machine has cores, 2 in CI), started from a folder that is not the repository (the
installed distribution provides `serve_app`), driven by the official openai client."""

from __future__ import annotations

import io
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.local_cluster import isolated_env, stop_processes_naming

pytestmark = pytest.mark.slow

PORT = 8000  # Serve's default HTTP port: the README's command serves there
SERVE = str(Path(sys.executable).with_name("serve"))


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"serve run exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"not ready after {timeout_s:g} s:\n{log.read_text()[-4000:]}")


def test_serve_run_with_default_resources_from_any_folder(tmp_path: Path) -> None:
    import imageio.v3 as iio
    import openai

    assert _port_free(PORT), f"port {PORT} is in use; the README's `serve run serve_app:app` serves on it"
    work = tmp_path / "work"
    work.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="sd-ray-"))  # short: Ray's socket paths must stay under 108 bytes
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([SERVE, "run", "serve_app:app"], cwd=work, env=isolated_env(ray_tmp),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(proc, log)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="unused")
        assert client.models.list().data[0].id == "wan-tiny-shapes"
        video = client.videos.create(prompt="a red circle moving left on a white background")
        deadline = time.monotonic() + 120
        while video.status not in ("completed", "failed"):
            assert time.monotonic() < deadline, video
            time.sleep(0.2)
            video = client.videos.retrieve(video.id)
        assert video.status == "completed", video
        frames = iio.imread(io.BytesIO(client.videos.download_content(video.id).read()), extension=".mp4")
        assert frames.shape == (17, 64, 64, 3)  # the embedded model's defaults
        data = work / "smartdiff-data"  # the documented default folder, relative to where the service started
        assert (data / "jobs.sqlite").is_file()
        assert (data / "outputs" / f"{video.id}.mp4").is_file() and (data / "outputs" / f"{video.id}.json").is_file()
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does: serve run deletes the app and stops its Ray
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        stop_processes_naming(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
