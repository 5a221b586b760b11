"""The Serve application end to end over HTTP, the openai client and the Python handle (tiny model, CPU).

One application serves the whole module (Serve start-up costs seconds); tests use small
requests (32x32, 5 frames, few steps) and long ones (many steps) only where they must be
caught in the middle of denoising.
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest

from tests.serve_helpers import running_service

pytestmark = pytest.mark.slow

APP = "smartdiff-test"
SMALL = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 3, "seed": 1}
LONG = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 200, "seed": 2}


@pytest.fixture(scope="module")
def service(ray_cluster: None, tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_service(APP, tiny_model, tmp_path_factory.mktemp("service"), {
            "dit.chunk_steps": 1, "scheduler.max_pending_jobs": 3, "scheduler.retry_after_s": 2}) as url:
        yield url


def _wait(client: httpx.Client, video_id: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = client.get(f"/v1/videos/{video_id}").json()
        if body["job_status"] in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"{video_id} did not finish in {timeout_s} s")


def _frames(mp4: bytes) -> np.ndarray:
    import imageio.v3 as iio

    return iio.imread(io.BytesIO(mp4), extension=".mp4")


def test_create_poll_download(service: str) -> None:
    with httpx.Client(base_url=service, timeout=60) as client:
        created = client.post("/v1/videos", json={"prompt": "a red circle moving left", **SMALL})
        assert created.status_code == 200, created.text
        video = created.json()
        assert video["object"] == "video" and video["status"] in ("queued", "in_progress")
        final = _wait(client, video["id"])
        assert final["status"] == "completed" and final["progress"] == 100, final
        assert final["step"] == final["total_steps"] == 3
        content = client.get(f"/v1/videos/{video['id']}/content")
        assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
        assert _frames(content.content).shape == (5, 32, 32, 3)
        listed = client.get("/v1/videos", params={"limit": 5}).json()
        assert video["id"] in [v["id"] for v in listed["data"]]
        assert client.get("/v1/models").json()["data"][0]["id"] == "wan-tiny"
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_validation_and_unknown_ids(service: str) -> None:
    with httpx.Client(base_url=service, timeout=30) as client:
        bad = client.post("/v1/videos", json={"prompt": "x", "height": 100})
        assert bad.status_code == 422
        assert bad.json()["error"]["param"] == "height" and "multiple of 16" in bad.json()["error"]["message"]
        frames = client.post("/v1/videos", json={"prompt": "x", "num_frames": 10})
        assert frames.status_code == 422 and "num_frames" in frames.text
        assert client.post("/v1/videos", json={"height": 32}).status_code == 422  # no prompt
        assert client.get("/v1/videos/video_nope").status_code == 404
        assert client.get("/v1/videos/video_nope/content").status_code == 404
        assert client.delete("/v1/videos/video_nope").status_code == 404
        missing = client.get("/v1/videos/video_" + "0" * 32).json()["error"]
        assert missing["code"] == "not_found" and missing["param"] == "video_id"


def test_a_request_with_a_feature_cache(service: str) -> None:
    """`cache` travels with the job to the DiT ranks; the resolved params record it; a bad knob is a 422."""
    cache = {"kind": "fbcache", "threshold": 0.5}
    with httpx.Client(base_url=service, timeout=60) as client:
        created = client.post("/v1/videos", json={"prompt": "a red circle moving left", **SMALL, "cache": cache})
        assert created.status_code == 200, created.text
        final = _wait(client, created.json()["id"])
        assert final["status"] == "completed", final
        assert final["params"]["cache"] == cache | {"target_psnr": None}
        counts = final["cache"]
        assert counts["forwards_computed"] + counts["forwards_reused"] == final["total_steps"], counts
        assert counts["peak_extra_bytes"] > 0
        bad = client.post("/v1/videos", json={"prompt": "x", "cache": {"kind": "fbcache", "threshold": 3}})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "cache"
        assert "cache.threshold must be a number between 0 and 1" in bad.json()["error"]["message"]


def test_open_without_keys(service: str) -> None:
    """Keys are off by default: no security scheme, any (or no) Authorization header is fine."""
    with httpx.Client(base_url=service, timeout=30) as client:
        doc = client.get("/openapi.json").json()
        assert "securitySchemes" not in doc.get("components", {})
        assert "401" not in doc["paths"]["/v1/videos"]["post"]["responses"]
        assert client.get("/v1/models", headers={"Authorization": "Bearer anything"}).status_code == 200


def test_openai_client(service: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{service}/v1", api_key="unused")
    assert client.models.list().data[0].id == "wan-tiny"
    video = client.videos.create(prompt="a blue square moving up", extra_body=SMALL)
    for _ in range(600):
        video = client.videos.retrieve(video.id)
        if video.status in ("completed", "failed"):
            break
        time.sleep(0.1)
    assert video.status == "completed", video
    assert _frames(client.videos.download_content(video.id).read()).shape[0] == 5
    image = client.images.generate(prompt="a green triangle", response_format="b64_json",
                                   extra_body={"height": 32, "width": 48, "num_inference_steps": 2})
    import imageio.v3 as iio

    png = iio.imread(io.BytesIO(base64.b64decode(image.data[0].b64_json)), extension=".png")
    assert png.shape[:2] == (32, 48)
    linked = client.images.generate(prompt="a green triangle", response_format="url",
                                    extra_body={"height": 32, "width": 32, "num_inference_steps": 2})
    fetched = httpx.get(linked.data[0].url, timeout=30)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    with pytest.raises(openai.UnprocessableEntityError):
        client.videos.create(prompt="x", extra_body={"width": 33})


def test_events_are_monotonic_and_final(service: str) -> None:
    with httpx.Client(base_url=service, timeout=60) as client:
        video = client.post("/v1/videos", json={"prompt": "a red circle", **SMALL, "num_inference_steps": 5}).json()
        events = []
        with client.stream("GET", f"/v1/videos/{video['id']}/events") as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress), progress
    assert events[-1]["status"] == "succeeded" and events[-1]["progress"] == 1.0
    assert {e["status"] for e in events} >= {"denoising", "succeeded"}
    steps = [e["step"] for e in events if e["status"] == "denoising"]
    assert steps == sorted(steps) and max(steps) == 5


def test_cancel_in_the_middle_of_denoising(service: str) -> None:
    with httpx.Client(base_url=service, timeout=60) as client:
        video = client.post("/v1/videos", json={"prompt": "a long one", **LONG}).json()
        deadline = time.monotonic() + 60
        while client.get(f"/v1/videos/{video['id']}").json()["step"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.post(f"/v1/videos/{video['id']}/cancel").json()["id"] == video["id"]
        final = _wait(client, video["id"])
        assert final["job_status"] == "cancelled" and 2 <= final["step"] < 200, final
        assert final["error"] == {"code": "cancelled", "message": "cancelled"}
        assert client.get(f"/v1/videos/{video['id']}/content").status_code == 409
        assert client.delete(f"/v1/videos/{video['id']}").json()["deleted"] is True
        assert client.get(f"/v1/videos/{video['id']}").status_code == 404


def test_delete_stops_a_running_job_and_forgets_it(service: str) -> None:
    with httpx.Client(base_url=service, timeout=120) as client:
        video = client.post("/v1/videos", json={"prompt": "delete me", **LONG}).json()
        deadline = time.monotonic() + 60
        while client.get(f"/v1/videos/{video['id']}").json()["step"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        deleted = client.delete(f"/v1/videos/{video['id']}")
        assert deleted.status_code == 200 and deleted.json() == {"id": video["id"], "object": "video.deleted",
                                                                 "deleted": True}
        assert client.get(f"/v1/videos/{video['id']}").status_code == 404
        assert client.delete(f"/v1/videos/{video['id']}").status_code == 404


def test_stages_overlap_between_requests(service: str) -> None:
    """Request 2 is encoded or decoded while request 1 is being denoised (stage timestamps)."""
    with httpx.Client(base_url=service, timeout=60) as client:
        first = client.post("/v1/videos", json={"prompt": "first", **SMALL, "num_inference_steps": 60}).json()
        while client.get(f"/v1/videos/{first['id']}").json()["job_status"] != "denoising":
            time.sleep(0.02)
        second = client.post("/v1/videos", json={"prompt": "second", **SMALL, "num_inference_steps": 2}).json()
        a, b = _wait(client, first["id"]), _wait(client, second["id"])
    assert a["job_status"] == b["job_status"] == "succeeded"
    d_start, d_end = a["stage_times"]["denoise"]
    overlaps = [stage for stage in ("text_encode", "decode")
                if b["stage_times"][stage][0] < d_end and b["stage_times"][stage][1] > d_start]
    assert overlaps, (a["stage_times"], b["stage_times"])


def test_queue_overflow_is_429_with_retry_after(service: str) -> None:
    with httpx.Client(base_url=service, timeout=60) as client:
        accepted = []
        for i in range(3):
            response = client.post("/v1/videos", json={"prompt": f"fill {i}", **LONG})
            assert response.status_code == 200, response.text
            accepted.append(response.json()["id"])
        refused = client.post("/v1/videos", json={"prompt": "one too many", **SMALL})
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "2", refused.text
        for video_id in accepted:
            client.post(f"/v1/videos/{video_id}/cancel")
        for video_id in accepted:
            assert _wait(client, video_id)["job_status"] == "cancelled"
        assert client.post("/v1/videos", json={"prompt": "room again", **SMALL}).status_code == 200


def test_handle_api(service: str) -> None:
    from ray import serve

    handle = serve.get_app_handle(APP)
    submitted = handle.submit.remote({"prompt": "via handle", **SMALL}).result()
    assert submitted["job_status"] in ("queued", "encoding", "denoising", "decoding", "succeeded")
    status = handle.status.remote(submitted["id"]).result()
    assert status["id"] == submitted["id"]
    done = handle.generate.remote({"prompt": "via handle, waited", **SMALL}).result(timeout_s=120)
    assert done["job_status"] == "succeeded" and Path(done["result_path"]).is_file()
    cache = {"kind": "magcache", "threshold": 1.0, "retention_ratio": 0.0, "ratios": [[1.0, 1.0, 1.0]]}
    cached = handle.generate.remote({"prompt": "via handle, cached", **SMALL, "cache": cache}).result(timeout_s=120)
    assert cached["job_status"] == "succeeded" and cached["params"]["cache"]["kind"] == "magcache"
    assert cached["cache"]["forwards_reused"] == 2, cached["cache"]  # step 0 computes, 1 and 2 reuse (K = 2)
    long = handle.submit.remote({"prompt": "cancel me", **LONG}).result()
    assert handle.cancel.remote(long["id"]).result()["id"] == long["id"]
