"""The request's `cache` parameter: which feature cache runs and its knobs, validated without torch.

A user param (per request), so the ingress validates it before any DiT sees it; this module imports only
pydantic, like the rest of the request schema. `null` (the default) computes every block of every step.
Each kind is one model with `extra="forbid"` and bounds on every knob, discriminated by `kind`, so an
unknown kind or knob is refused naming it. `parse_cache_option` reads the CLI form
`KIND[:key=value,...]` (a list value separated by ';').
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

CACHE_KINDS = ("fbcache", "dbcache", "teacache", "magcache", "easycache", "meancache", "blockdance", "pab",
               "taylorseer")
TEACACHE_MODES = ("default", "ret_steps")
TARGETED_KINDS = ("fbcache", "dbcache", "teacache", "magcache", "easycache")
"""The kinds whose threshold a request may give as a quality target instead (from the model's calibration)."""
TARGET_PSNR_RULE = "null or a number between 10 and 60 (dB against full compute; needs the model's calibration)"
TARGET_PSNR_HELP = ("Instead of `threshold`: the mean PSNR (dB, against full compute) to keep; the model's "
                    "calibration names the largest threshold that kept it on its prompts.")


class FBCacheSpec(BaseModel):
    """First-block cache (ParaAttention's FBCache): always run the first block; when its residual changed by
    less than `threshold` (mean absolute change relative to the previous step's) reuse the rest of the
    stack's residual from the last fully computed step. 0 computes everything."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["fbcache"]
    threshold: float = Field(0.08, ge=0.0, le=1.0,
                             description="Relative change of the first block's residual below which the "
                                         "remaining blocks are reused; FLUX's published default 0.08, 0 off.")
    target_psnr: float | None = Field(None, ge=10.0, le=60.0, description=TARGET_PSNR_HELP)


class DBCacheSpec(BaseModel):
    """Dual block cache (cache-dit's DBCache): always run the first `first_blocks` and the last `last_blocks`
    blocks; past `warmup_steps`, reuse the middle blocks' residual while the first blocks' residual changed by
    less than `threshold` since the last computed step, within the reuse limits. The defaults are cache-dit's
    (F8B0, W8, R0.08, no limits)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["dbcache"]
    threshold: float = Field(0.08, ge=0.0, le=1.0, description="Relative change of the first blocks' residual "
                                                              "below which the middle blocks are reused; 0 off.")
    first_blocks: int = Field(8, ge=1, le=128, description="Leading blocks computed every step (Fn).")
    last_blocks: int = Field(0, ge=0, le=128, description="Trailing blocks computed every step (Bn).")
    warmup_steps: int = Field(8, ge=0, le=200, description="Leading steps always computed.")
    max_cached_steps: int | None = Field(None, ge=0, le=200, description="Most steps reused in all; null: no limit.")
    max_continuous_cached_steps: int | None = Field(None, ge=1, le=200,
                                                    description="Most steps reused in a row; null: no limit.")
    warmup_interval: int = Field(1, ge=1, le=50, description="During the warm-up, compute every this many steps "
                                                             "(cache-dit's I; 1: every warm-up step).")
    taylorseer: bool = Field(False, description="Forecast the reused middle residual with TaylorSeer instead of "
                                                "reusing it as stored (cache-dit's calibrator).")
    taylorseer_order: int = Field(1, ge=1, le=4, description="Order of the TaylorSeer forecast.")
    target_psnr: float | None = Field(None, ge=10.0, le=60.0, description=TARGET_PSNR_HELP)


class TeaCacheSpec(BaseModel):
    """TeaCache: accumulate the polynomial-rescaled relative change of the model's timestep-modulated input
    and skip every block (reusing the whole stack's residual) while the sum stays below `threshold`.

    mode "default" computes the first and the last step; "ret_steps" the first five (Wan only; it reads
    another signal). `coefficients`: the rescaling polynomial, highest order first; null takes the model's
    published one (Wan2.1 1.3B / 14B, FLUX.1-dev), filled in at resolution so the record names what ran.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["teacache"]
    threshold: float = Field(0.2, ge=0.0, le=10.0,
                             description="Accumulated rescaled change below which a step reuses the cached "
                                         "residual; the Wan reference's default 0.2, 0 off.")
    mode: Literal["default", "ret_steps"] = Field("default", description="Which published indicator: 'default' "
                                                  "or 'ret_steps' (Wan).")
    coefficients: tuple[float, ...] | None = Field(
        None, min_length=1, max_length=8,
        description="Rescaling polynomial, highest order first; null: the model's published one.")
    target_psnr: float | None = Field(None, ge=10.0, le=60.0, description=TARGET_PSNR_HELP)


class MagCacheSpec(BaseModel):
    """MagCache: the ratio of consecutive steps' residual norms follows a model-specific curve, calibrated once;
    skip every block (reusing the stack's residual) while the accumulated error sum |1 - product of ratios|
    stays below `threshold` and at most `max_skip_steps` steps run from the cache in a row. The first
    `retention_ratio` of the steps are computed. `ratios`: one curve per branch (conditional first), a ratio
    per step; null takes the model's (published for Wan2.1 1.3B / 14B and FLUX.1-dev, or a calibration's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["magcache"]
    threshold: float = Field(0.12, ge=0.0, le=2.0, description="Accumulated error below which a step reuses the "
                                                              "cached residual; the Wan reference's 0.12, 0 off.")
    max_skip_steps: int = Field(2, ge=1, le=50, description="Most steps reused in a row (the reference's K).")
    retention_ratio: float = Field(0.2, ge=0.0, le=1.0, description="Leading fraction of steps always computed.")
    ratios: tuple[tuple[float, ...], ...] | None = Field(
        None, min_length=1, max_length=2,
        description="Residual-norm ratio curves, one per branch (conditional first), one value per step "
                    "(resampled to the request's steps); null: the model's.")
    target_psnr: float | None = Field(None, ge=10.0, le=60.0, description=TARGET_PSNR_HELP)


class EasyCacheSpec(BaseModel):
    """EasyCache: predict each step's relative output change from its input change and the output's measured
    sensitivity, and reuse the last computed output-minus-input while the accumulated prediction stays below
    `threshold`; no calibration. The first `ret_steps` steps and the last are computed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["easycache"]
    threshold: float = Field(0.05, ge=0.0, le=1.0, description="Accumulated predicted change below which a step "
                                                              "is reused; the Wan reference's 0.05, 0 off.")
    ret_steps: int = Field(10, ge=2, le=200, description="Leading steps always computed (the reference: 10).")
    target_psnr: float | None = Field(None, ge=10.0, le=60.0, description=TARGET_PSNR_HELP)


class PABSpec(BaseModel):
    """Pyramid Attention Broadcast: between `warmup` leading and `cooldown` trailing steps, each attention call
    recomputes only every `self_range` (self / joint attention) or `cross_range` (cross-attention) steps and
    otherwise reuses its output from the last computed step. Ranges of 1 compute everything."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["pab"]
    self_range: int = Field(2, ge=1, le=10, description="Self / joint attention recomputes every this many steps.")
    cross_range: int = Field(3, ge=1, le=10, description="Cross-attention recomputes every this many steps.")
    warmup: int = Field(5, ge=0, le=200, description="Leading steps always computed.")
    cooldown: int = Field(5, ge=0, le=200, description="Trailing steps always computed.")


class MeanCacheSpec(BaseModel):
    """MeanCache (flow matching): compute only `fresh_steps` of the steps, chosen by the published schedule,
    and between them advance with the average velocity of the last fresh interval, corrected by its
    finite-difference Jacobian-vector estimate. `fresh_steps` at or above the step count computes everything."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["meancache"]
    fresh_steps: int = Field(25, ge=2, le=1000, description="Steps computed (the budget B); the rest are "
                                                            "extrapolated.")
    use_jvp: bool = Field(True, description="Correct the reused velocity with the JVP estimate.")


class BlockDanceSpec(BaseModel):
    """BlockDance: in the late window of denoising, the blocks up to and including `boundary_block` (the
    "structure" blocks) change little; in each group of `group_size` steps the first computes every block and
    stores the hidden states after the boundary block, the others start from them and run only the deeper
    blocks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["blockdance"]
    boundary_block: int = Field(20, ge=0, le=126, description="The last reused block (0-based): blocks "
                                                              "0..boundary_block are reused in the window; at least "
                                                              "one block must stay computed.")
    group_size: int = Field(2, ge=1, le=10, description="Steps per group; the first computes fully (1: off).")
    start_fraction: float = Field(0.40, ge=0.0, le=1.0, description="The window starts at this fraction of the "
                                                                    "steps.")
    end_fraction: float = Field(0.95, ge=0.0, le=1.0, description="The window ends at this fraction of the steps.")
    warmup: int = Field(5, ge=0, le=200, description="Leading steps always computed.")
    cooldown: int = Field(5, ge=0, le=200, description="Trailing steps always computed.")


class TaylorSeerSpec(BaseModel):
    """TaylorSeer: compute every `interval` steps (after `warmup_steps` computed ones) and store each block's
    output change with its finite differences up to `max_order`; on the steps between, forecast each block's
    output by the Taylor series instead of reusing it. An interval of 1 computes everything."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["taylorseer"]
    interval: int = Field(5, ge=1, le=50, description="Compute every this many steps (the reference's N).")
    max_order: int = Field(1, ge=0, le=4, description="Order of the Taylor forecast (0: reuse as stored).")
    warmup_steps: int = Field(1, ge=0, le=200, description="Leading steps always computed.")


CacheSpec = Annotated[Union[FBCacheSpec, DBCacheSpec, TeaCacheSpec, MagCacheSpec, EasyCacheSpec, MeanCacheSpec,
                            BlockDanceSpec, PABSpec, TaylorSeerSpec],
                      Field(discriminator="kind")]
"""One of the cache kinds; `kind` picks the model (`CACHE_KINDS`)."""

CACHE_RULES: dict[str, dict[str, str]] = {
    "fbcache": {"threshold": "a number between 0 and 1 (0 computes every block)", "target_psnr": TARGET_PSNR_RULE},
    "dbcache": {"threshold": "a number between 0 and 1 (0 computes every block)", "target_psnr": TARGET_PSNR_RULE,
                "first_blocks": "an integer between 1 and 128", "last_blocks": "an integer between 0 and 128",
                "warmup_steps": "an integer between 0 and 200",
                "max_cached_steps": "null (no limit) or an integer between 0 and 200",
                "max_continuous_cached_steps": "null (no limit) or an integer between 1 and 200",
                "warmup_interval": "an integer between 1 and 50", "taylorseer": "true or false",
                "taylorseer_order": "an integer between 1 and 4"},
    "teacache": {"threshold": "a number between 0 and 10 (0 computes every block)", "target_psnr": TARGET_PSNR_RULE,
                 "mode": "'default' or 'ret_steps' (Wan)",
                 "coefficients": "a list of 1 to 8 numbers (the rescaling polynomial, highest order first), or "
                                 "null for the model's published one"},
    "magcache": {"threshold": "a number between 0 and 2 (0 computes every block)", "target_psnr": TARGET_PSNR_RULE,
                 "max_skip_steps": "an integer between 1 and 50", "retention_ratio": "a number between 0 and 1",
                 "ratios": "1 or 2 lists (one per branch, conditional first) of positive numbers, one per step, "
                           "or null for the model's"},
    "easycache": {"threshold": "a number between 0 and 1 (0 computes every step)", "target_psnr": TARGET_PSNR_RULE,
                  "ret_steps": "an integer between 2 and 200 (leading steps always computed)"},
    "pab": {"self_range": "an integer between 1 and 10 (1 computes every step)",
            "cross_range": "an integer between 1 and 10 (1 computes every step)",
            "warmup": "an integer between 0 and 200", "cooldown": "an integer between 0 and 200"},
    "meancache": {"fresh_steps": "an integer between 2 and 1000 (at least the step count computes every step)",
                  "use_jvp": "true or false"},
    "blockdance": {"boundary_block": "an integer between 0 and 126 (the last reused block), below the model's block "
                                     "count minus 1",
                   "group_size": "an integer between 1 and 10 (1 computes every block)",
                   "start_fraction": "a number between 0 and 1", "end_fraction": "a number between 0 and 1",
                   "warmup": "an integer between 0 and 200", "cooldown": "an integer between 0 and 200"},
    "taylorseer": {"interval": "an integer between 1 and 50 (1 computes every step)",
                   "max_order": "an integer between 0 and 4", "warmup_steps": "an integer between 0 and 200"},
}
"""kind -> knob -> what it must be, in words (for error messages and the HTTP contract)."""


def describe_cache_rule() -> str:
    """The `cache` field's rule in words."""
    kinds = "; ".join(f"{{\"kind\": \"{kind}\", " + ", ".join(f"\"{k}\": {v}" for k, v in knobs.items()) + "}"
                      for kind, knobs in CACHE_RULES.items())
    return f"null (no feature cache) or an object, one of: {kinds}"


def describe_cache_error(loc: tuple, error_type: str) -> str:
    """The rule a cache error breaks, naming the knob where there is one (loc: ("cache", kind, knob, ...))."""
    if len(loc) >= 3 and str(loc[1]) in CACHE_RULES:
        kind, knob = str(loc[1]), str(loc[2])
        if knob in CACHE_RULES[kind]:
            return f"cache.{knob} must be {CACHE_RULES[kind][knob]} for {kind}"
        return f"cache has no knob {knob!r} for {kind}; its knobs are {', '.join(CACHE_RULES[kind])}"
    if error_type in ("union_tag_invalid", "union_tag_not_found"):
        return f"cache.kind must be one of {', '.join(repr(k) for k in CACHE_KINDS)}"
    return f"cache must be {describe_cache_rule()}"


def parse_cache_option(text: str) -> dict[str, Any]:
    """`KIND[:key=value,...]` (the CLI's --cache) -> the request's `cache` object; values are numbers.

    >>> parse_cache_option("fbcache:threshold=0.12")
    {'kind': 'fbcache', 'threshold': 0.12}
    """
    kind, _, rest = text.partition(":")
    spec: dict[str, Any] = {"kind": kind.strip()}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--cache takes KIND[:key=value,...], got {text!r}")
        spec[key.strip()] = _number(value.strip())
    return spec


def _number(value: str) -> Any:
    """A number, or a ';'-separated list of numbers (e.g. coefficients=1e2;-3;0.5)."""
    if ";" in value:
        return [_number(part.strip()) for part in value.split(";")]
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value  # left for the schema to refuse, naming the knob
