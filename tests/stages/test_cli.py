"""The `smartdiff generate` command on the embedded default model (wan-tiny-shapes, shipped with the package)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stages.cli import main
from stages.media import read_video


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private HOME: the user's cache is never read or written."""
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_generate_writes_mp4_and_sidecar(home: Path) -> None:
    out = home / "clip.mp4"
    code = main(["generate", "--prompt", "a red circle moving left", "--frames", "9", "--height", "32",
                 "--width", "48", "--steps", "3", "--seed", "42", "--out", str(out), "-q"])
    assert code == 0
    frames = read_video(out)
    assert frames.shape == (9, 32, 48, 3)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["params"]["seed"] == 42 and record["params"]["num_inference_steps"] == 3
    assert record["params"]["negative_prompt"]  # Wan's default negative prompt is recorded
    assert record["preset"] == "wan-tiny-shapes" and record["frames"] == 9
    assert set(record["timings_s"]) == {"text_encode", "denoise", "decode", "total"}
    assert record["memory"]["host_peak_rss_mb"] > 0


def test_one_frame_writes_png_and_seed_repeats(home: Path) -> None:
    args = ["generate", "--prompt", "a blue square", "--frames", "1", "--height", "32", "--width", "32",
            "--steps", "2", "--seed", "7", "-q"]
    assert main([*args, "--out", str(home / "a.png")]) == 0
    assert main([*args, "--out", str(home / "b.png")]) == 0
    a, b = read_video(home / "a.png"), read_video(home / "b.png")
    assert a.shape == (1, 32, 32, 3) and (a == b).all()


def test_bad_parameter_names_the_field(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--prompt", "x", "--height", "100"]) == 2
    err = capsys.readouterr().err
    assert "height" in err and "multiple of 16" in err
    assert main(["generate", "--prompt", "x", "--frames", "10"]) == 2
    assert "num_frames" in capsys.readouterr().err


def test_missing_model_is_a_clear_error(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--prompt", "x", "--model", str(home / "nowhere")]) == 1
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.slow
def test_two_local_ranks_give_the_single_rank_image(home: Path) -> None:
    """--world-size 2 spawns two gloo ranks (automatic layout: CFG parallel, strip-parallel decode)."""
    args = ["generate", "--prompt", "a red circle moving left", "--frames", "1", "--height", "32", "--width", "48",
            "--steps", "3", "--seed", "5", "-q"]
    assert main([*args, "--out", str(home / "one.png")]) == 0
    assert main([*args, "--out", str(home / "two.png"), "--world-size", "2", "--ulysses-degree", "2"]) == 0
    one, two = read_video(home / "one.png").astype(int), read_video(home / "two.png").astype(int)
    assert one.shape == two.shape == (1, 32, 48, 3)
    assert abs(one - two).max() <= 1  # fp32 sums in another order can flip a rounding
    assert (one == two).mean() > 0.99
    record = json.loads((home / "two.json").read_text())
    assert (record["world_size"], record["parallel_layout"]) == (2, "ulysses2")


@pytest.mark.parametrize("flags, message", [
    (["--world-size", "2", "--ulysses-degree", "4"], r"= 4 ranks, but there are 2 \(--world-size\)"),
    (["--world-size", "2", "--cfg-degree", "2", "--guidance", "1"], "cfg_degree 2 needs classifier-free guidance"),
    (["--world-size", "0"], "--world-size must be at least 1"),
])
def test_invalid_parallel_layout_is_refused_before_spawning(home: Path, capsys: pytest.CaptureFixture[str],
                                                            flags: list[str], message: str) -> None:
    assert main(["generate", "--prompt", "x", *flags]) == 2
    err = capsys.readouterr().err
    assert "invalid parallel layout" in err
    assert re.search(message, err), err


def test_stages_never_import_ray() -> None:
    code = "import sys, stages.pipeline, stages.cli; assert 'ray' not in sys.modules, 'stages imported ray'"
    subprocess.run([sys.executable, "-c", code], check=True)
