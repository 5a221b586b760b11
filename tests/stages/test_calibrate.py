"""`smartdiff calibrate` end to end on a tiny random model: it writes the calibration next to the checkpoint,
reports the fits, and a `generate` with a quality target then runs from it and records what it resolved to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.cache_calibration import CALIBRATION_FILE, read_calibration
from models.wan.default_model import write_random_checkpoint
from stages.calibrate import SWEEPS, read_prompts
from stages.cli import main


@pytest.mark.slow
def test_calibrate_then_generate_with_a_quality_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_random_checkpoint(tmp_path / "model", seed=4)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red circle moving left\n\na blue square moving up\n")
    assert main(["calibrate", "--model", str(root), "--prompts", str(prompts), "--steps", "4", "--height", "32",
                 "--width", "32", "--frames", "5", "-q"]) == 0
    report = capsys.readouterr().out
    assert "TeaCache default (time_embedding): R^2" in report and "MagCache ratio curve: R^2" in report
    calibration = read_calibration(root / CALIBRATION_FILE)
    assert calibration.settings["steps"] == 4 and calibration.settings["seeds"] == [0, 1]
    assert (calibration.settings["height"], calibration.settings["num_frames"]) == (32, 5)
    assert set(calibration.teacache) == {"default", "ret_steps"}
    assert [len(c) for c in calibration.magcache.ratios] == [4, 4]  # CFG: one curve per branch
    assert set(calibration.thresholds) == set(SWEEPS)
    assert [p.threshold for p in calibration.thresholds["easycache"].points] == list(SWEEPS["easycache"][1])

    out = tmp_path / "clip.mp4"
    assert main(["generate", "--model", str(root), "--prompt", "a red circle moving left", "--steps", "4",
                 "--frames", "5", "--height", "32", "--width", "32", "--seed", "0",
                 "--cache", "magcache:target_psnr=30", "--out", str(out), "-q"]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    cache = record["params"]["cache"]
    expected = calibration.thresholds["magcache"].as_thresholds().threshold_for(30)
    assert cache["target_psnr"] == 30 and cache["threshold"] == expected
    assert [len(c) for c in cache["ratios"]] == [4, 4]


def test_prompt_files_and_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(empty)
    assert main(["calibrate", "--prompts", str(empty), "-q"]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert main(["calibrate", "--prompts", str(tmp_path / "missing.txt"), "-q"]) == 2
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    assert main(["calibrate", "--prompts", str(prompts), "--steps", "1", "-q"]) == 2
    assert "--steps must be at least 2" in capsys.readouterr().err


def test_generate_refuses_a_calibration_of_another_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from models.cache_calibration import CacheCalibration

    wrong = CacheCalibration(model="flux1-dev").write(tmp_path / "flux.json")
    assert main(["generate", "--prompt", "a red circle", "--calibration", str(wrong), "-q"]) == 1
    assert "a calibration of 'flux1-dev', not of 'wan-tiny-shapes'" in capsys.readouterr().err
