"""The calibration run behind `smartdiff calibrate`: what the feature caches need to know about one model.

1. Full compute of every calibration prompt (seed `seed + i`) with `CalibrationRecorder`, which records each
   forward's TeaCache indicators, output change and MagCache residual-norm ratio.
2. The fits: TeaCache's polynomial per mode the model has, MagCache's ratio curves (flexcache/calibration.py).
3. Per cache kind of the sweep table, the same prompts and seeds at several thresholds (TeaCache and MagCache
   with the fitted values), each output's mean PSNR per frame against its full compute (`stages/quality.py`).
   The (threshold, PSNR) points let a request ask for a `target_psnr` instead of a threshold.

The result is a `CacheCalibration` (models/cache_calibration.py); written next to the checkpoint it is what
the model's description, and so every request on it, uses.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from flexcache.calibration import CalibrationRecorder, fit_polynomial, fit_ratio_curves, teacache_samples
from models.cache_calibration import (CacheCalibration, PolynomialFit, RatioFit, ThresholdPoint, ThresholdSweep,
                                      with_calibration)
from stages.pipeline import Pipeline
from stages.quality import video_quality

logger = logging.getLogger(__name__)

SWEEPS: dict[str, tuple[dict[str, Any], tuple[float, ...]]] = {
    "teacache": ({"kind": "teacache", "mode": "default"}, (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)),
    "magcache": ({"kind": "magcache", "max_skip_steps": 2, "retention_ratio": 0.2},
                 (0.03, 0.06, 0.12, 0.24, 0.5, 1.0)),
    "easycache": ({"kind": "easycache", "ret_steps": 10}, (0.02, 0.05, 0.1, 0.2, 0.3)),
    "fbcache": ({"kind": "fbcache"}, (0.02, 0.05, 0.1, 0.2)),
}
"""kind -> (the cache object without its threshold, the thresholds measured)."""

TARGETS_DB = (25.0, 30.0, 35.0, 40.0)
"""The quality targets the CLI's summary table shows."""


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    lines = Path(path).read_text().splitlines()
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path} has no prompts (one per line)")
    return prompts


def work_units(prompts: Sequence[str], sweeps: Mapping[str, tuple[dict[str, Any], Sequence[float]]]) -> int:
    """Generations a calibration runs (for a progress bar)."""
    return len(prompts) * (1 + sum(len(thresholds) for _, thresholds in sweeps.values()))


def calibrate(pipeline: Pipeline, prompts: Sequence[str], steps: int | None = None, seed: int = 0,
              request: Mapping[str, Any] | None = None,
              sweeps: Mapping[str, tuple[dict[str, Any], Sequence[float]]] = SWEEPS,
              tick: Callable[[], None] | None = None) -> CacheCalibration:
    """Calibrate `pipeline`'s model on `prompts` at `steps` (default: the model's) with the other request fields
    of `request` (default: the model's defaults); `tick` is called after every generation."""
    model = pipeline.model
    signals = {mode: calibration.signal for mode, calibration in model.teacache.items()}
    base = dict(request or {}) | ({"num_inference_steps": steps} if steps is not None else {})
    requests = [pipeline.resolve(base | {"prompt": prompt, "seed": seed + i}) for i, prompt in enumerate(prompts)]
    runs, references = [], []
    for params in requests:
        recorder = CalibrationRecorder(list(signals.values()))
        references.append(pipeline.generate(params, cache=recorder).frames)
        runs.append(recorder.records)
        if tick is not None:
            tick()
    num_steps = requests[0].num_inference_steps
    teacache = {}
    for mode, signal in signals.items():
        coefficients, r2, samples = fit_polynomial(*teacache_samples(runs, signal))
        teacache[mode] = PolynomialFit(signal=signal, coefficients=coefficients, r2=r2, samples=samples)
        logger.info("TeaCache %s (%s): R^2 %.3f over %d forwards", mode, signal, r2, samples)
    curves, r2, samples = fit_ratio_curves(runs, num_steps)
    calibration = CacheCalibration(
        model=model.name, teacache=teacache, magcache=RatioFit(ratios=curves, r2=r2, samples=samples),
        settings={"prompts": list(prompts), "seeds": [p.seed for p in requests], "steps": num_steps,
                  **{k: v for k, v in requests[0].model_dump().items()
                     if k in ("height", "width", "num_frames", "guidance_scale", "guidance_scale_2", "shift",
                              "sampler")}})
    logger.info("MagCache: R^2 %.3f over %d ratios", r2, samples)
    fitted = with_calibration(model, calibration)
    swept = {}
    for kind, (spec, thresholds) in sweeps.items():
        if kind == "teacache" and spec.get("mode", "default") not in fitted.teacache:
            continue
        points = []
        for threshold in thresholds:
            cache = _filled(dict(spec) | {"threshold": threshold}, fitted)
            quality, reused = [], []
            for params, reference in zip(requests, references):
                result = pipeline.generate(params.model_copy(update={"cache": _validated(cache, params)}))
                quality.append(video_quality(result.frames, reference)[0])
                reused.append((result.cache or {}).get("forwards_reused", 0))
                if tick is not None:
                    tick()
            points.append(ThresholdPoint(threshold=threshold, psnr_db=float(np.mean(quality)),
                                         forwards_reused=float(np.mean(reused))))
        swept[kind] = ThresholdSweep(spec=spec, points=tuple(points))
    return calibration.model_copy(update={"thresholds": swept})


def _filled(cache: dict[str, Any], model: Any) -> dict[str, Any]:
    """The sweep's cache object with the fitted TeaCache polynomial or MagCache curves written in."""
    if cache["kind"] == "teacache":
        return cache | {"coefficients": list(model.teacache[cache.get("mode", "default")].coefficients)}
    if cache["kind"] == "magcache":
        return cache | {"ratios": [list(c) for c in model.magcache]}
    return cache


def _validated(cache: dict[str, Any], params: Any) -> Any:
    """The cache object as the resolved request's spec type (validated like a request's)."""
    from stages.params import GenerationParams

    return GenerationParams.model_validate({"prompt": params.prompt, "cache": cache}).cache


def target_table(calibration: CacheCalibration, targets: Sequence[float] = TARGETS_DB) -> list[dict[str, Any]]:
    """Per swept kind and target: the threshold a `target_psnr` request gets, and the forwards it reused."""
    rows = []
    for kind, sweep in calibration.thresholds.items():
        by_threshold = {p.threshold: p for p in sweep.points}
        for target in targets:
            point = by_threshold.get(sweep.as_thresholds().threshold_for(target))
            rows.append({"kind": kind, "target_psnr": target, "threshold": point.threshold if point else 0.0,
                         "psnr_db": point.psnr_db if point else None,
                         "forwards_reused": point.forwards_reused if point else 0.0})
    return rows
