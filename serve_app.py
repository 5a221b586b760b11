"""The Ray Serve application: an OpenAI-compatible HTTP API and a Python handle over the stage engine.

    serve run serve_app:app                                   # embedded default model, defaults
    serve run serve_app:app_builder model=/ckpt/Wan2.1-T2V-1.3B dit.world_size=2 vae.replicas=2
    serve run config/serve.yaml                               # the same from a Serve config file

One ingress replica owns the `StageEngine`, which owns the stage pools (each with its own
placement group). Routes (OpenAI video/image API shapes, so the `openai` client works):
POST/GET /v1/videos, GET/DELETE /v1/videos/{id}, GET /v1/videos/{id}/content,
GET /v1/videos/{id}/events (server-sent events), POST /v1/images/generations, GET /v1/models,
GET /healthz, GET /readyz. Handle methods: generate, submit, status, cancel.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Mapping

import pydantic
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from actors.config import ServiceConfig
from actors.engine import JobNotFound, QueueFull, StageEngine
from actors.job_store import JobRecord
from stages.params import GenerationParams

logger = logging.getLogger("ray.serve")

# Our job status -> the OpenAI video status.
_OPENAI_STATUS = {"queued": "queued", "encoding": "in_progress", "denoising": "in_progress",
                  "decoding": "in_progress", "succeeded": "completed", "failed": "failed", "cancelled": "failed"}


# ---------------------------------------------------------------------------------------------
# Request bodies: OpenAI's fields plus every generation parameter (sent as extra_body by openai)
# ---------------------------------------------------------------------------------------------
def _parse_size(size: str) -> tuple[int, int]:
    """OpenAI sizes are 'WIDTHxHEIGHT'."""
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like WIDTHxHEIGHT (e.g. 832x480), got {size!r}") from None
    return width, height


class _OpenAIFields(pydantic.BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="Accepted for OpenAI compatibility; the service runs one model.")
    size: str | None = Field(None, description="WIDTHxHEIGHT; overridden by explicit width/height.")
    priority: int = Field(0, ge=-100, le=100, description="Higher runs first; FIFO within a priority.")


class VideoCreate(_OpenAIFields):
    seconds: str | int | None = Field(None, description="Duration; becomes num_frames = 4n+1 nearest seconds*fps+1.")


class ImageCreate(_OpenAIFields):
    n: int = Field(1, ge=1, le=1, description="Images per request (1).")
    response_format: Literal["b64_json", "url"] = "b64_json"


# Form fields arrive as strings; these stay strings, every other field is parsed as JSON ("32" -> 32).
_TEXT_FIELDS = {"prompt", "negative_prompt", "model", "size", "seconds", "response_format", "sampler"}


async def _read_body(request: Request) -> dict[str, Any]:
    """JSON, or multipart/url-encoded form (what the openai client sends for videos.create)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form()
        data: dict[str, Any] = {}
        for key, value in form.multi_items():
            if not isinstance(value, str):
                raise ValueError(f"file uploads are not supported (field {key!r})")
            if key in _TEXT_FIELDS:
                data[key] = value
                continue
            try:
                data[key] = json.loads(value)
            except json.JSONDecodeError:
                data[key] = value
        return data
    try:
        body = await request.json()
    except json.JSONDecodeError as exc:
        raise ValueError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    return body


def _generation_params(body: _OpenAIFields, fps: int, single_frame: bool) -> GenerationParams:
    """Translate OpenAI fields, then validate everything as our request schema (errors name the field)."""
    fields: dict[str, Any] = dict(body.model_extra or {})
    if body.size is not None:
        width, height = _parse_size(body.size)
        fields.setdefault("width", width)
        fields.setdefault("height", height)
    if isinstance(body, VideoCreate) and body.seconds is not None and "num_frames" not in fields:
        try:
            seconds = float(body.seconds)
        except ValueError:
            raise ValueError(f"seconds must be a number, got {body.seconds!r}") from None
        fields["num_frames"] = 4 * max(0, round(seconds * fps / 4)) + 1
    if single_frame:
        fields["num_frames"] = 1
    return GenerationParams.model_validate(fields)


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------
def video_object(record: JobRecord, model_name: str) -> dict[str, Any]:
    """An OpenAI `Video` object, plus our own fields (stage status, steps, parameters)."""
    params = record.params
    error = None
    if record.status in ("failed", "cancelled"):
        error = {"code": record.status, "message": record.error or record.status}
    return {
        "id": record.id,
        "object": "video",
        "created_at": int(record.created_at),
        "completed_at": int(record.finished_at) if record.finished_at else None,
        "expires_at": None,
        "status": _OPENAI_STATUS[record.status],
        "progress": int(round(100 * record.progress)),
        "model": model_name,
        "prompt": params.get("prompt"),
        "seconds": f"{(params.get('num_frames', 1) - 1) / max(1, params.get('fps', 16)):g}",
        "size": f"{params.get('width')}x{params.get('height')}",
        "remixed_from_video_id": None,
        "error": error,
        # Smart-Diffusion extensions
        "job_status": record.status,
        "step": record.step,
        "total_steps": record.total_steps,
        "priority": record.priority,
        "params": params,
        "timings": record.timings,
        "stage_times": record.stage_times,
        "attempts": record.attempts,
    }


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _validation_error(exc: pydantic.ValidationError | RequestValidationError) -> JSONResponse:
    """422 with FastAPI's `detail` list and an OpenAI-style `error` naming the first bad field."""
    errors = exc.errors()
    detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg")), "type": e.get("type")} for e in errors]
    first = detail[0] if detail else {"loc": [], "msg": "invalid request"}
    fields = [str(p) for p in first["loc"] if p != "body"]
    message = "; ".join(d["msg"] for d in detail)
    body = {"detail": detail, "error": {"message": message, "type": "invalid_request_error",
                                        "param": ".".join(fields) or None, "code": "invalid_value"}}
    return JSONResponse(body, status_code=422)


# ---------------------------------------------------------------------------------------------
# Metrics (ray.serve.metrics adds application/deployment/replica tags)
# ---------------------------------------------------------------------------------------------
class ServeMetrics:
    def __init__(self) -> None:
        from ray.serve import metrics

        self._latency = metrics.Histogram(
            "smartdiff_stage_latency_s", description="Seconds a job spent in each stage.",
            boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800], tag_keys=("stage",))
        self._depth = metrics.Gauge("smartdiff_queue_depth", description="Jobs waiting per stage.",
                                    tag_keys=("stage",))
        self._steps = metrics.Counter("smartdiff_denoise_steps", description="Denoising steps run.")
        self._jobs = metrics.Counter("smartdiff_jobs", description="Jobs by final status.", tag_keys=("status",))

    def stage_latency(self, stage: str, seconds: float) -> None:
        self._latency.observe(seconds, tags={"stage": stage})

    def queue_depths(self, depths: Mapping[str, int]) -> None:
        for stage, depth in depths.items():
            self._depth.set(depth, tags={"stage": stage})

    def denoise_steps(self, steps: int) -> None:
        if steps:
            self._steps.inc(steps)

    def job_finished(self, status: str) -> None:
        self._jobs.inc(tags={"status": status})


# ---------------------------------------------------------------------------------------------
# The deployment
# ---------------------------------------------------------------------------------------------
api = FastAPI(title="Smart-Diffusion", version="0.1.0",
              description="OpenAI-compatible text-to-video / text-to-image API over a Ray stage pipeline.")


@api.exception_handler(RequestValidationError)
async def _on_request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _validation_error(exc)


class VideoService:
    """Ingress: HTTP routes and handle methods, all backed by one StageEngine."""

    async def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = ServiceConfig.model_validate(config)
        self.engine = StageEngine(self.cfg, metrics=ServeMetrics())
        self.model_name = self.engine.preset.name
        await self.engine.start()

    async def check_health(self) -> None:
        if not self.engine.ready:
            raise RuntimeError("stage engine is not running")

    async def __del__(self) -> None:
        await self.engine.shutdown()

    # ---- handle API (in-cluster Python callers) ----
    async def submit(self, params: dict[str, Any], priority: int = 0) -> dict[str, Any]:
        """Queue a job; returns its video object at once."""
        return video_object(await self.engine.submit(params, priority=priority), self.model_name)

    async def generate(self, params: dict[str, Any], priority: int = 0,
                       timeout_s: float | None = None) -> dict[str, Any]:
        """Run a job to the end; returns the final video object (result path in `result_path`)."""
        record = await self.engine.generate(params, priority=priority, timeout_s=timeout_s)
        return {**video_object(record, self.model_name), "result_path": record.result_path}

    async def status(self, job_id: str) -> dict[str, Any]:
        record = self.engine.status(job_id)
        return {**video_object(record, self.model_name), "result_path": record.result_path}

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return video_object(await self.engine.cancel(job_id), self.model_name)

    # ---- HTTP ----
    def _overloaded(self, exc: QueueFull) -> JSONResponse:
        retry = str(self.cfg.scheduler.retry_after_s)
        return _error(429, str(exc), code="queue_full", headers={"Retry-After": retry})

    async def _accept(self, request: Request, body_cls: type[_OpenAIFields],
                      kind: str) -> JSONResponse | tuple[_OpenAIFields, JobRecord]:
        """Parse, validate and submit a creation request: (body, job record), or the error response."""
        try:
            body = body_cls.model_validate(await _read_body(request))
            params = _generation_params(body, self.engine.preset.defaults.fps, single_frame=kind == "image")
            return body, await self.engine.submit(params, priority=body.priority, kind=kind)
        except pydantic.ValidationError as exc:
            return _validation_error(exc)
        except ValueError as exc:
            return _error(422, str(exc))
        except QueueFull as exc:
            return self._overloaded(exc)

    @api.post("/v1/videos")
    async def create_video(self, request: Request) -> JSONResponse:
        """Body: JSON or form; OpenAI's fields (prompt, model, size, seconds) plus any request parameter."""
        accepted = await self._accept(request, VideoCreate, "video")
        if isinstance(accepted, JSONResponse):
            return accepted
        return JSONResponse(video_object(accepted[1], self.model_name))

    @api.get("/v1/videos")
    async def list_videos(self, limit: int = Query(20, ge=1, le=100), after: str | None = None) -> JSONResponse:
        records = self.engine.store.list(limit=limit + 1, after=after)
        page = records[:limit]
        data = [video_object(r, self.model_name) for r in page]
        return JSONResponse({"object": "list", "data": data, "has_more": len(records) > limit,
                             "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})

    @api.get("/v1/videos/{video_id}")
    async def retrieve_video(self, video_id: str) -> JSONResponse:
        try:
            return JSONResponse(video_object(self.engine.status(video_id), self.model_name))
        except JobNotFound as exc:
            return _error(404, str(exc), param="video_id", code="not_found")

    @api.get("/v1/videos/{video_id}/content")
    async def video_content(self, video_id: str) -> Any:
        try:
            record = self.engine.status(video_id)
        except JobNotFound as exc:
            return _error(404, str(exc), param="video_id", code="not_found")
        if record.status != "succeeded" or not record.result_path or not Path(record.result_path).is_file():
            return _error(409, f"video {video_id} has no content (status {record.status})", code="not_ready")
        path = Path(record.result_path)
        return FileResponse(path, media_type="image/png" if path.suffix == ".png" else "video/mp4",
                            filename=path.name)

    @api.get("/v1/images/{image_id}/content")
    async def image_content(self, image_id: str) -> Any:
        return await self.video_content(image_id)

    @api.delete("/v1/videos/{video_id}")
    async def delete_video(self, video_id: str) -> JSONResponse:
        """Cancels an unfinished job (kept, status cancelled); deletes a finished one and its files."""
        try:
            record = self.engine.status(video_id)
            if not record.done:
                record = await self.engine.cancel(video_id)
                return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": False,
                                     "job_status": record.status})
            self.engine.delete(video_id)
        except JobNotFound as exc:
            return _error(404, str(exc), param="video_id", code="not_found")
        return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})

    @api.get("/v1/videos/{video_id}/events")
    async def video_events(self, video_id: str) -> Any:
        try:
            self.engine.status(video_id)
        except JobNotFound as exc:
            return _error(404, str(exc), param="video_id", code="not_found")

        async def stream() -> AsyncIterator[str]:
            async for event in self.engine.events(video_id):
                yield f"event: {event['status']}\ndata: {json.dumps(event)}\n\n"
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.post("/v1/images/generations")
    async def create_image(self, request: Request) -> JSONResponse:
        accepted = await self._accept(request, ImageCreate, "image")
        if isinstance(accepted, JSONResponse):
            return accepted
        body, record = accepted
        record = await self.engine.wait(record.id)
        if record.status != "succeeded" or not record.result_path:
            return _error(500, f"image generation {record.status}: {record.error}", code=record.status)
        if isinstance(body, ImageCreate) and body.response_format == "url":
            item = {"url": str(request.url_for("image_content", image_id=record.id))}
        else:
            item = {"b64_json": base64.b64encode(Path(record.result_path).read_bytes()).decode()}
        return JSONResponse({"created": int(record.created_at), "data": [{**item, "revised_prompt": None}],
                             "id": record.id})

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                         "created": int(time.time()), "owned_by": "smart-diffusion",
                                                         "root": str(self.engine.model_path)}]})

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        snapshot = self.engine.snapshot()
        return JSONResponse(snapshot, status_code=200 if snapshot["ready"] else 503)


def build_app(cfg: ServiceConfig, name: str = "VideoService", **deployment_options: Any) -> Application:
    """Bind the ingress for `cfg` (validated already). The replica itself needs little: the stage
    pools reserve their own placement groups. `deployment_options` override the Serve options
    below (fault tests shorten health_check_period_s)."""
    ingress = serve.ingress(api)(VideoService)
    deployment = serve.deployment(
        ingress,
        name=name,
        num_replicas=1,  # one engine owns the pools; scale with pool sizes / DiT groups instead
        ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=1000,  # long polls and event streams stay open; admission is the engine's
        max_queued_requests=1000,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=cfg.scheduler.retry_after_s),
        health_check_period_s=10,
        health_check_timeout_s=30,
        max_surge_percent=0,  # the job store has one owner: an old replica stops before its successor starts
    ).options(**deployment_options)
    return deployment.bind(json.loads(cfg.model_dump_json()))


def app_builder(args: dict[str, str]) -> Application:
    """`serve run serve_app:app_builder [config=service.yaml] key.sub=value ...`"""
    args = dict(args)
    config_file = args.pop("config", None)
    return build_app(ServiceConfig.load(config_file, [f"{k}={v}" for k, v in args.items()]))


app = build_app(ServiceConfig())
