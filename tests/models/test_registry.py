"""The model registry: which family a checkpoint folder belongs to, and its torch-free description."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.errors import CheckpointError
from models.registry import FAMILIES, describe, family_module
from models.wan.default_model import resolve_model_path


def test_the_shipped_model_is_described_without_loading_it() -> None:
    model = describe(resolve_model_path(None))
    assert (model.family, model.name, model.output, model.guidance) == ("wan", "wan-tiny-shapes", "video", "cfg")
    assert model.num_heads == 4 and model.num_experts == 1 and model.guidance_scale_2 is None
    assert model.defaults.num_frames == 17 and model.text_len == 32 and model.guided_by_default
    assert model.negative_prompt.startswith("色调艳丽")
    # 17 frames at 64x64: latents (16, 5, 8, 8), 2x2 patches: 5 x 4 x 4 tokens
    assert model.latent.latent_shape(17, 64, 64) == (16, 5, 8, 8) and model.latent.tokens(17, 64, 64) == 80
    assert model.components["vae"].name == "Wan2.1_VAE.pth" and model.components["transformer"] == model.root


def test_a_folder_of_no_family_is_refused_naming_the_families(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "SomeOtherPipeline"}))
    with pytest.raises(CheckpointError, match="not a checkpoint of a known family .*wan"):
        describe(tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        describe(tmp_path / "missing")


def test_a_broken_wan_folder_says_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": 64}))
    with pytest.raises(CheckpointError, match="Wan2.1_VAE.pth"):
        describe(tmp_path)


def test_every_registered_family_answers_the_registry_protocol() -> None:
    for name in FAMILIES:
        module = family_module(name)
        assert callable(module.recognises) and callable(module.describe)
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        family_module("nope")
