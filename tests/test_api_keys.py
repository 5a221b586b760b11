"""Optional API keys: with keys configured every route but /healthz, /readyz, /docs and /openapi.json
needs `Authorization: Bearer <key>`; the openai client works with its api_key. Off by default
(tests/test_serve_app.py runs without keys). The same service has an image wait too short for any
image, which checks that the synchronous image route gives up with a documented 503 and loses nothing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from fastapi.security import HTTPAuthorizationCredentials

from actors.config import AuthConfig, ServiceConfig
from tests.serve_helpers import running_service
from serve_app import ApiError, ApiKeys

LISTED, FILED = "listed-key-0123456789", "filed-key-9876543210"
APP = "smartdiff-keys"
SMALL = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2, "seed": 1}


def _key_file(folder: Path) -> Path:
    path = folder / "keys.txt"
    path.write_text(f"# one key per line\n\n  {FILED}  \n")
    return path


def test_keys_come_from_the_list_and_the_file(tmp_path: Path) -> None:
    auth = AuthConfig(api_keys=[LISTED], api_keys_file=_key_file(tmp_path))
    assert auth.keys() == [LISTED, FILED]
    assert ServiceConfig().auth.keys() == []  # off by default
    (tmp_path / "bad.txt").write_text("has space in it\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        AuthConfig(api_keys_file=tmp_path / "bad.txt").keys()
    with pytest.raises(ValueError):
        AuthConfig(api_keys=["short"])


def test_only_accepted_keys_pass() -> None:
    keys = ApiKeys([LISTED, FILED])
    keys.require(HTTPAuthorizationCredentials(scheme="Bearer", credentials=FILED))
    for credentials in (None, HTTPAuthorizationCredentials(scheme="Bearer", credentials=LISTED[:-1]),
                        HTTPAuthorizationCredentials(scheme="Bearer", credentials="")):
        with pytest.raises(ApiError) as caught:
            keys.require(credentials)
        assert caught.value.status == 401 and caught.value.headers == {"WWW-Authenticate": "Bearer"}
    assert not ApiKeys([])


@pytest.fixture(scope="module")
def service(ray_cluster: None, tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("keys")
    with running_service(APP, tiny_model, work, {
            "auth.api_keys": [LISTED], "auth.api_keys_file": str(_key_file(work)),
            "limits.image_timeout_s": 0.01}) as url:  # no image is that fast: the image route always times out here
        yield url


@pytest.mark.slow
def test_protected_routes_answer_401_in_openai_shape(service: str) -> None:
    some_id = "video_" + "0" * 32
    routes = [("GET", "/v1/models"), ("GET", "/v1/videos"), ("POST", "/v1/videos"), ("GET", f"/v1/videos/{some_id}"),
              ("DELETE", f"/v1/videos/{some_id}"), ("POST", "/v1/images/generations")]
    bad = [{}, {"Authorization": "Bearer wrong-key-000000"}, {"Authorization": f"Basic {LISTED}"},
           {"Authorization": f"Bearer {LISTED}x"}]
    with httpx.Client(base_url=service, timeout=60) as client:
        for method, path in routes:
            for headers in bad:
                refused = client.request(method, path, headers=headers, json={"prompt": "x", **SMALL})
                assert refused.status_code == 401, (method, path, headers, refused.text)
                assert refused.headers["www-authenticate"] == "Bearer"
                assert refused.json()["error"]["code"] == "invalid_api_key"
        for key in (LISTED, FILED):
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
            assert client.get(path).status_code == 200, path
        doc = client.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["bearerAuth"]
        ["description"]}
    assert doc["paths"]["/v1/videos"]["post"]["security"] == [{"bearerAuth": []}]
    assert "401" in doc["paths"]["/v1/models"]["get"]["responses"]


@pytest.mark.slow
def test_openai_client_with_api_key(service: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{service}/v1", api_key=FILED)
    assert client.models.list().data[0].id == "wan-tiny"
    video = client.videos.create(prompt="a red circle", extra_body=SMALL)
    for _ in range(1200):
        video = client.videos.retrieve(video.id)
        if video.status in ("completed", "failed"):
            break
        time.sleep(0.1)
    assert video.status == "completed", video
    assert client.videos.download_content(video.id).read()[4:8] == b"ftyp"  # an mp4
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{service}/v1", api_key="wrong-key-000000", max_retries=0).models.list()


@pytest.mark.slow
def test_image_wait_is_bounded_and_the_job_kept(service: str) -> None:
    auth = {"Authorization": f"Bearer {LISTED}"}
    with httpx.Client(base_url=service, timeout=60, headers=auth) as client:
        answer = client.post("/v1/images/generations", json={"prompt": "a green triangle", "height": 32,
                                                              "width": 32, "num_inference_steps": 2})
        assert answer.status_code == 503 and answer.headers["retry-after"], answer.text
        error = answer.json()["error"]
        image_id = error["message"].split()[1]
        assert error["code"] == "timeout" and image_id.startswith("img_"), error
        deadline = time.monotonic() + 120
        while client.get(f"/v1/videos/{image_id}").json()["job_status"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        png = client.get(f"/v1/images/{image_id}/content")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
