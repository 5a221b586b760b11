"""The calibration measurements and fits: the recorder's numbers on a toy forward, the polynomial fit recovering
known coefficients from a synthetic trace, MagCache's curve fit, and a calibration file that the model's
description (and so TeaCache, MagCache and `target_psnr` requests) then uses."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from flexcache.calibration import (CalibrationRecorder, ForwardRecord, fit_polynomial, fit_ratio_curves,
                                   teacache_samples)
from flexcache.hooks import StepInfo
from models.cache_calibration import (CALIBRATION_FILE, CacheCalibration, PolynomialFit, RatioFit, ThresholdPoint,
                                      ThresholdSweep, read_calibration)
from models.denoiser import CacheSignal
from models.errors import CheckpointError
from models.registry import describe
from models.wan.default_model import write_random_checkpoint
from stages.params import GenerationParams


def test_the_polynomial_fit_recovers_known_coefficients_from_a_synthetic_trace() -> None:
    rng = np.random.default_rng(0)
    truth = (2.4e3, -1.3e3, 2.0e2, -8.3, 0.14)  # the shape of a published TeaCache polynomial
    x = rng.uniform(0.0, 0.3, 400)
    runs = [[ForwardRecord(step, {"e": [float(x[i])]}, [float(np.polyval(truth, x[i]))], [1.0])
             for step, i in enumerate(range(k * 40, (k + 1) * 40))] for k in range(10)]
    coefficients, r2, samples = fit_polynomial(*teacache_samples(runs, "e"))
    np.testing.assert_allclose(coefficients, truth, rtol=1e-6, atol=1e-6)
    assert r2 == pytest.approx(1.0) and samples == 400
    noisy_x = list(x[:50]) + [math.nan]
    _, noisy_r2, kept = fit_polynomial(noisy_x, list(np.polyval(truth, x[:50]) + rng.normal(0, 5, 50)) + [1.0])
    assert kept == 50 and 0 < noisy_r2 < 1  # non-finite samples are dropped; noise lowers R²
    with pytest.raises(ValueError, match="more than 4 samples"):
        fit_polynomial([0.1, 0.2], [1.0, 2.0])


def test_the_ratio_curve_is_the_per_step_mean_and_its_r2_the_prompt_invariance() -> None:
    def run(ratios: list[list[float]]) -> list[ForwardRecord]:
        return [ForwardRecord(step, {}, [0.0, 0.0], r) for step, r in enumerate(ratios)]

    runs = [run([[math.nan, math.nan], [1.0, 2.0], [0.9, 1.0]]), run([[math.nan, math.nan], [1.2, 2.0], [0.7, 1.0]])]
    curves, r2, samples = fit_ratio_curves(runs, num_steps=3)
    assert curves == ((1.0, 1.1, 0.8), (1.0, 2.0, 1.0)) and samples == 8
    values = np.array([1.0, 1.2, 0.9, 0.7, 2.0, 2.0, 1.0, 1.0])
    fitted = np.array([1.1, 1.1, 0.8, 0.8, 2.0, 2.0, 1.0, 1.0])
    assert r2 == pytest.approx(1 - np.sum((values - fitted) ** 2) / np.sum((values - values.mean()) ** 2))


def test_the_recorder_measures_indicator_output_and_residual_ratio() -> None:
    recorder = CalibrationRecorder(["e"])
    residual_scale = [1.0, 2.0, 3.0]
    for step in range(3):
        info = StepInfo(step, 1000.0 - step, 1, 2)

        def forward(step: int = step) -> torch.Tensor:
            recorder.begin(info, lambda name: CacheSignal(torch.full((1, 4), 1.0 + step), per_token=False))
            img, txt = torch.ones(1, 3, 2), None
            for index in range(2):  # the stack's residual is residual_scale[step] on every token
                img, txt = recorder.block(info, index, torch.nn.Identity(),
                                          lambda x, t: (x + residual_scale[step] / 2, t), img, txt)
            return img * (step + 1)

        recorder.step(info, forward)
    first, second, third = recorder.records
    assert math.isnan(first.signal_change["e"][0]) and math.isnan(first.residual_ratio[0])
    assert second.signal_change["e"] == [pytest.approx(1.0)] and third.signal_change["e"] == [pytest.approx(0.5)]
    assert second.residual_ratio == [pytest.approx(2.0)] and third.residual_ratio == [pytest.approx(1.5)]
    # outputs: 2*1, 3*2, 4*3 per element: relative changes 2 and 1
    assert second.output_change == [pytest.approx(2.0)] and third.output_change == [pytest.approx(1.0)]
    assert recorder.stats.forwards_reused == 0 and recorder.stats.forwards_computed == 3


@pytest.fixture(scope="module")
def calibrated_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_random_checkpoint(tmp_path_factory.mktemp("calibrated"), seed=3)
    CacheCalibration(
        model="wan-tiny",
        teacache={"default": PolynomialFit(signal="time_embedding", coefficients=(3.0, 0.5), r2=0.9, samples=10)},
        magcache=RatioFit(ratios=((1.0, 0.98, 0.95), (1.0, 0.97, 0.9)), r2=0.99, samples=12),
        thresholds={"teacache": ThresholdSweep(spec={"kind": "teacache", "mode": "default"}, points=(
                        ThresholdPoint(threshold=0.05, psnr_db=38.0, forwards_reused=3),
                        ThresholdPoint(threshold=0.1, psnr_db=31.0, forwards_reused=6),
                        ThresholdPoint(threshold=0.2, psnr_db=24.0, forwards_reused=9))),
                    "dbcache": ThresholdSweep(spec={"kind": "dbcache", "first_blocks": 1, "warmup_steps": 2},
                                              points=(ThresholdPoint(threshold=0.3, psnr_db=33.0,
                                                                     forwards_reused=4),))},
    ).write(root / CALIBRATION_FILE)
    return root


def test_a_calibration_file_next_to_the_checkpoint_is_what_the_caches_use(calibrated_model: Path) -> None:
    model = describe(calibrated_model)
    resolved = GenerationParams(prompt="p", cache={"kind": "teacache"}).resolve(model)
    assert resolved.cache.coefficients == (3.0, 0.5)
    resolved = GenerationParams(prompt="p", cache={"kind": "magcache"}).resolve(model)
    assert resolved.cache.ratios == ((1.0, 0.98, 0.95), (1.0, 0.97, 0.9))


def test_target_psnr_takes_the_largest_threshold_that_kept_it(calibrated_model: Path) -> None:
    model = describe(calibrated_model)

    def resolved(cache: dict) -> object:
        return GenerationParams(prompt="p", cache=cache).resolve(model).cache

    assert resolved({"kind": "teacache", "target_psnr": 30}).threshold == 0.1
    assert resolved({"kind": "teacache", "target_psnr": 35}).threshold == 0.05
    assert resolved({"kind": "teacache", "target_psnr": 20}).threshold == 0.2
    kept = resolved({"kind": "teacache", "target_psnr": 45})
    assert kept.threshold == 0.0 and kept.target_psnr == 45  # nothing measured met it: full compute, recorded
    db = resolved({"kind": "dbcache", "target_psnr": 30})
    assert (db.threshold, db.first_blocks, db.warmup_steps) == (0.3, 1, 2)  # the sweep's knobs come with it


def test_target_psnr_errors_name_the_field(calibrated_model: Path) -> None:
    model = describe(calibrated_model)
    cases = {
        "not both": {"kind": "teacache", "target_psnr": 30, "threshold": 0.1},
        "no easycache sweep": {"kind": "easycache", "target_psnr": 30},
        "first_blocks=1": {"kind": "dbcache", "target_psnr": 30, "first_blocks": 2},
    }
    for message, cache in cases.items():
        with pytest.raises(ValidationError, match=f"cache must be .*{message}"):
            GenerationParams(prompt="p", cache=cache).resolve(model)
    with pytest.raises(ValidationError, match="target_psnr"):
        GenerationParams(prompt="p", cache={"kind": "teacache", "target_psnr": 5})


def test_a_broken_calibration_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / CALIBRATION_FILE).write_text('{"model": "m", "teacache": {"default": {"signal": 1}}}')
    with pytest.raises(CheckpointError, match="not a readable feature-cache calibration"):
        read_calibration(tmp_path / CALIBRATION_FILE)


def test_a_calibration_named_elsewhere_wins_and_one_of_another_model_is_refused(calibrated_model: Path,
                                                                                  tmp_path: Path) -> None:
    other = CacheCalibration(model="wan-tiny", magcache=RatioFit(ratios=((0.5, 0.5),), r2=1.0, samples=2))
    elsewhere = other.write(tmp_path / "mine.json")
    assert describe(calibrated_model, elsewhere).magcache == ((0.5, 0.5),)
    assert describe(calibrated_model).magcache == ((1.0, 0.98, 0.95), (1.0, 0.97, 0.9))
    wrong = CacheCalibration(model="flux1-dev").write(tmp_path / "flux.json")
    with pytest.raises(CheckpointError, match="a calibration of 'flux1-dev', not of 'wan-tiny'"):
        describe(calibrated_model, wrong)
