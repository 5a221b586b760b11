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

CACHE_KINDS = ("fbcache", "dbcache", "teacache", "easycache", "pab")
TEACACHE_MODES = ("default", "ret_steps")


class FBCacheSpec(BaseModel):
    """First-block cache (ParaAttention's FBCache): always run the first block; when its residual changed by
    less than `threshold` (mean absolute change relative to the previous step's) reuse the rest of the
    stack's residual from the last fully computed step. 0 computes everything."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["fbcache"]
    threshold: float = Field(0.08, ge=0.0, le=1.0,
                             description="Relative change of the first block's residual below which the "
                                         "remaining blocks are reused; FLUX's published default 0.08, 0 off.")


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


class EasyCacheSpec(BaseModel):
    """EasyCache: predict each step's relative output change from its input change and the output's measured
    sensitivity, and reuse the last computed output-minus-input while the accumulated prediction stays below
    `threshold`; no calibration. The first `ret_steps` steps and the last are computed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["easycache"]
    threshold: float = Field(0.05, ge=0.0, le=1.0, description="Accumulated predicted change below which a step "
                                                              "is reused; the Wan reference's 0.05, 0 off.")
    ret_steps: int = Field(10, ge=2, le=200, description="Leading steps always computed (the reference: 10).")


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


CacheSpec = Annotated[Union[FBCacheSpec, DBCacheSpec, TeaCacheSpec, EasyCacheSpec, PABSpec],
                      Field(discriminator="kind")]
"""One of the cache kinds; `kind` picks the model (`CACHE_KINDS`)."""

CACHE_RULES: dict[str, dict[str, str]] = {
    "fbcache": {"threshold": "a number between 0 and 1 (0 computes every block)"},
    "dbcache": {"threshold": "a number between 0 and 1 (0 computes every block)",
                "first_blocks": "an integer between 1 and 128", "last_blocks": "an integer between 0 and 128",
                "warmup_steps": "an integer between 0 and 200",
                "max_cached_steps": "null (no limit) or an integer between 0 and 200",
                "max_continuous_cached_steps": "null (no limit) or an integer between 1 and 200"},
    "teacache": {"threshold": "a number between 0 and 10 (0 computes every block)",
                 "mode": "'default' or 'ret_steps' (Wan)",
                 "coefficients": "a list of 1 to 8 numbers (the rescaling polynomial, highest order first), or "
                                 "null for the model's published one"},
    "easycache": {"threshold": "a number between 0 and 1 (0 computes every step)",
                  "ret_steps": "an integer between 2 and 200 (leading steps always computed)"},
    "pab": {"self_range": "an integer between 1 and 10 (1 computes every step)",
            "cross_range": "an integer between 1 and 10 (1 computes every step)",
            "warmup": "an integer between 0 and 200", "cooldown": "an integer between 0 and 200"},
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
