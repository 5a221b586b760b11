"""The Ray Serve application: an OpenAI-compatible HTTP API and a Python handle over the stage engine.

    serve run serve_app:app                                   # embedded default model, defaults
    serve run serve_app:app_builder model=/ckpt/Wan2.1-T2V-1.3B dit.world_size=2 vae.replicas=2
    serve run config/serve.yaml                               # the same from a Serve config file

One ingress replica owns the `StageEngine`, which owns the stage pools (each with its own
placement group). The replica builds its FastAPI app from its config (`__serve_build_asgi_app__`),
so /openapi.json publishes the limits it enforces (`limits.*`), the model it serves and, when API
keys are set (`auth.*`), the bearer scheme. Routes (OpenAI video/image API shapes, so the `openai`
client works): POST/GET /v1/videos, GET/DELETE /v1/videos/{id}, POST /v1/videos/{id}/cancel,
GET /v1/videos/{id}/content, GET /v1/videos/{id}/events (server-sent events),
POST /v1/images/generations, GET /v1/images/{id}/content, GET /v1/models, GET /healthz, GET /readyz;
/docs is the interactive documentation. Every error is OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`. Handle methods: generate, submit, status, cancel.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Mapping

import pydantic
from fastapi import FastAPI, Query, Request, Security
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from pydantic.fields import FieldInfo
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actors.config import LimitsConfig, ServiceConfig
from actors.engine import JobNotFound, QueueFull, StageEngine
from actors.job_store import JobRecord, JobStatus
from models.family import FrameRule, ModelDescription
from stages.params import GenerationParams, describe_cache_error, model_rules

logger = logging.getLogger("ray.serve")

# Our job status -> the OpenAI video status.
_OPENAI_STATUS = {"queued": "queued", "encoding": "in_progress", "denoising": "in_progress",
                  "decoding": "in_progress", "succeeded": "completed", "failed": "failed", "cancelled": "failed"}
JOB_ID_PATTERN = r"^(video|img)_[0-9a-f]{32}$"  # what JobStore.create makes; checked before any lookup
IMAGE_ID_PATTERN = r"^img_[0-9a-f]{32}$"
PUBLIC_PATHS = ("/healthz", "/readyz")  # besides /docs and /openapi.json, open even when API keys are set
_STOP_WAIT_S = 60.0  # how long DELETE waits for a running job to stop (at its next step boundary when denoising)


# ---------------------------------------------------------------------------------------------
# Errors: one exception, answered in OpenAI's shape
# ---------------------------------------------------------------------------------------------
class ApiError(Exception):
    """An answer other than 2xx: status, a message for people, the field at fault and a code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None, detail: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers, self.detail = dict(headers or {}), detail

    def response(self) -> JSONResponse:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        body: dict[str, Any] = {"error": {"message": self.message, "type": kind, "param": self.param,
                                          "code": self.code}}
        if self.detail is not None:
            body["detail"] = self.detail
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _describe(value: Any) -> str:
    """A short rendering of an offending input for an error message."""
    text = f"a string of {len(value)} characters" if isinstance(value, str) and len(value) > 60 else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _headline(text: str | None) -> str | None:
    """The first line of an error text: Ray's errors append a remote traceback that users must not see."""
    if not text:
        return text
    lines = text.strip().splitlines()
    return lines[0] if lines else text


def _refusal_422(exc: pydantic.ValidationError | RequestValidationError,
                 rules: Mapping[str, str] | None = None) -> ApiError:
    """422 naming every bad field: our rule text when we have one, else pydantic's (already readable) message."""
    detail, seen = [], set()
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path")][:1]
        field = loc[0] if loc else ""
        if field in seen:  # a union field reports one error per branch; one line is enough
            continue
        seen.add(field)
        msg = f"{field}: {error.get('msg')}, got {_describe(error.get('input'))}" if field else str(error.get("msg"))
        full_loc = tuple(part for part in error.get("loc", ()) if part not in ("body", "query", "path"))
        if field == "cache" and (len(full_loc) > 1 or error["type"].startswith("union_tag")):
            msg = f"{describe_cache_error(full_loc, error['type'])}, got {_describe(error.get('input'))}"
        elif rules is not None:
            if error["type"] == "extra_forbidden":
                msg = f"unknown field {field!r}; allowed fields are {', '.join(rules)}"
            elif error["type"] == "missing":
                msg = f"{field} is required and must be {rules.get(field, 'given')}"
            elif field in rules:
                msg = f"{field} must be {rules[field]}, got {_describe(error.get('input'))}"
            else:
                msg = f"the request body must be an object with the fields {', '.join(rules)}"
        detail.append({"loc": loc, "msg": msg, "type": str(error.get("type"))})
    param = detail[0]["loc"][0] if detail and detail[0]["loc"] else None
    return ApiError(422, "; ".join(d["msg"] for d in detail) or "invalid request", param=param,
                    code="invalid_value", detail=detail)


# ---------------------------------------------------------------------------------------------
# Request bodies: OpenAI's fields plus every request parameter, bounded by the operator's limits
# ---------------------------------------------------------------------------------------------
_BOUND_KEYS = ("gt", "ge", "lt", "le", "multiple_of", "min_length", "max_length", "allow_inf_nan")
_OPENAI_ONLY = {"model", "size", "seconds", "priority", "n", "response_format"}


def _plain_values(cls: type, value: Any) -> Any:
    """JSON true/false must not pass as 1/0, 3.0 is 3, and text must be valid UTF-8 (no unpaired surrogates)."""
    if isinstance(value, bool):
        raise ValueError("booleans are not accepted here")
    if isinstance(value, float) and value.is_integer():  # JSON Schema counts 3.0 as the integer 3
        return int(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("the text is not valid UTF-8") from None
    return value


class RequestContract:
    """The bodies of POST /v1/videos and POST /v1/images/generations on this service.

    One pydantic model per route, built from the request schema (stages/params.py GenerationParams),
    the served model's description (its frame rule, samplers, guidance kind, experts and defaults)
    and the operator's limits, both validates requests (strictly: "32" is not 32) and is the schema
    /openapi.json publishes, so the documentation cannot promise what the service refuses: an image
    model's num_frames is the constant 1, guidance_scale_2 appears only with two experts,
    negative_prompt only with classifier-free guidance, guidance_scale only when the model takes
    one, and sampler lists the family's samplers. Fields a request leaves empty get the model's
    defaults, capped at the limits.
    """

    def __init__(self, limits: LimitsConfig, model: ModelDescription, model_id: str) -> None:
        defaults = model.defaults
        self.limits, self.model, self.model_id, self.fps = limits, model, model_id, int(defaults.fps)
        self.frames = FrameRule(model.frames.stride, min(limits.max_frames, model.frames.max_frames))
        self.max_seconds = (self.frames.max_frames - 1) / self.fps
        self.size_pattern = "^" + "x".join(f"({'|'.join(str(v) for v in range(16, top + 1, 16))})"
                                           for top in (limits.max_width, limits.max_height)) + "$"
        self.defaults = {"width": min(defaults.width, limits.max_width),
                         "height": min(defaults.height, limits.max_height),
                         "num_frames": min(defaults.num_frames, self.frames.max_frames),
                         "num_inference_steps": min(defaults.num_inference_steps, limits.max_steps)}
        # Shown in the schema, not filled in: resolution fills them from the model (the shift may depend on the size).
        self.shown_defaults: dict[str, Any] = {"sampler": repr(defaults.sampler), "shift": model.describe_shift()}
        if model.takes_guidance_scale:
            self.shown_defaults["guidance_scale"] = f"{defaults.guidance_scale:g}"
        if model.guidance_scale_2 is not None:
            self.shown_defaults["guidance_scale_2"] = f"{model.guidance_scale_2:g}"
        limit = "(this service's limit)"
        frames = (self.frames.describe() if self.frames.stride == 0 else
                  f"of the form {self.frames.stride}n+1 (1, {1 + self.frames.stride}, {1 + 2 * self.frames.stride}, "
                  f"...) between 1 and {self.frames.max_frames} {limit}")
        self.rules = {
            "model": f"null or {model_id!r}",
            "size": f"WIDTHxHEIGHT, each a multiple of 16, width at most {limits.max_width} and height at most "
                    f"{limits.max_height}, e.g. '{self.defaults['width']}x{self.defaults['height']}'",
            "seconds": f"a JSON number between 0 and {self.max_seconds:g} {limit}, or a string of whole seconds "
                       f"'0' to '{int(self.max_seconds)}'",
            **model_rules(model),
            "height": f"a multiple of 16 between 16 and {limits.max_height} {limit}",
            "width": f"a multiple of 16 between 16 and {limits.max_width} {limit}",
            "num_frames": frames,
            "num_inference_steps": f"an integer between 1 and {limits.max_steps} {limit}",
            "priority": "an integer between -100 and 100",
            "n": "1", "response_format": "'b64_json' or 'url'",
        }
        # Why a request field of the schema is absent for this model ("null: <why>" in its rule).
        self.not_taken = {f: self.rules[f].split(": ", 1)[-1] for f in ("guidance_scale", "guidance_scale_2",
                                                                          "negative_prompt")
                          if not self._takes(f, image=False)}
        self.video = self._model("VideoCreateRequest", image=False)
        self.image = self._model("ImageCreateRequest", image=True)

    def _takes(self, field: str, image: bool) -> bool:
        """Whether the served model has this request field at all (the others are unknown fields here)."""
        model = self.model
        return {"num_frames": not image, "guidance_scale": model.takes_guidance_scale,
                "guidance_scale_2": model.takes_guidance_scale_2,
                "negative_prompt": model.takes_negative_prompt}.get(field, True)

    def _model(self, name: str, image: bool) -> type[BaseModel]:
        limits = {"width": self.limits.max_width, "height": self.limits.max_height,
                  "num_inference_steps": self.limits.max_steps}
        served = Literal[self.model_id]  # type: ignore[valid-type]  # the one model id, known at start-up
        fields: dict[str, Any] = {
            "model": (served | None, Field(None, description=f"The model: null, or {self.model_id!r} (what GET "
                                                             "/v1/models lists); any other id answers 404.")),
            "size": (str | None, Field(None, pattern=self.size_pattern, description=(
                f"WIDTHxHEIGHT, e.g. '{self.defaults['width']}x{self.defaults['height']}'; each a multiple of 16 "
                f"up to {self.limits.max_width}x{self.limits.max_height}. Explicit width/height win over it."))),
        }
        if not image:
            whole = Literal[tuple(str(s) for s in range(int(self.max_seconds) + 1))]  # type: ignore[valid-type]
            number = pydantic.confloat(ge=0, le=self.max_seconds, allow_inf_nan=False)
            fields["seconds"] = (whole | number | None, Field(None, description=(
                f"Duration: a number of seconds (0 to {self.max_seconds:g}) or, as OpenAI sends it, a string of "
                f"whole seconds; becomes num_frames = {self.frames.stride}n+1 nearest seconds*{self.fps}+1 "
                "(the model's fps). Ignored when num_frames is given." if self.frames.stride else
                "Duration: 0 or '0' only, as this model makes single images (one frame).")))
        for field, info in GenerationParams.model_fields.items():
            if self._takes(field, image):  # an image is one frame; other fields depend on the model
                fields[field] = self._field(field, info, limits.get(field))
        fields["priority"] = (int, Field(0, ge=-100, le=100, description="Higher runs first; FIFO within a "
                                                                         "priority."))
        if image:
            fields["n"] = (int, Field(1, ge=1, le=1, description="Images per request: 1."))
            fields["response_format"] = (Literal["b64_json", "url"], Field(
                "b64_json", description="b64_json: the PNG inline; url: a link to GET /v1/images/{id}/content."))
        checks = {"plain_values": field_validator("*", mode="before")(_plain_values)}
        config = ConfigDict(extra="forbid", strict=True, regex_engine="python-re", frozen=True)
        return create_model(name, __config__=config, __validators__=checks, **fields)  # type: ignore[call-overload]

    def _field(self, name: str, info: FieldInfo, limit: int | None) -> tuple[Any, FieldInfo]:
        """The request schema's field, narrowed to the served model and with its bound tightened to the limit."""
        bounds = {key: getattr(m, key) for m in info.metadata for key in _BOUND_KEYS
                  if getattr(m, key, None) is not None}
        annotation = info.annotation
        if limit is not None:
            bounds["le"] = limit
        if name == "num_frames":  # the model's frame rule as a list, so the schema says exactly what is accepted
            annotation, bounds = Literal[self.frames.values()] | None, {}  # type: ignore[valid-type]
        if name == "sampler":  # the family's samplers only
            annotation = Literal[self.model.samplers] | None  # type: ignore[valid-type]
        if name == "prompt":
            bounds["pattern"] = r"\S"  # not blank
        description = info.description or ""
        if name in self.defaults:
            description += f" Default here: {self.defaults[name]}."
        elif name in self.shown_defaults:
            description += f" Default here: {self.shown_defaults[name]}."
        return annotation, Field(info.default, description=description, **bounds)

    def parse(self, data: Any, image: bool) -> tuple[BaseModel, GenerationParams]:
        """Validate a decoded body; ApiError 404 for an unknown model, 422 naming the field otherwise."""
        model = self.image if image else self.video
        try:
            body = model.model_validate(data)
        except pydantic.ValidationError as exc:
            unknown = [e for e in exc.errors() if tuple(e["loc"][:1]) == ("model",)]
            if unknown:
                raise ApiError(404, f"model {_describe(unknown[0].get('input'))} is not served here; this service "
                               f"serves {self.model_id!r} (GET /v1/models), or leave model out", param="model",
                               code="model_not_found") from None
            refusal = _refusal_422(exc, {k: self.rules[k] for k in model.model_fields})
            for entry in refusal.detail or ():  # a request field this model does not take: say why
                field = entry["loc"][0] if entry["loc"] else ""
                if entry["type"] == "extra_forbidden" and field in self.not_taken:
                    entry["msg"] = f"{field} is not a field of {self.model.name}: {self.not_taken[field]}; leave it out"
            refusal.message = "; ".join(d["msg"] for d in refusal.detail or ()) or refusal.message
            raise refusal from None
        fields = {k: v for k, v in body.model_dump(exclude=_OPENAI_ONLY).items() if v is not None}
        size = getattr(body, "size", None)
        if size is not None:
            width, height = (int(v) for v in size.split("x"))
            fields.setdefault("width", width)
            fields.setdefault("height", height)
        seconds = getattr(body, "seconds", None)
        if seconds is not None and "num_frames" not in fields:
            step = self.frames.stride or 1  # an image model's only frame count is 1 (max_seconds 0)
            fields["num_frames"] = step * min(round(float(seconds) * self.fps / step),
                                              (self.frames.max_frames - 1) // step) + 1
        if image:
            fields["num_frames"] = 1
        for field, value in self.defaults.items():
            fields.setdefault(field, value)
        try:
            params = GenerationParams.model_validate(fields)
        except pydantic.ValidationError as exc:
            raise _refusal_422(exc) from None
        try:
            params.check(self.model)  # the model's own rules; the schema above states most of them already
        except pydantic.ValidationError as exc:
            detail = [{"loc": [str(e["loc"][0])], "msg": str(e["msg"]), "type": str(e["type"])} for e in exc.errors()]
            raise ApiError(422, "; ".join(d["msg"] for d in detail), param=detail[0]["loc"][0], code="invalid_value",
                           detail=detail) from None
        return body, params


# Form fields arrive as text; these stay text, every other field is parsed as JSON ("32" -> 32).
_TEXT_FIELDS = {"prompt", "negative_prompt", "model", "size", "response_format", "sampler"}
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def _form_number(text: str) -> Any:
    """A form value as a number when it is one ("32" -> 32); anything else stays text (a form has no null)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else text


async def _read_body(request: Request, forms: bool) -> Any:
    """JSON (also without a content type), or with `forms` a multipart/url-encoded form (what openai sends
    for videos.create)."""
    media = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if forms and media in _FORM_TYPES:
        try:
            form = await request.form()
        except HTTPException as exc:
            raise ApiError(422, f"the form body could not be parsed: {exc.detail}", code="invalid_body") from None
        data: dict[str, Any] = {}
        for key, value in form.multi_items():
            if not isinstance(value, str):
                raise ApiError(422, f"file uploads are not supported (field {key!r})", param=key)
            data[key] = value if key in _TEXT_FIELDS else _form_number(value)
        return data
    if media != "application/json" and not media.endswith("+json"):
        accepted = "application/json" + (", multipart/form-data or application/x-www-form-urlencoded" if forms else "")
        raise ApiError(415, f"content type {media!r} is not supported here; send {accepted}",
                       code="unsupported_media_type")
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        raise ApiError(422, f"the request body is not valid JSON: {_headline(str(exc))}",
                       code="invalid_json") from None


# ---------------------------------------------------------------------------------------------
# Responses (the models document /openapi.json; the routes build the same shapes as dicts)
# ---------------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong and, where it helps, how to fix it.")
    type: str = Field(description="invalid_request_error (4xx) or server_error (5xx).")
    param: str | None = Field(None, description="The request field at fault, if one is.")
    code: str | None = Field(None, description="A stable code, e.g. invalid_value, model_not_found, queue_full.")


class ErrorResponse(BaseModel):
    """OpenAI's error shape. 422 answers add `detail`: one entry per invalid field."""

    error: ErrorDetail
    detail: list[dict[str, Any]] | None = None


class VideoError(BaseModel):
    code: str
    message: str


class Video(BaseModel):
    """An OpenAI `Video` object plus Smart-Diffusion's fields (job_status .. attempts)."""

    id: str
    object: Literal["video"]
    created_at: int
    completed_at: int | None
    expires_at: None
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int = Field(ge=0, le=100)
    model: str
    prompt: str | None
    seconds: str
    size: str
    remixed_from_video_id: None
    error: VideoError | None
    job_status: JobStatus
    step: int
    total_steps: int
    priority: int
    params: dict[str, Any] = Field(description="The resolved request parameters (every default filled in).")
    timings: dict[str, float] = Field(description="Seconds per finished stage.")
    stage_times: dict[str, list[float]] = Field(description="Stage -> [start] or [start, end], epoch seconds.")
    attempts: int
    cache: dict[str, int] | None = Field(None, description=(
        "With a feature cache (params.cache): forwards and blocks computed and reused so far, and the peak "
        "extra memory it held (peak_extra_bytes, per DiT rank). Null without one."))


class VideoList(BaseModel):
    object: Literal["list"]
    data: list[Video]
    has_more: bool
    first_id: str | None
    last_id: str | None


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"]
    deleted: bool


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    id: str


class JobEvent(BaseModel):
    """The `data` of one server-sent event (its `event` field is the same status)."""

    id: str
    status: JobStatus
    progress: float = Field(ge=0, le=1)
    step: int
    total_steps: int
    attempts: int = Field(description="Retries so far: after a stage actor died the job runs that stage again, "
                                      "so its step and progress restart (denoising from step 0).")
    error: str | None


_EVENT_STREAM = {"text/event-stream": {"schema": {
    "type": "object", "required": ["event", "data"],
    "properties": {"event": JobEvent.model_json_schema()["properties"]["status"],
                   "data": {"type": "string", "contentMediaType": "application/json",
                            "contentSchema": JobEvent.model_json_schema()}}}}}


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    queues: dict[str, Any]
    model: str
    preset: str


_RETRY = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
_WHY = {
    400: ("The served model generates images, not videos (code image_model): use POST /v1/images/generations.",
          None),
    401: ("A missing or unknown API key (only when the service has keys).",
          {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}),
    404: ("No such job or cursor (ids look like video_<32 hex> or img_<32 hex>), or the model is not served "
          "(code model_not_found).", None),
    405: ("The method is not served on this path; `Allow` lists the ones that are.", None),
    409: ("The job is in the wrong state for this: no content yet, cancelled, or still stopping.", None),
    413: ("The request body is larger than the service's limit (limits.max_body_bytes).", None),
    415: ("The body's content type is not one this route documents.", None),
    422: ("A field is invalid; the message names it and its allowed range (this service's limits).", None),
    429: ("The service's queue is full; retry after Retry-After seconds.", _RETRY),
    500: ("The image could not be generated (the message says why; the log has the details).", None),
    503: ("The service is not ready, or the image did not finish in time (the message names the job).", _RETRY),
}


def _responses(*codes: int, ok: Any = None, **ok_doc: Any) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses`: the 200 answer plus the error answers in `codes`, each with ErrorResponse."""
    out: dict[int | str, dict[str, Any]] = {200: {"model": ok, **ok_doc} if ok else ok_doc}
    for code in codes:
        description, headers = _WHY[code]
        out[code] = {"model": ErrorResponse, "description": description, **({"headers": headers} if headers else {})}
    return out


def _form_schema(schema: Any) -> Any:
    """The JSON schema as a form can carry it: a form field is absent or text, never null."""
    if isinstance(schema, dict):
        out = {k: _form_schema(v) for k, v in schema.items() if not (k == "default" and v is None)}
        if "anyOf" in out:
            out["anyOf"] = [s for s in out["anyOf"] if s != {"type": "null"}]
            if len(out["anyOf"]) == 1:
                out.update(out.pop("anyOf")[0])
        return out
    return [_form_schema(v) for v in schema] if isinstance(schema, list) else schema


# ---------------------------------------------------------------------------------------------
# Request guards: body size (before parsing) and API keys
# ---------------------------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: a body over `max_bytes` is refused with 413, by its Content-Length or while it streams."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than this service's limit of {self.max_bytes} bytes",
                        code="body_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return await self._too_large().response()(scope, receive, send)
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self._too_large()  # answered by the app's ApiError handler
            return message

        await self.app(scope, limited, send)


_BEARER = HTTPBearer(auto_error=False, scheme_name="bearerAuth",
                     description="An API key from the service's auth.api_keys / auth.api_keys_file.")


class ApiKeys:
    """The accepted keys, as SHA-256 digests compared in constant time (no early exit, equal lengths)."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def require(self, credentials: HTTPAuthorizationCredentials | None = Security(_BEARER)) -> None:
        """FastAPI dependency of every protected route: 401 unless the bearer token is an accepted key."""
        token = hashlib.sha256(credentials.credentials.encode() if credentials else b"").digest()
        accepted = False
        for digest in self._digests:
            accepted |= hmac.compare_digest(token, digest)
        if not (credentials and accepted):
            raise ApiError(401, "a valid API key is required: send Authorization: Bearer <key>",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


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
def video_object(record: JobRecord, model_name: str) -> dict[str, Any]:
    """An OpenAI `Video` object, plus our own fields (stage status, steps, parameters)."""
    params = record.params
    error = None
    if record.status in ("failed", "cancelled"):
        error = {"code": record.status, "message": _headline(record.error) or record.status}
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
        "cache": record.cache,
    }


_JobId = PathParam(pattern=JOB_ID_PATTERN, description="A job id, video_<32 hex> or img_<32 hex>.",
                   examples=["video_0123456789abcdef0123456789abcdef"])
_ImageId = PathParam(pattern=IMAGE_ID_PATTERN, description="An image job id, img_<32 hex>.",
                     examples=["img_0123456789abcdef0123456789abcdef"])
_DESCRIPTION = """OpenAI-compatible text-to-video and text-to-image API over a Ray stage pipeline
(text encode -> DiT denoise -> VAE decode). Create a video with `POST /v1/videos`, follow it with
`GET /v1/videos/{id}` or the event stream, download it from `/content`. Every error has OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`; the bounds below are the ones this service enforces.

| status | when |
|---|---|
"""


class VideoService:
    """Ingress: HTTP routes and handle methods, all backed by one StageEngine."""

    async def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = ServiceConfig.model_validate(config)
        self.keys = ApiKeys(self.cfg.auth.keys())
        self.engine = StageEngine(self.cfg, metrics=ServeMetrics())
        self.model_name = self.engine.model.name
        self.contract = RequestContract(self.cfg.limits, self.engine.model, self.model_name)
        self.output_dir = Path(self.cfg.output_dir).resolve()
        self._retry = {"Retry-After": str(self.cfg.scheduler.retry_after_s)}
        await self.engine.start()

    async def check_health(self) -> None:
        if not self.engine.ready:
            raise RuntimeError("stage engine is not running")

    async def __del__(self) -> None:
        await self.engine.shutdown()

    # ---- handle API (in-cluster Python callers; API keys do not apply) ----
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

    # ---- the FastAPI app, built from this replica's config ----
    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this once the constructor has run: the app's docs and guards come from the config."""
        return self.build_api()

    def build_api(self) -> FastAPI:
        codes = "\n".join(f"| {code} | {why} |" for code, (why, _) in _WHY.items())
        app = FastAPI(title="Smart-Diffusion", version="0.1.0", description=_DESCRIPTION + codes,
                      docs_url=None, redoc_url=None, openapi_tags=[
            {"name": "videos", "description": "Create, follow, download, cancel and delete video jobs."},
            {"name": "images", "description": "Text-to-image (one frame), synchronous."},
            {"name": "service", "description": "Models, liveness and readiness."}])
        guarded = partial(app.add_api_route, dependencies=[Security(self.keys.require)] if self.keys else None)
        auth = (401,) if self.keys else ()
        body = self._body_doc
        guarded("/v1/videos", self.create_video, methods=["POST"], tags=["videos"], summary="Create a video job",
                responses=_responses(*auth, 400, 404, 413, 415, 422, 429, 503, ok=Video,
                                     description="The queued job."),
                openapi_extra=body("VideoCreateRequest", forms=True))
        guarded("/v1/videos", self.list_videos, methods=["GET"], tags=["videos"], summary="List jobs, newest first",
                responses=_responses(*auth, 404, 422, ok=VideoList))
        guarded("/v1/videos/{video_id}", self.retrieve_video, methods=["GET"], tags=["videos"],
                summary="Retrieve a job", responses=_responses(*auth, 404, ok=Video))
        guarded("/v1/videos/{video_id}", self.delete_video, methods=["DELETE"], tags=["videos"],
                summary="Delete a job and its files (cancels it first if it is unfinished)",
                responses=_responses(*auth, 404, 409, ok=VideoDeleted))
        guarded("/v1/videos/{video_id}/cancel", self.cancel_video, methods=["POST"], tags=["videos"],
                summary="Cancel a job (kept, status cancelled)", responses=_responses(*auth, 404, ok=Video))
        media = {t: {"schema": {"type": "string", "format": "binary"}} for t in ("video/mp4", "image/png")}
        guarded("/v1/videos/{video_id}/content", self.video_content, methods=["GET"], tags=["videos"],
                summary="Download the result (mp4, or png for one frame)", response_class=FileResponse,
                responses=_responses(*auth, 404, 409, content=media, description="The result file."))
        guarded("/v1/videos/{video_id}/events", self.video_events, methods=["GET"], tags=["videos"],
                summary="Follow a job as server-sent events", response_class=StreamingResponse,
                responses=_responses(*auth, 404, content=_EVENT_STREAM,
                                     description="One event per change (stage, step) until the job is final."))
        guarded("/v1/images/generations", self.create_image, methods=["POST"], tags=["images"],
                summary="Generate an image (waits for it)", openapi_extra=body("ImageCreateRequest", forms=False),
                responses=_responses(*auth, 404, 409, 413, 415, 422, 429, 500, 503, ok=ImagesResponse, links={
                    "content": {"operationId": "image_content",
                                "parameters": {"image_id": "$response.body#/id"}}}))
        guarded("/v1/images/{image_id}/content", self.image_content, methods=["GET"], tags=["images"],
                summary="Download an image", response_class=FileResponse, operation_id="image_content",
                responses=_responses(*auth, 404, 409, content={"image/png": media["image/png"]},
                                     description="The PNG."))
        guarded("/v1/models", self.models, methods=["GET"], tags=["service"], summary="The served model",
                responses=_responses(*auth, ok=ModelList))
        app.add_api_route("/healthz", self.healthz, methods=["GET"], tags=["service"], summary="Liveness",
                          responses=_responses(ok=Health))
        app.add_api_route("/readyz", self.readyz, methods=["GET"], tags=["service"], summary="Readiness",
                          responses={**_responses(ok=Readiness),
                                     503: {"model": Readiness, "description": "The engine is not running."}})
        _add_offline_docs(app)
        app.add_middleware(BodyLimit, max_bytes=self.cfg.limits.max_body_bytes)
        _install_error_handlers(app)
        app.openapi = partial(self._openapi, app)  # type: ignore[method-assign]
        return app

    def _body_doc(self, schema: str, forms: bool) -> dict[str, Any]:
        ref = {"$ref": f"#/components/schemas/{schema}"}
        example = {"prompt": "a red circle moving left", "size": f"{self.contract.defaults['width']}x"
                   f"{self.contract.defaults['height']}", "num_inference_steps": self.contract.defaults[
                       "num_inference_steps"], "seed": 1}
        content: dict[str, Any] = {"application/json": {"schema": ref, "example": example}}
        if forms:
            form_ref = {"$ref": f"#/components/schemas/{schema}Form"}
            content.update({t: {"schema": form_ref} for t in _FORM_TYPES})
        return {"requestBody": {"required": True, "content": content}}

    def _openapi(self, app: FastAPI) -> dict[str, Any]:
        """FastAPI's document plus the request-body schemas of this service (its limits, its model)."""
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description,
                              routes=app.routes, tags=app.openapi_tags)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for model in (self.contract.video, self.contract.image):
                schemas[model.__name__] = model.model_json_schema()
            schemas["VideoCreateRequestForm"] = _form_schema(schemas["VideoCreateRequest"])
            app.openapi_schema = doc
        return app.openapi_schema

    # ---- HTTP routes ----
    async def _accept(self, request: Request, image: bool) -> tuple[BaseModel, JobRecord]:
        """Parse, validate and submit a creation request: (body, job record), or raise ApiError."""
        if not self.engine.ready:
            raise ApiError(503, "the service is starting or stopping; retry shortly", code="not_ready",
                           headers=self._retry)
        body, params = self.contract.parse(await _read_body(request, forms=not image), image)
        try:
            record = await self.engine.submit(params, priority=body.priority,  # type: ignore[attr-defined]
                                              kind="image" if image else "video")
        except QueueFull as exc:
            raise ApiError(429, str(exc), code="queue_full", headers=self._retry) from None
        return body, record

    async def create_video(self, request: Request) -> JSONResponse:
        """Queue a video job. Body: JSON or form; OpenAI's fields (prompt, model, size, seconds) plus any
        request parameter (the openai client sends those as `extra_body`)."""
        if self.engine.model.output == "image":
            raise ApiError(400, f"model {self.model_name!r} generates images, not videos: use POST "
                                f"/v1/images/generations", param="model", code="image_model")
        _, record = await self._accept(request, image=False)
        return JSONResponse(video_object(record, self.model_name))

    async def list_videos(self, limit: int = Query(20, ge=1, le=100, description="Jobs per page."),
                          after: str | None = Query(None, pattern=JOB_ID_PATTERN, description=(
                              "The last id of the previous page; an id the service does not know answers 404."))
                          ) -> JSONResponse:
        """Every job (videos and images), newest first."""
        try:
            records = self.engine.store.list(limit=limit + 1, after=after)
        except KeyError:
            raise ApiError(404, f"no job with id {after!r} to continue after; list again without `after`",
                           param="after", code="not_found") from None
        data = [video_object(r, self.model_name) for r in records[:limit]]
        return JSONResponse({"object": "list", "data": data, "has_more": len(records) > limit,
                             "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})

    async def retrieve_video(self, video_id: str = _JobId) -> JSONResponse:
        """The job's state: OpenAI's status and progress, plus its stage, step and resolved parameters."""
        return JSONResponse(video_object(self.engine.status(video_id), self.model_name))

    async def video_content(self, video_id: str = _JobId) -> FileResponse:
        """The result file, served only from the configured output folder."""
        record = self.engine.status(video_id)
        if record.status != "succeeded" or not record.result_path:
            raise ApiError(409, f"job {video_id} has no content (status {record.status})", code="not_ready")
        path = Path(record.result_path).resolve()
        if not path.is_relative_to(self.output_dir) or not path.is_file():
            logger.warning("job %s: result %s is missing or outside %s", video_id, path, self.output_dir)
            raise ApiError(404, f"the result file of job {video_id} is gone", code="content_not_found")
        return FileResponse(path, media_type="image/png" if path.suffix == ".png" else "video/mp4",
                            filename=path.name)

    async def image_content(self, image_id: str = _ImageId) -> FileResponse:
        """The PNG of an image job (the `url` that response_format=url returns)."""
        return await self.video_content(image_id)

    async def cancel_video(self, video_id: str = _JobId) -> JSONResponse:
        """A queued job stops at once, a running one at its next denoising step (or when its encode or decode
        returns); finished jobs are unchanged."""
        self.engine.status(video_id)
        return JSONResponse(video_object(await self.engine.cancel(video_id), self.model_name))

    async def delete_video(self, video_id: str = _JobId) -> JSONResponse:
        """Deletes the job and its files; an unfinished job is cancelled first (DELETE waits for it to stop)."""
        record = self.engine.status(video_id)
        if not record.done:
            await self.engine.cancel(video_id)
            try:
                await self.engine.wait(video_id, timeout_s=_STOP_WAIT_S)
            except TimeoutError:
                raise ApiError(409, f"job {video_id} is still stopping; retry DELETE shortly", code="cancelling",
                               headers=self._retry) from None
        self.engine.delete(video_id)
        return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})

    async def video_events(self, video_id: str = _JobId) -> StreamingResponse:
        self.engine.status(video_id)

        async def stream() -> AsyncIterator[str]:
            async for event in self.engine.events(video_id):
                event = {**event, "error": _headline(event.get("error"))}
                yield f"event: {event['status']}\ndata: {json.dumps(event)}\n\n"
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def create_image(self, request: Request) -> JSONResponse:
        """Generate one image and wait for it (at most limits.image_timeout_s; then 503 naming the job)."""
        body, record = await self._accept(request, image=True)
        timeout = self.cfg.limits.image_timeout_s
        try:
            record = await self.engine.wait(record.id, timeout)
        except TimeoutError:
            raise ApiError(503, f"image {record.id} did not finish within {timeout:g} s; it keeps running: follow "
                                f"it at GET /v1/videos/{record.id}, then GET /v1/images/{record.id}/content",
                           code="timeout", headers=self._retry) from None
        if record.status == "cancelled":
            raise ApiError(409, f"image {record.id} was cancelled", code="cancelled")
        if record.status != "succeeded" or not record.result_path:
            raise ApiError(500, f"image {record.id} failed: {_headline(record.error)}", code="generation_failed")
        if getattr(body, "response_format", "b64_json") == "url":
            item = {"url": str(request.url_for("image_content", image_id=record.id))}
        else:
            item = {"b64_json": base64.b64encode(Path(record.result_path).read_bytes()).decode()}
        return JSONResponse({"created": int(record.created_at), "data": [{**item, "revised_prompt": None}],
                             "id": record.id})

    async def models(self) -> JSONResponse:
        """The one model this service runs; its id is the only `model` value requests may name."""
        return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                         "created": int(time.time()), "owned_by": "smart-diffusion",
                                                         "root": str(self.engine.model_path)}]})

    async def healthz(self) -> JSONResponse:
        """Liveness: the ingress answers (open even when API keys are set)."""
        return JSONResponse({"status": "ok"})

    async def readyz(self) -> JSONResponse:
        """Readiness: 200 while the stage engine runs, 503 otherwise; with queue depths (open without a key)."""
        snapshot = self.engine.snapshot()
        return JSONResponse(snapshot, status_code=200 if snapshot["ready"] else 503)


def _add_offline_docs(app: FastAPI) -> None:
    """/docs with Swagger UI's files served by the service itself (FastAPI's default page loads them from
    a CDN, which leaves it blank in a cluster without internet access)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs-static", StaticFiles(directory=str(swagger_ui_path)), name="docs-static")

    async def docs(request: Request) -> Any:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="Smart-Diffusion API",
                                   swagger_js_url=f"{root}/docs-static/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}/docs-static/swagger-ui.css",
                                   swagger_favicon_url=f"{root}/docs-static/favicon-32x32.png")

    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)


def _install_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape; a bad path id is 404 (as an unknown one); 405 lists every allowed method."""

    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    async def on_job_not_found(request: Request, exc: JobNotFound) -> JSONResponse:  # also: deleted meanwhile
        return ApiError(404, str(exc), param="video_id", code="not_found").response()

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        path_errors = [e for e in exc.errors() if tuple(e.get("loc", ()))[:1] == ("path",)]
        if path_errors:
            value = _describe(path_errors[0].get("input"))
            return ApiError(404, f"no job with id {value}; ids look like video_<32 hex> or img_<32 hex>",
                            param=str(path_errors[0]["loc"][-1]), code="not_found").response()
        return _refusal_422(exc).response()

    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            methods = {m for route in app.router.routes if route.matches(request.scope)[0] != Match.NONE
                       for m in getattr(route, "methods", None) or ()}
            headers["Allow"] = ", ".join(sorted(methods))
        message = {404: f"no route {request.url.path}; see /docs",
                   405: f"{request.method} is not allowed on {request.url.path}; use {headers.get('Allow')}"}
        return ApiError(exc.status_code, message.get(exc.status_code, str(exc.detail)), headers=headers,
                        code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)).response()

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return ApiError(500, f"internal error ({type(exc).__name__}); the service log has the details",
                        code="internal_error").response()

    app.add_exception_handler(ApiError, on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(JobNotFound, on_job_not_found)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, on_http)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_unexpected)


def build_app(cfg: ServiceConfig, name: str = "VideoService", **deployment_options: Any) -> Application:
    """Bind the ingress for `cfg` (validated already). The replica itself needs little: the stage
    pools reserve their own placement groups. `deployment_options` override the Serve options
    below (fault tests shorten health_check_period_s)."""
    ingress = serve.ingress()(VideoService)  # the app comes from VideoService.__serve_build_asgi_app__
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
