"""A model's feature-cache calibration: the file `smartdiff calibrate` writes next to a checkpoint.

It holds what the caches need to know about one model and cannot be derived at run time: TeaCache's
rescaling polynomial per indicator mode, MagCache's residual-norm ratio curve per branch, and per cache kind
the (threshold, mean PSNR) points measured against full compute, which let a request name a quality target
instead of a threshold. `describe()` of the registry reads the file when the checkpoint folder has one; a
calibrated value replaces a published one (it was measured on these weights). Torch-free, like every
description.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.family import CacheThresholds, ModelDescription, TeaCacheCalibration
from models.errors import CheckpointError

CALIBRATION_FILE = "flexcache_calibration.json"
FORMAT = 1


class PolynomialFit(BaseModel):
    """TeaCache in one mode: the signal it read, the fitted polynomial (highest order first) and R²."""

    model_config = ConfigDict(extra="forbid")

    signal: str
    coefficients: tuple[float, ...] = Field(min_length=1, max_length=8)
    r2: float
    samples: int = Field(ge=1)


class RatioFit(BaseModel):
    """MagCache: the mean residual-norm ratio per step, one curve per branch, and the R² of the curve against
    every prompt's ratios (how prompt-invariant they were)."""

    model_config = ConfigDict(extra="forbid")

    ratios: tuple[tuple[float, ...], ...] = Field(min_length=1, max_length=2)
    r2: float
    samples: int = Field(ge=1)


class ThresholdPoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(ge=0)
    psnr_db: float
    forwards_reused: float = Field(ge=0, description="Mean forwards reused per request at this threshold.")


class ThresholdSweep(BaseModel):
    """One cache kind run at several thresholds (its other knobs as in `spec`) on the calibration prompts."""

    model_config = ConfigDict(extra="forbid")

    spec: dict = Field(description="The cache object the sweep ran, without its threshold.")
    points: tuple[ThresholdPoint, ...] = Field(min_length=1)

    def as_thresholds(self) -> CacheThresholds:
        return CacheThresholds(dict(self.spec), tuple(sorted((p.psnr_db, p.threshold) for p in self.points)))


class CacheCalibration(BaseModel):
    """The whole calibration file."""

    model_config = ConfigDict(extra="forbid")

    format: int = FORMAT
    model: str
    made_by: str = "smartdiff calibrate"
    settings: dict = Field(default_factory=dict, description="What the calibration ran: prompts, steps, sizes.")
    teacache: dict[str, PolynomialFit] = Field(default_factory=dict)
    magcache: RatioFit | None = None
    thresholds: dict[str, ThresholdSweep] = Field(default_factory=dict)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.model_dump_json(indent=1) + "\n")
        return path


def read_calibration(path: str | Path) -> CacheCalibration:
    """A calibration file, validated (CheckpointError naming the file and the problem otherwise)."""
    path = Path(path)
    try:
        calibration = CacheCalibration.model_validate(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, ValidationError) as exc:
        raise CheckpointError(f"{path} is not a readable feature-cache calibration: {exc}") from None
    if calibration.format != FORMAT:
        raise CheckpointError(f"{path} has calibration format {calibration.format}; this version reads {FORMAT}")
    return calibration


def with_calibration(model: ModelDescription, calibration: CacheCalibration) -> ModelDescription:
    """`model` with the calibration's values in place of (or beside) the published ones."""
    teacache = dict(model.teacache)
    for mode, fit in calibration.teacache.items():
        teacache[mode] = TeaCacheCalibration(fit.signal, tuple(fit.coefficients))
    thresholds = {kind: sweep.as_thresholds() for kind, sweep in calibration.thresholds.items()}
    return dataclasses.replace(
        model, teacache=teacache,
        magcache=tuple(tuple(c) for c in calibration.magcache.ratios) if calibration.magcache else model.magcache,
        cache_thresholds={**model.cache_thresholds, **thresholds})


def calibrated(model: ModelDescription, path: str | Path | None = None) -> ModelDescription:
    """`model` with the calibration file `path` applied (it must exist), or else its checkpoint folder's, if it has
    one (a calibration measured for another model is refused)."""
    if path is None:
        path = Path(model.root) / CALIBRATION_FILE
        if not path.is_file():
            return model
    calibration = read_calibration(path)
    if calibration.model != model.name:
        raise CheckpointError(f"{path} is a calibration of {calibration.model!r}, not of {model.name!r}")
    return with_calibration(model, calibration)
