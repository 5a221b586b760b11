"""The HTTP contract: what /openapi.json promises is what the service does, and bad input never gets a 5xx.

The fast tests check the request contract (serve_app.RequestContract) on its own. The slow ones
start one service with tiny operator limits (64x64, 5 frames, 3 steps), a queue of 2 and an API
key, and run schemathesis over the whole API (`--checks all`: positive and negative data, status
codes, content types, headers, response schemas, 405 Allow, auth, stateful links), plus the cases a
new user reported.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from typing import Any, Iterator

import httpx
import pytest

from actors.config import SCHEMA_MAX_FRAMES, SCHEMA_MAX_SIZE, SCHEMA_MAX_STEPS, LimitsConfig, ServiceConfig
from models.flux.config import get_preset as flux_preset
from models.flux.family import description as flux_description
from models.wan.config import SamplingDefaults, get_preset
from models.wan.family import description
from tests.serve_helpers import running_service
from serve_app import ApiError, RequestContract
from stages import params

KEY = "contract-test-key-0123"
TINY_LIMITS = {"max_width": 64, "max_height": 64, "max_frames": 5, "max_steps": 3}
TINY_DEFAULTS = SamplingDefaults(height=64, width=64, num_frames=17, num_inference_steps=20)


@pytest.fixture(scope="module")
def contract() -> RequestContract:
    return RequestContract(LimitsConfig(**TINY_LIMITS), dataclasses.replace(description(get_preset("wan-tiny")),
                                                                             defaults=TINY_DEFAULTS), "wan-tiny")


def _refusal(contract: RequestContract, body: Any, image: bool = False) -> ApiError:
    with pytest.raises(ApiError) as caught:
        contract.parse(body, image=image)
    return caught.value


def test_config_maxima_are_the_request_schema_maxima() -> None:
    assert (SCHEMA_MAX_SIZE, SCHEMA_MAX_FRAMES, SCHEMA_MAX_STEPS) == (params.MAX_SIZE, params.MAX_FRAMES,
                                                                      params.MAX_STEPS)
    limits = ServiceConfig().limits
    assert (limits.max_width, limits.max_height, limits.max_frames, limits.max_steps) == (2048, 2048, 257, 200)
    with pytest.raises(ValueError, match="4n\\+1.*use 5"):
        LimitsConfig(max_frames=6)


@pytest.mark.parametrize("seconds", ["1e308", "inf", "-5", "nan", -5, 1e308, "0.5", 0.3, True])
def test_bad_seconds_are_422_naming_the_range(contract: RequestContract, seconds: Any) -> None:
    refusal = _refusal(contract, {"prompt": "x", "seconds": seconds})
    assert refusal.status == 422 and refusal.param == "seconds"
    assert "between 0 and 0.25" in refusal.message, refusal.message


def test_seconds_become_4n_plus_1_frames(contract: RequestContract) -> None:
    assert contract.parse({"prompt": "x", "seconds": 0.25}, image=False)[1].num_frames == 5
    assert contract.parse({"prompt": "x", "seconds": "0"}, image=False)[1].num_frames == 1
    big = RequestContract(LimitsConfig(), description(get_preset("wan2.1-t2v-1.3b")), "wan2.1-t2v-1.3b")
    assert big.parse({"prompt": "x", "seconds": "4"}, image=False)[1].num_frames == 65  # OpenAI's "4" at 16 fps
    assert _refusal(big, {"prompt": "x", "seconds": "17"}).param == "seconds"


def test_unknown_model_is_404_naming_the_served_one(contract: RequestContract) -> None:
    refusal = _refusal(contract, {"prompt": "x", "model": "../../etc/passwd"})
    assert (refusal.status, refusal.code, refusal.param) == (404, "model_not_found", "model")
    assert "'wan-tiny'" in refusal.message
    assert contract.parse({"prompt": "x", "model": "wan-tiny"}, image=False)
    assert contract.parse({"prompt": "x", "model": None}, image=True)


def test_limits_are_enforced_and_defaults_capped(contract: RequestContract) -> None:
    for field, value in [("height", 80), ("width", 128), ("num_inference_steps", 4), ("num_frames", 9)]:
        refusal = _refusal(contract, {"prompt": "x", field: value})
        assert refusal.status == 422 and refusal.param == field
        assert "this service's limit" in refusal.message, refusal.message
    assert _refusal(contract, {"prompt": "x", "size": "80x64"}).param == "size"
    params_ = contract.parse({"prompt": "x"}, image=False)[1]  # the model's 17 frames, 20 steps are capped
    assert (params_.width, params_.height, params_.num_frames, params_.num_inference_steps) == (64, 64, 5, 3)
    image = contract.parse({"prompt": "x", "size": "32x48", "num_inference_steps": 2}, image=True)[1]
    assert (image.width, image.height, image.num_frames) == (32, 48, 1)
    assert _refusal(contract, {"prompt": "x", "num_frames": 1}, image=True).param == "num_frames"  # unknown


def test_types_are_strict(contract: RequestContract) -> None:
    for body in ({"prompt": "x", "height": "32"}, {"prompt": "x", "height": True}, {"prompt": " "},
                 {"prompt": "\ud800"}, {"prompt": "x", "extra": 1}, ["prompt"], {"prompt": "x", "seed": 1.5}):
        assert _refusal(contract, body).status == 422, body
    assert contract.parse({"prompt": "x", "height": 32.0, "seed": 7.0}, image=False)[1].height == 32
    assert contract.parse({"prompt": "  x"}, image=False)[1].prompt == "  x"  # not blank is not "no spaces"


def test_the_published_schema_follows_the_model() -> None:
    """An image model (FLUX.1-dev): one frame, its sampler only, no negative prompt, no second expert; the
    request fields it refuses are unknown fields (422 naming them), its defaults are in the descriptions."""
    dev = RequestContract(LimitsConfig(), flux_description(flux_preset("flux1-dev")), "flux1-dev")
    for model in (dev.video, dev.image):
        props = model.model_json_schema()["properties"]
        assert {"negative_prompt", "guidance_scale_2"}.isdisjoint(props) and "guidance_scale" in props
        assert props["sampler"]["anyOf"][0] == {"const": "flowmatch-euler", "type": "string"}
        assert "Default here: flowmatch-euler" not in props["sampler"]["description"]
        assert "Default here: 'flowmatch-euler'" in props["sampler"]["description"]
        assert "Default here: 3.5" in props["guidance_scale"]["description"]
        assert "exp(mu)" in props["shift"]["description"] and "Default here: 1024" in props["width"]["description"]
    video = dev.video.model_json_schema()["properties"]
    assert video["num_frames"]["anyOf"][0] == {"const": 1, "type": "integer"}
    assert "num_frames" not in dev.image.model_json_schema()["properties"]
    refusal = _refusal(dev, {"prompt": "x", "negative_prompt": "blurry"}, image=True)
    assert (refusal.status, refusal.param) == (422, "negative_prompt")
    assert refusal.message == ("negative_prompt is not a field of flux1-dev: flux1-dev runs no negative branch (its "
                               "guidance is 'distilled', not classifier-free); leave it out")
    assert _refusal(dev, {"prompt": "x", "num_frames": 5}).param == "num_frames"
    assert _refusal(dev, {"prompt": "x", "sampler": "unipc"}, image=True).param == "sampler"
    params_ = dev.parse({"prompt": "x", "seconds": 0}, image=False)[1]
    assert (params_.num_frames, params_.width, params_.num_inference_steps) == (1, 1024, 28)
    schnell = RequestContract(LimitsConfig(), flux_description(flux_preset("flux1-schnell")), "flux1-schnell")
    assert "guidance_scale" not in schnell.image.model_json_schema()["properties"]
    refusal = _refusal(schnell, {"prompt": "x", "guidance_scale": 3.5}, image=True)
    assert (refusal.status, refusal.param) == (422, "guidance_scale")
    # Wan: every Wan sampler, a negative prompt; guidance_scale_2 only with two experts
    wan = RequestContract(LimitsConfig(), description(get_preset("wan2.1-t2v-1.3b")), "wan2.1-t2v-1.3b")
    props = wan.video.model_json_schema()["properties"]
    assert props["sampler"]["anyOf"][0]["enum"] == ["unipc", "dpm++", "euler"] and "negative_prompt" in props
    assert "guidance_scale_2" not in props
    a14b = RequestContract(LimitsConfig(), description(get_preset("wan2.2-t2v-a14b")), "wan2.2-t2v-a14b")
    assert "Default here: 3" in a14b.video.model_json_schema()["properties"]["guidance_scale_2"]["description"]


def test_a_per_model_rule_the_schema_cannot_state_is_still_a_422() -> None:
    """`GenerationParams.check` runs after the schema: its refusals are 422 with the field, never a 5xx."""
    model = description(get_preset("wan-tiny"))
    contract = RequestContract(LimitsConfig(**TINY_LIMITS), model, "wan-tiny")
    contract.model = dataclasses.replace(model, samplers=("unipc",))  # narrower than the published schema
    refusal = _refusal(contract, {"prompt": "x", "sampler": "euler"})
    assert (refusal.status, refusal.param, refusal.code) == (422, "sampler", "invalid_value")
    assert refusal.detail == [{"loc": ["sampler"], "type": "invalid_sampler", "msg": refusal.message}]
    assert refusal.message.startswith("sampler must be one of 'unipc' (the samplers of wan-tiny)")


# ---------------------------------------------------------------------------------------------
# The running service
# ---------------------------------------------------------------------------------------------
APP = "smartdiff-contract"


@pytest.fixture(scope="module")
def service(ray_cluster: None, tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_service(APP, tiny_model, tmp_path_factory.mktemp("contract"), {
            "scheduler.max_pending_jobs": 2, "scheduler.retry_after_s": 1, "auth.api_keys": [KEY],
            "limits": {**TINY_LIMITS, "max_body_bytes": 4096, "image_timeout_s": 120}}) as url:
        yield url


@pytest.fixture()
def client(service: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


@pytest.mark.slow
def test_reported_bugs_are_4xx(client: httpx.Client) -> None:
    for seconds in ("1e308", "inf", "-5"):
        refused = client.post("/v1/videos", json={"prompt": "x", "seconds": seconds})
        assert refused.status_code == 422 and refused.json()["error"]["param"] == "seconds", refused.text
    cursor = client.get("/v1/videos", params={"after": "zzz"})
    assert cursor.status_code == 422 and cursor.json()["error"]["param"] == "after", cursor.text
    unknown = client.get("/v1/videos", params={"after": "video_" + "0" * 32})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "after"
    model = client.post("/v1/videos", json={"prompt": "x", "model": "../../etc/passwd"})
    assert model.status_code == 404 and model.json()["error"]["code"] == "model_not_found"
    assert client.get("/v1/videos/..%2F..%2Fetc%2Fpasswd").status_code == 404
    assert client.get("/v1/images/video_" + "0" * 32 + "/content").status_code == 404


@pytest.mark.slow
def test_bodies_over_the_limit_are_413_before_parsing(client: httpx.Client) -> None:
    big = b'{"prompt": "' + b"x" * 5000 + b'"}'
    declared = client.post("/v1/videos", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "body_too_large"
    streamed = client.post("/v1/videos", content=iter([big[:3000], big[3000:]]),
                           headers={"content-type": "application/json"})  # chunked: no Content-Length
    assert streamed.status_code == 413, streamed.text
    assert client.post("/v1/videos", content=b"x", headers={"content-type": "text/plain"}).status_code == 415


@pytest.mark.slow
def test_405_lists_every_allowed_method(client: httpx.Client) -> None:
    refused = client.put("/v1/videos")
    assert refused.status_code == 405 and refused.headers["allow"] == "GET, POST"
    assert refused.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.slow
def test_openapi_publishes_the_enforced_limits(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    video = doc["components"]["schemas"]["VideoCreateRequest"]["properties"]
    assert video["height"]["anyOf"][0]["maximum"] == 64
    assert video["num_inference_steps"]["anyOf"][0]["maximum"] == 3
    assert video["num_frames"]["anyOf"][0]["enum"] == [1, 5]
    assert video["model"]["anyOf"][0]["const"] == "wan-tiny"
    post = doc["paths"]["/v1/videos"]["post"]
    assert set(post["requestBody"]["content"]) == {"application/json", "multipart/form-data",
                                                   "application/x-www-form-urlencoded"}
    assert {"401", "404", "413", "422", "429", "503"} <= set(post["responses"])
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert "security" not in doc["paths"]["/healthz"]["get"]
    page = client.get("/docs")  # served with its own Swagger UI files: no CDN needed
    assert page.status_code == 200 and "cdn" not in page.text.lower()
    assert "/docs-static/swagger-ui-bundle.js" in page.text
    script = client.get("/docs-static/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 100_000


@pytest.mark.slow
def test_schemathesis_finds_nothing(service: str, tmp_path: Any) -> None:
    """Every phase (examples, coverage, fuzzing, stateful) with every check; bounded examples."""
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{service}/openapi.json", "--checks", "all",
         "--max-examples", "10", "--seed", "1", "--workers", "1", "--request-timeout", "180",
         "--generation-database", "none", "-H", f"Authorization: Bearer {KEY}", "--no-color"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    report = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    assert "failures" not in report.splitlines()[-1], report
    print(f"schemathesis: {time.monotonic() - started:.0f} s\n{report[-400:]}")


def test_job_errors_show_their_headline_only() -> None:
    """Ray errors carry a remote traceback; the API shows the first line (the engine logs the rest)."""
    from actors.job_store import JobRecord
    from serve_app import video_object

    error = "decoding failed: ray::VAEDecoderActor.decode() (pid=1, ip=1.2.3.4)\nTraceback (most recent call " \
            "last):\n  File \"stages/decode.py\", line 9, in run\nRuntimeError: out of memory"
    record = JobRecord(id="video_" + "0" * 32, kind="video", params={"prompt": "x", "num_frames": 5, "fps": 16},
                       priority=0, status="failed", step=0, total_steps=3, created_at=1.0, updated_at=2.0,
                       finished_at=2.0, attempts=1, error=error, result_path=None, sidecar_path=None, timings={},
                       stage_times={}, key=None)
    shown = video_object(record, "wan-tiny")["error"]
    assert shown == {"code": "failed", "message": "decoding failed: ray::VAEDecoderActor.decode() (pid=1, "
                                                  "ip=1.2.3.4)"}
