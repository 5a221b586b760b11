"""The synthetic task: prompts, renderer and the detector the benchmark scores generated videos with."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.wan.default_model import TINY_VOCAB
from models.wan.tiny.shapes import (
    COLOURS,
    DIRECTIONS,
    SHAPES,
    ShapeSpec,
    all_specs,
    detect,
    render,
    sample_motion,
    sample_video,
    to_model_video,
    vocabulary,
)


def test_prompts_round_trip_and_use_only_known_words() -> None:
    specs = all_specs()
    assert len(specs) == len(COLOURS) * len(SHAPES) * len(DIRECTIONS) == 90
    assert ShapeSpec("red", "circle", "left").prompt == "a red circle moving left on a white background"
    assert ShapeSpec("blue", "square", "still").prompt == "a blue square standing still on a white background"
    for spec in specs:
        assert ShapeSpec.from_prompt(spec.prompt) == spec
        assert set(spec.prompt.split()) <= set(vocabulary()) <= set(TINY_VOCAB)
    assert ShapeSpec.from_prompt("  A Red  circle moving LEFT on a white background ") == ShapeSpec("red", "circle", "left")
    with pytest.raises(ValueError, match="template"):
        ShapeSpec.from_prompt("a cat moving left on a white background")
    with pytest.raises(ValueError, match="colour 'pink'"):
        ShapeSpec("pink", "circle", "left")


def test_shapes_stay_inside_the_frame_and_move_as_told() -> None:
    rng = np.random.default_rng(0)
    for direction in DIRECTIONS:
        for _ in range(5):
            spec = ShapeSpec("red", "square", direction)
            video = render(spec, sample_motion(direction, rng))
            assert video.shape == (17, 64, 64, 3) and video.dtype == np.float32
            fg = (video < 0.99).any(axis=-1)
            border = fg[:, 0, :].any() or fg[:, -1, :].any() or fg[:, :, 0].any() or fg[:, :, -1].any()
            assert not border, direction
            assert fg.sum(axis=(1, 2)).min() > 150  # 18 px or more across


def test_detector_is_exact_on_rendered_ground_truth_in_every_input_form() -> None:
    rng = np.random.default_rng(1)
    for spec in all_specs():
        video = sample_video(spec, rng)
        det = detect((video * 255).round().astype(np.uint8))
        assert det.matches(spec)["all"], (spec, det)
    spec = ShapeSpec("purple", "triangle", "down")
    video = sample_video(spec, rng)
    assert detect(video).matches(spec)["all"]  # float [0, 1], (T, H, W, 3)
    assert detect(to_model_video(video)[0]).matches(spec)["all"]  # model layout (3, T, H, W) in [-1, 1]


def test_detector_reports_nothing_on_a_blank_video() -> None:
    det = detect(np.ones((17, 64, 64, 3), dtype=np.float32))
    assert (det.colour, det.shape, det.direction) == (None, None, None)
    assert not det.matches(ShapeSpec("red", "circle", "still"))["all"]


def test_to_model_video_layout() -> None:
    video = np.zeros((5, 8, 16, 3), dtype=np.float32)
    video[..., 0] = 1.0
    x = to_model_video(np.stack([video, video]))
    assert x.shape == (2, 3, 5, 8, 16) and x.dtype == torch.float32
    assert x[:, 0].eq(1).all() and x[:, 1:].eq(-1).all()
