"""User params: the one request schema of every model family, and its resolution against a model.

`GenerationParams` is what an end user may set (docs/design.md, "Three kinds of parameters").
Every field is optional except the prompt; an empty field means "this model's default". Its own
bounds hold for every model; `resolve(model)` then applies the served model's rules, read from
its torch-free `ModelDescription` (`model_rules`): the frame rule (4n+1 for Wan, 1 for an image
model), the family's samplers, which guidance fields the model takes (a negative prompt only
with classifier-free guidance, a guidance scale not at all for FLUX.1-schnell, guidance_scale_2
only with two experts), and fills every empty field from the model's `SamplingDefaults`
(a fixed shift, or FLUX.1-dev's resolution-dependent one), drawing a seed when none was given,
so the resolved record reproduces the run.

Validation errors are written for people: each entry of `ValidationError.errors()` keeps the
field in `loc` and says in `msg` what the field must be and what was sent, e.g.
"height must be a multiple of 16 between 16 and 2048, got 100" or, from `resolve`,
"num_frames must be 1 (the model makes single images), got 5". The HTTP API returns them as
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

from flexcache.spec import CacheSpec, describe_cache_error, describe_cache_rule
from models.family import CfgForm, GuidanceKind, ModelDescription, neutral_guidance_scale
from stages.sampler_names import SAMPLER_NAMES, SamplerName

logger = logging.getLogger(__name__)


MAX_PROMPT_CHARS = 2000
# Pixels: the VAE downsamples 8x and the DiT patches 2x2, so sizes step by 16.
SIZE_STEP, MIN_SIZE, MAX_SIZE = 16, 16, 2048
# Frames: the most any model takes; each model narrows it (Wan: 4n+1, an image model: 1).
MAX_FRAMES = 257
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MAX_SHIFT = 100.0
MAX_SEED = 2**63 - 1

# What each field must be, in words; every error message is built from these.
FIELD_RULES: dict[str, str] = {
    "prompt": f"a non-blank string of at most {MAX_PROMPT_CHARS} characters",
    "negative_prompt": f"a string of at most {MAX_PROMPT_CHARS} characters, or null/empty for the model's default",
    "height": f"a multiple of {SIZE_STEP} between {MIN_SIZE} and {MAX_SIZE}",
    "width": f"a multiple of {SIZE_STEP} between {MIN_SIZE} and {MAX_SIZE}",
    "num_frames": f"1 for an image model, or a frame count the video model allows (Wan: 4n+1), between 1 and "
                  f"{MAX_FRAMES}",
    "num_inference_steps": f"an integer between 1 and {MAX_STEPS}",
    "guidance_scale": f"a number between 0 and {MAX_GUIDANCE:g}",
    "guidance_scale_2": f"a number between 0 and {MAX_GUIDANCE:g}",
    "shift": f"a number greater than 0 and at most {MAX_SHIFT:g}",
    "seed": f"an integer between 0 and 2**63-1 ({MAX_SEED}), or null for a random seed",
    "sampler": "one of " + ", ".join(repr(n) for n in SAMPLER_NAMES),
    "cache": describe_cache_rule(),
}
_NUMERIC_FIELDS = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale", "guidance_scale_2",
                   "shift", "seed")


def _plain(value: Any) -> Any:
    """A field's value as the user wrote it (a nested model as its JSON object)."""
    return value.model_dump(exclude_defaults=True) if isinstance(value, BaseModel) else value


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
    if field == "cache" and (len(loc) > 1 or error["type"] in ("union_tag_invalid", "union_tag_not_found")):
        custom = PydanticCustomError("invalid_cache", "{rule}, got {got}",
                                     {"rule": describe_cache_error(loc, error["type"]), "got": got})
    elif error["type"] == "extra_forbidden":
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
                        description="What the video or image should show.")
    negative_prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS,
        description="What the output should avoid (the negative branch of classifier-free guidance); only for "
                    "models with true CFG (Wan), refused by the others (FLUX.1). Null or empty uses the model's "
                    "default negative prompt.")
    height: int | None = Field(None, ge=MIN_SIZE, le=MAX_SIZE, multiple_of=SIZE_STEP,
                               description="Height in pixels. Null: the model's default (e.g. 480 for Wan).")
    width: int | None = Field(None, ge=MIN_SIZE, le=MAX_SIZE, multiple_of=SIZE_STEP,
                              description="Width in pixels. Null: the model's default (e.g. 832 for Wan).")
    num_frames: int | None = Field(None, ge=1, le=MAX_FRAMES,
                                   description="Number of frames: what the model allows, 4n+1 for Wan (81 = 5 s "
                                               "at 16 fps), 1 for an image model. Null: the model's default.")
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS,
                                            description="Denoising steps; cost grows linearly. "
                                                        "Null: the model's default (e.g. 50 for Wan2.1).")
    guidance_scale: float | None = Field(
        None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False,
        description="With classifier-free guidance (Wan) the scale g in v_u + g (v_c - v_u), 1 disabling "
                    "guidance and halving the cost; for two-expert models (Wan2.2 A14B) the high-noise expert's. "
                    "With distilled guidance (FLUX.1-dev) the scale fed to the model's guidance input (one "
                    "forward). Refused by models without a guidance input (FLUX.1-schnell). Null: the model's "
                    "default.")
    guidance_scale_2: float | None = Field(
        None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False,
        description="Guidance scale of the low-noise expert of two-expert models (Wan2.2 A14B); ignored (with a "
                    "warning) by single-expert CFG models, refused by the others. Null: the model's default.")
    shift: float | None = Field(
        None, gt=0.0, le=MAX_SHIFT, allow_inf_nan=False,
        description="Timestep shift s of sigma -> s*sigma/(1+(s-1)*sigma); larger spends more steps at high "
                    "noise. Null: the model's default, fixed (Wan2.1 5.0, Wan2.2 12.0, FLUX.1-schnell 1.0) or "
                    "from the size (FLUX.1-dev: exp(mu), mu linear in the image tokens).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED,
                             description="Seed of the initial noise. Null: a random seed, recorded in the result.")
    sampler: SamplerName | None = Field(
        None, description="Flow-matching sampler, one of the model family's: Wan 'unipc' (default), 'dpm++' or "
                          "'euler'; FLUX.1 'flowmatch-euler'. Null: the model's default.")
    cache: CacheSpec | None = Field(
        None, description="Feature cache: reuse work between denoising steps whose activations barely change "
                          "(faster, slightly different output). Null: compute every block of every step. "
                          "{\"kind\": \"fbcache\", \"threshold\": 0.08}: always run the first block and "
                          "reuse the others' residual while the first block's residual changes by less than "
                          "the threshold.")

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

    @model_validator(mode="wrap")
    @classmethod
    def _readable_errors(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> "GenerationParams":
        """Replace pydantic's generic messages by ones that name the field, its rule and the input."""
        try:
            return handler(data)
        except ValidationError as exc:
            details = [_readable_error(e) for e in exc.errors()]
            raise ValidationError.from_exception_data(exc.title, details) from None

    def check(self, model: ModelDescription) -> None:
        """Raise a ValidationError naming every field this model does not take as given (see `model_rules`)."""
        rules = model_rules(model)
        bad: list[str] = []
        if self.num_frames is not None and not model.frames.allows(self.num_frames):
            bad.append("num_frames")
        if self.sampler is not None and self.sampler not in model.samplers:
            bad.append("sampler")
        if self.guidance_scale is not None and not model.takes_guidance_scale:
            bad.append("guidance_scale")
        if self.guidance_scale_2 is not None and not model.takes_guidance_scale_2 and model.guidance != "cfg":
            bad.append("guidance_scale_2")  # single-expert CFG models ignore it (see resolve)
        if self.negative_prompt and not model.takes_negative_prompt:
            bad.append("negative_prompt")
        cache_problem = _cache_problem(self.cache, model)
        if cache_problem is not None:
            bad.append("cache")
            rules["cache"] = cache_problem
        if bad:
            details = [InitErrorDetails(
                type=PydanticCustomError("invalid_" + f, "{field} must be {rule}, got {got}",
                                         {"field": f, "rule": rules[f], "got": _describe(_plain(getattr(self, f)))}),
                loc=(f,), input=getattr(self, f)) for f in bad]
            raise ValidationError.from_exception_data(type(self).__name__, details)

    def resolve(self, model: ModelDescription) -> ResolvedParams:
        """Check the request against the model (`check`), fill every empty field from its defaults and draw a
        seed if none was given.

        guidance_scale is the CFG scale for a "cfg" model, the distilled scale for a "distilled" one and
        recorded as 1.0 for a "none" model (no scale runs). The second expert's guidance exists only for
        two-expert models; for the others the resolved guidance_scale_2 equals guidance_scale (a single-
        expert CFG model ignores a given one with a warning, as before; other models refuse it). An empty
        negative prompt becomes the model's own (Wan's default negative prompt; its tiny model trains its
        unconditional branch on it); models without CFG record "". A null shift becomes the model's rule
        evaluated at the request's size.
        """
        self.check(model)
        defaults = model.defaults
        height = self.height if self.height is not None else defaults.height
        width = self.width if self.width is not None else defaults.width
        num_frames = self.num_frames if self.num_frames is not None else defaults.num_frames
        if self.guidance_scale is not None:
            guidance = self.guidance_scale
        else:  # None only for a model without a guidance input (ModelDescription checks it): nothing runs
            guidance = 1.0 if defaults.guidance_scale is None else defaults.guidance_scale
        if model.guidance_scale_2 is None:
            if self.guidance_scale_2 is not None:
                logger.warning("guidance_scale_2=%s ignored: the model has a single expert", self.guidance_scale_2)
            guidance_2 = guidance
        else:
            guidance_2 = self.guidance_scale_2 if self.guidance_scale_2 is not None else model.guidance_scale_2
        num_steps = self.num_inference_steps if self.num_inference_steps is not None else defaults.num_inference_steps
        shift = self.shift if self.shift is not None else model.shift_for(num_frames, height, width, num_steps)
        negative = (self.negative_prompt or model.negative_prompt) if model.takes_negative_prompt else ""
        seed = self.seed if self.seed is not None else secrets.randbelow(MAX_SEED + 1)
        return ResolvedParams(
            prompt=self.prompt,
            negative_prompt=negative,
            height=height,
            width=width,
            num_frames=num_frames,
            num_inference_steps=num_steps,
            guidance=model.guidance,
            guidance_scale=float(guidance),
            guidance_scale_2=float(guidance_2),
            shift=float(shift),
            seed=seed,
            sampler=self.sampler if self.sampler is not None else defaults.sampler,  # type: ignore[arg-type]
            fps=defaults.fps,
            cache=_resolved_cache(self.cache, model),
            cfg_form=model.cfg_form,
        )


def _cache_problem(cache: Any, model: ModelDescription) -> str | None:
    """What a cache spec needs from this model and does not get, in words (None: it runs here)."""
    if cache is None:
        return None
    target = _target_problem(cache, model)
    if target is not None:
        return target
    cache = _targeted(cache, model)
    if cache.kind == "teacache":
        calibration = model.teacache.get(cache.mode)
        if calibration is None:
            modes = ", ".join(repr(m) for m in model.teacache) or "none"
            return f"an object whose mode is a TeaCache mode of {model.name} ({modes})"
        if cache.coefficients is None and calibration.coefficients is None:
            return (f"an object with coefficients for TeaCache on {model.name} (none are published or calibrated "
                    f"for its mode {cache.mode!r})")
    if cache.kind == "magcache" and cache.ratios is None and model.magcache is None:
        return (f"an object with ratios for MagCache on {model.name} (none are published or calibrated for it; "
                f"`smartdiff calibrate` measures them)")
    if cache.kind == "blockdance" and model.num_blocks and cache.boundary_block >= model.num_blocks - 1:
        return (f"an object whose boundary_block (the last reused block) is at most {model.num_blocks - 2}, so one "
                f"of {model.name}'s {model.num_blocks} blocks stays computed")
    return None


def _sweep_knobs(cache: Any, model: ModelDescription) -> dict[str, Any]:
    """The knobs (besides the threshold) the model's calibration swept `cache.kind` with."""
    return {k: v for k, v in model.cache_thresholds[cache.kind].spec.items()
            if k in type(cache).model_fields and k not in ("kind", "threshold", "target_psnr", "coefficients", "ratios")}


def _target_problem(cache: Any, model: ModelDescription) -> str | None:
    """Why a `target_psnr` cannot be resolved on this model, in words (None: it can, or none is asked for)."""
    if getattr(cache, "target_psnr", None) is None:
        return None
    if "threshold" in cache.model_fields_set:
        return f"an object with either threshold or target_psnr for {cache.kind}, not both"
    if cache.kind not in model.cache_thresholds:
        calibrated = ", ".join(repr(k) for k in model.cache_thresholds) or "none"
        return (f"an object without target_psnr for {cache.kind} on {model.name}: its calibration has no {cache.kind} "
                f"sweep (calibrated kinds: {calibrated}; `smartdiff calibrate` makes one), or give a threshold")
    knobs = _sweep_knobs(cache, model)
    differs = sorted(k for k in cache.model_fields_set if k in knobs and _plain(getattr(cache, k)) != knobs[k])
    if differs:
        swept = ", ".join(f"{k}={knobs[k]!r}" for k in differs)
        return (f"an object whose knobs match the calibrated {cache.kind} sweep for target_psnr ({swept}), or a "
                f"threshold instead of target_psnr")
    return None


def _targeted(cache: Any, model: ModelDescription) -> Any:
    """A `target_psnr` spec with the calibrated sweep's knobs and the threshold that met the target."""
    if getattr(cache, "target_psnr", None) is None or cache.kind not in model.cache_thresholds:
        return cache
    knobs = {k: v for k, v in _sweep_knobs(cache, model).items() if k not in cache.model_fields_set}
    threshold = model.cache_thresholds[cache.kind].threshold_for(cache.target_psnr)
    return type(cache).model_validate(cache.model_dump() | knobs | {"threshold": threshold})


def _resolved_cache(cache: Any, model: ModelDescription) -> Any:
    """The cache spec with the model's TeaCache coefficients or MagCache curves filled in (so the record
    names what ran)."""
    if cache is None:
        return cache
    cache = _targeted(cache, model)
    if cache.kind == "teacache" and cache.coefficients is None:
        return cache.model_copy(update={"coefficients": model.teacache[cache.mode].coefficients})
    if cache.kind == "magcache" and cache.ratios is None:
        return cache.model_copy(update={"ratios": model.magcache})
    return cache


def model_rules(model: ModelDescription) -> dict[str, str]:
    """What each request field must be for this model, in words: FIELD_RULES narrowed by its description.

    These texts are what `GenerationParams.check` reports and what the HTTP contract publishes.
    """
    rules = dict(FIELD_RULES)
    rules["num_frames"] = model.frames.describe()
    rules["sampler"] = (f"one of {', '.join(repr(n) for n in model.samplers)} (the samplers of {model.name}), "
                        f"or null for {model.defaults.sampler!r}")
    rules["shift"] = (f"a number greater than 0 and at most {MAX_SHIFT:g}, or null for {model.name}'s default "
                      f"({model.describe_shift()})")
    if model.guidance == "none":
        rules["guidance_scale"] = (f"null: {model.name} takes no guidance scale (one forward per step, no "
                                   f"guidance input)")
    elif model.guidance == "distilled":
        rules["guidance_scale"] = (f"a number between 0 and {MAX_GUIDANCE:g}, the distilled guidance {model.name} "
                                   f"takes as an input of its one forward per step")
    if not model.takes_guidance_scale_2:
        rules["guidance_scale_2"] = f"null: {model.name} has a single expert"
    if not model.takes_negative_prompt:
        rules["negative_prompt"] = (f"null or empty: {model.name} runs no negative branch (its guidance is "
                                    f"{model.guidance!r}, not classifier-free)")
    return rules


class ResolvedParams(BaseModel):
    """A request with every field filled: what the stages run and what the result records.

    negative_prompt is the effective one (the model's default when the user left it empty, "" for
    a model without CFG); guidance is the model's guidance kind ("cfg" for records written before
    it existed); guidance_scale is the CFG or distilled scale (1.0 with guidance "none");
    guidance_scale_2 equals guidance_scale for single-expert models; shift is the value that ran
    (a dynamic rule evaluated at height x width); fps is the model's output frame rate (not a user
    param, recorded so the video file and metadata agree); cache is the feature cache that ran (None:
    none); cfg_form is the model's CFG combination (a model param, recorded so `guided` needs no model).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    negative_prompt: str
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance: GuidanceKind = "cfg"
    guidance_scale: float
    guidance_scale_2: float
    shift: float
    seed: int
    sampler: SamplerName
    fps: int
    cache: CacheSpec | None = None
    cfg_form: CfgForm = "uncond"

    @property
    def guided(self) -> bool:
        """Whether two CFG branches run: a "cfg" model with a scale other than its form's neutral one (1 for
        v_u + g (v_c - v_u), 0 for Z-Image's v_c + g (v_c - v_u): exactly the conditional branch alone);
        distilled and unguided models always run one."""
        neutral = neutral_guidance_scale(self.cfg_form)
        return self.guidance == "cfg" and (self.guidance_scale != neutral or self.guidance_scale_2 != neutral)


def format_validation_error(exc: ValidationError) -> str:
    """One line per invalid field, for a CLI: each message already names the field and its rule."""
    lines = []
    for error in exc.errors():
        msg = str(error["msg"])
        field = ".".join(str(part) for part in error["loc"])
        lines.append(msg if not field or field in msg else f"{field}: {msg}")
    return "\n".join(lines)

