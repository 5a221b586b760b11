"""User params: the one request schema, and its resolution against a model's defaults.

`GenerationParams` is what an end user may set (docs/design.md, "Three kinds of parameters").
Every field is optional except the prompt; an empty field means "this model's default", which
`resolve` fills in from the preset's `SamplingDefaults`, drawing a seed when none was given, so
the resolved record reproduces the run.

Validation errors are written for people: each entry of `ValidationError.errors()` keeps the
field in `loc` and says in `msg` what the field must be and what was sent, e.g.
"height must be a multiple of 16 between 16 and 2048, got 100". The HTTP API returns them as
422 details, the CLI prints `format_validation_error(exc)`.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from models.family import ModelDescription
from stages.sampler_names import SAMPLER_NAMES, SamplerName

logger = logging.getLogger(__name__)


MAX_PROMPT_CHARS = 2000
# Pixels: the VAE downsamples 8x and the DiT patches 2x2, so sizes step by 16.
SIZE_STEP, MIN_SIZE, MAX_SIZE = 16, 16, 2048
# Frames: the VAE keeps the first frame and packs every further 4 into one latent frame.
MAX_FRAMES = 257
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MAX_SHIFT = 100.0
MAX_SEED = 2**63 - 1

# What each field must be, in words; every error message is built from these.
FIELD_RULES: dict[str, str] = {
    "prompt": f"a non-blank string of at most {MAX_PROMPT_CHARS} characters",
    "negative_prompt": f"a string of at most {MAX_PROMPT_CHARS} characters, or null/empty for Wan's default",
    "height": f"a multiple of {SIZE_STEP} between {MIN_SIZE} and {MAX_SIZE}",
    "width": f"a multiple of {SIZE_STEP} between {MIN_SIZE} and {MAX_SIZE}",
    "num_frames": f"of the form 4n+1 (1, 5, 9, ..., 81, ...) between 1 and {MAX_FRAMES}",
    "num_inference_steps": f"an integer between 1 and {MAX_STEPS}",
    "guidance_scale": f"a number between 0 and {MAX_GUIDANCE:g}",
    "guidance_scale_2": f"a number between 0 and {MAX_GUIDANCE:g}",
    "shift": f"a number greater than 0 and at most {MAX_SHIFT:g}",
    "seed": f"an integer between 0 and 2**63-1 ({MAX_SEED}), or null for a random seed",
    "sampler": "one of " + ", ".join(repr(n) for n in SAMPLER_NAMES),
}
_NUMERIC_FIELDS = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale", "guidance_scale_2",
                   "shift", "seed")


def _describe(value: Any) -> str:
    """A short rendering of the offending input for an error message."""
    if isinstance(value, str) and len(value) > 60:
        return f"a string of {len(value)} characters"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _readable_error(error: Any) -> InitErrorDetails:
    """Rewrite one pydantic error so that `msg` names the field, its rule and the input."""
    loc = tuple(error["loc"])
    field = str(loc[0]) if loc else ""
    got = _describe(error.get("input"))
    if error["type"] == "extra_forbidden":
        custom = PydanticCustomError(
            "unknown_field", "unknown field '{field}'; allowed fields are {allowed}",
            {"field": field, "allowed": ", ".join(FIELD_RULES)},
        )
    elif field in FIELD_RULES and error["type"] == "missing":
        custom = PydanticCustomError("missing", "{field} is required and must be {rule}",
                                     {"field": field, "rule": FIELD_RULES[field]})
    elif field in FIELD_RULES:
        custom = PydanticCustomError("invalid_" + field, "{field} must be {rule}, got {got}",
                                     {"field": field, "rule": FIELD_RULES[field], "got": got})
    else:
        custom = PydanticCustomError(
            "invalid_request", "the request must be an object with the fields {allowed}, got {got}",
            {"allowed": ", ".join(FIELD_RULES), "got": got},
        )
    return InitErrorDetails(type=custom, loc=loc, input=error.get("input"))


class GenerationParams(BaseModel):
    """One text-to-video request. Empty (null) fields take the model's default at `resolve`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS,
                        description="What the video should show.")
    negative_prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS,
        description="What the video should avoid (steers classifier-free guidance). Null or empty uses Wan's "
                    "default negative prompt.")
    height: int | None = Field(None, ge=MIN_SIZE, le=MAX_SIZE, multiple_of=SIZE_STEP,
                               description="Frame height in pixels. Null: the model's default (e.g. 480).")
    width: int | None = Field(None, ge=MIN_SIZE, le=MAX_SIZE, multiple_of=SIZE_STEP,
                              description="Frame width in pixels. Null: the model's default (e.g. 832).")
    num_frames: int | None = Field(None, ge=1, le=MAX_FRAMES,
                                   description="Number of video frames, 4n+1 (81 = 5 s at 16 fps). "
                                               "Null: the model's default.")
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS,
                                            description="Denoising steps; cost grows linearly. "
                                                        "Null: the model's default (50, or 40 for Wan2.2).")
    guidance_scale: float | None = Field(
        None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False,
        description="Classifier-free guidance scale g in v_u + g (v_c - v_u); 1 disables guidance and halves the "
                    "cost. For two-expert models (Wan2.2 A14B) it is the high-noise expert's. Null: the model's "
                    "default.")
    guidance_scale_2: float | None = Field(
        None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False,
        description="Guidance scale of the low-noise expert of two-expert models (Wan2.2 A14B); ignored by "
                    "single-expert models. Null: the model's default (3.0 for Wan2.2 A14B).")
    shift: float | None = Field(
        None, gt=0.0, le=MAX_SHIFT, allow_inf_nan=False,
        description="Timestep shift s of sigma -> s*sigma/(1+(s-1)*sigma); larger spends more steps at high "
                    "noise. Null: the model's default (5.0, or 12.0 for Wan2.2).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED,
                             description="Seed of the initial noise. Null: a random seed, recorded in the result.")
    sampler: SamplerName | None = Field(
        None, description="Flow-matching sampler: 'unipc' (Wan's default), 'dpm++' (Wan's alternative) or "
                          "'euler'. Null: the model's default.")

    @field_validator(*_NUMERIC_FIELDS, mode="before")
    @classmethod
    def _no_bools(cls, value: Any) -> Any:
        """JSON true/false must not slip through as 1/0."""
        if isinstance(value, bool):
            raise ValueError("booleans are not numbers")
        return value

    @field_validator("prompt")
    @classmethod
    def _non_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("blank prompt")
        return value

    @field_validator("num_frames")
    @classmethod
    def _four_n_plus_one(cls, value: int | None) -> int | None:
        if value is not None and (value - 1) % 4:
            raise ValueError("num_frames must be 4n+1")
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _readable_errors(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> "GenerationParams":
        """Replace pydantic's generic messages by ones that name the field, its rule and the input."""
        try:
            return handler(data)
        except ValidationError as exc:
            details = [_readable_error(e) for e in exc.errors()]
            raise ValidationError.from_exception_data(exc.title, details) from None

    def resolve(self, model: ModelDescription) -> ResolvedParams:
        """Fill every empty field from the model's defaults and draw a seed if none was given.

        The second expert's guidance (model.guidance_scale_2) exists only for two-expert models; for the
        others the resolved guidance_scale_2 equals guidance_scale. An empty negative prompt becomes the
        model's own (Wan's default negative prompt; its tiny model trains its unconditional branch on it).
        """
        defaults, guidance_scale_2_default = model.defaults, model.guidance_scale_2
        guidance = self.guidance_scale if self.guidance_scale is not None else defaults.guidance_scale
        if guidance_scale_2_default is None:
            if self.guidance_scale_2 is not None:
                logger.warning("guidance_scale_2=%s ignored: the model has a single expert", self.guidance_scale_2)
            guidance_2 = guidance
        else:
            guidance_2 = self.guidance_scale_2 if self.guidance_scale_2 is not None else guidance_scale_2_default
        sampler = self.sampler if self.sampler is not None else defaults.sampler
        if sampler not in SAMPLER_NAMES:
            raise ValueError(f"model default sampler {sampler!r} is not one of {', '.join(SAMPLER_NAMES)}")
        seed = self.seed if self.seed is not None else secrets.randbelow(MAX_SEED + 1)
        return ResolvedParams(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt or model.negative_prompt,
            height=self.height if self.height is not None else defaults.height,
            width=self.width if self.width is not None else defaults.width,
            num_frames=self.num_frames if self.num_frames is not None else defaults.num_frames,
            num_inference_steps=(self.num_inference_steps if self.num_inference_steps is not None
                                 else defaults.num_inference_steps),
            guidance_scale=float(guidance),
            guidance_scale_2=float(guidance_2),
            shift=float(self.shift if self.shift is not None else defaults.shift),
            seed=seed,
            sampler=sampler,  # type: ignore[arg-type]  # checked against SAMPLER_NAMES above
            fps=defaults.fps,
        )


class ResolvedParams(BaseModel):
    """A request with every field filled: what the stages run and what the result records.

    negative_prompt is the effective one (Wan's default when the user left it empty);
    guidance_scale_2 equals guidance_scale for single-expert models; fps is the model's
    output frame rate (not a user param, recorded so the video file and metadata agree).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    negative_prompt: str
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    guidance_scale_2: float
    shift: float
    seed: int
    sampler: SamplerName
    fps: int

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs (guidance 1 is exactly the conditional branch alone)."""
        return self.guidance_scale != 1.0 or self.guidance_scale_2 != 1.0


def format_validation_error(exc: ValidationError) -> str:
    """One line per invalid field, for a CLI: each message already names the field and its rule."""
    lines = []
    for error in exc.errors():
        msg = str(error["msg"])
        field = ".".join(str(part) for part in error["loc"])
        lines.append(msg if not field or field in msg else f"{field}: {msg}")
    return "\n".join(lines)

