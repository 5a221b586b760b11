"""FLUX.1 through the service: HTTP (images endpoint, the refusal of /v1/videos, per-model 422s), a batch run
on the same engine code, on a 2-rank Ulysses DiT group over the joint text+image sequence and a 2-rank
patch-parallel VAE (tiny random FLUX.1-dev release folder, CPU).

The service result equals the in-process single-rank Pipeline up to uint8 rounding: the parallel DiT and the
strip decode sum in another order than one process (fp32), which can flip a rounding, never more.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import httpx
import numpy as np
import pytest

from tests.serve_helpers import running_service

pytestmark = pytest.mark.slow

APP = "smartdiff-flux-test"
PROMPT = "a red circle on the moon"
REQUEST = {"prompt": PROMPT, "size": "64x48", "num_inference_steps": 2, "seed": 4}


@pytest.fixture(scope="module")
def flux_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from models.flux.tiny import write_random_checkpoint

    return str(write_random_checkpoint(tmp_path_factory.mktemp("flux-tiny"), layout="original", seed=2))


@pytest.fixture(scope="module")
def service(ray_cluster: None, flux_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_service(APP, flux_model, tmp_path_factory.mktemp("flux-service"), {
            "dit.world_size": 2, "dit.ulysses_degree": 2, "vae.patch_parallel": 2}) as url:
        yield url


def _png(data: bytes) -> np.ndarray:
    import imageio.v3 as iio

    return iio.imread(io.BytesIO(data), extension=".png")


def test_images_endpoint_serves_flux_like_the_in_process_pipeline(service: str, flux_model: str) -> None:
    from stages.pipeline import Pipeline

    with httpx.Client(base_url=service, timeout=300) as client:
        answer = client.post("/v1/images/generations", json=REQUEST)
        assert answer.status_code == 200, answer.text
        got = _png(base64.b64decode(answer.json()["data"][0]["b64_json"]))
        job = client.get(f"/v1/videos/{answer.json()['id']}").json()
    assert answer.json()["id"].startswith("img_") and got.shape == (48, 64, 3)
    assert job["step"] == job["total_steps"] == 2
    expected = Pipeline.from_pretrained(flux_model).generate(
        {"prompt": PROMPT, "height": 48, "width": 64, "num_inference_steps": 2, "seed": 4}).frames[0]
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_an_image_model_refuses_videos_and_its_own_bad_fields(service: str) -> None:
    with httpx.Client(base_url=service, timeout=60) as client:
        video = client.post("/v1/videos", json={"prompt": PROMPT})
        assert video.status_code == 400 and video.json()["error"]["code"] == "image_model"
        assert "/v1/images/generations" in video.json()["error"]["message"]
        frames = client.post("/v1/images/generations", json={**REQUEST, "num_frames": 5})
        assert frames.status_code == 422 and frames.json()["error"]["param"] == "num_frames"
        second = client.post("/v1/images/generations", json={**REQUEST, "guidance_scale_2": 2.0})
        assert second.status_code == 422 and second.json()["error"]["param"] == "guidance_scale_2"
        schema = client.get("/openapi.json").json()["components"]["schemas"]["ImageCreateRequest"]["properties"]
        assert "guidance_scale_2" not in schema


def test_a_batch_of_flux_prompts_runs_on_the_engine(ray_cluster: None, flux_model: str, tmp_path: Path,
                                                    run: Callable[[Awaitable[Any]], Any]) -> None:
    """`actors.batch.run_batch` (what `ray job submit ... -m actors.batch` runs) on a FLUX engine: pngs, and the
    per-model rule errors in the manifest rows."""
    from actors.batch import read_items, run_batch
    from actors.engine import StageEngine
    from tests.serve_helpers import service_config

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(row) for row in [
        {"id": "moon", "prompt": PROMPT, "height": 32, "width": 32, "num_inference_steps": 2, "seed": 1},
        {"id": "frames", "prompt": PROMPT, "num_frames": 9},
    ]) + "\n")

    async def batch() -> list[dict[str, Any]]:
        engine = StageEngine(service_config(flux_model, tmp_path, {}))
        await engine.start()
        try:
            return await run_batch(read_items(prompts), engine, progress=False)
        finally:
            await engine.shutdown()

    rows = {row["key"]: row for row in run(batch())}
    assert rows["moon"]["status"] == "succeeded" and rows["moon"]["result_path"].endswith(".png")
    assert rows["moon"]["id"].startswith("img_")
    assert rows["frames"]["status"] == "failed" and "num_frames" in rows["frames"]["error"]


def test_the_python_handle_generates_an_image(service: str) -> None:
    from ray import serve

    handle = serve.get_app_handle(APP)
    result = handle.generate.remote({"prompt": PROMPT, "height": 32, "width": 32, "num_inference_steps": 2,
                                     "seed": 7}).result(timeout_s=300)
    assert result["status"] == "completed" and result["id"].startswith("img_")
    assert result["result_path"].endswith(".png") and Path(result["result_path"]).is_file()
