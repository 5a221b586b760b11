"""The embedded default model: the shipped wan-tiny-shapes checkpoint loads strictly and draws what it is told;
`wan-tiny` is the random-weight model created in the user's cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import UMT5EncoderModel

from models.loading import meta_device
from models.wan.checkpoint import WanCheckpoint
from models.wan.config import PRESETS
from models.wan.default_model import (
    DEFAULT_MODEL_DIR,
    DEFAULT_MODEL_NAME,
    resolve_model_path,
    tiny_t5_config,
)
from models.wan.t5_keys import transformers_to_wan_t5
from models.wan.tiny.shapes import ShapeSpec, detect
from models.wan.transformer import WanTransformer
from models.wan.vae import WanVAE, infer_config_from_original

SHIPPED_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "Wan2.1_VAE.pth",
                 "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/tokenizer.json")


def test_default_name_and_none_resolve_to_the_shipped_folder() -> None:
    assert resolve_model_path(None) == resolve_model_path(DEFAULT_MODEL_NAME) == DEFAULT_MODEL_DIR
    for name in SHIPPED_FILES:
        assert (DEFAULT_MODEL_DIR / name).is_file(), name
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file())
    assert size < 20 * 2**20, f"the shipped model is {size / 2**20:.1f} MB"
    ckpt = WanCheckpoint.resolve(DEFAULT_MODEL_DIR)
    assert ckpt.layout == "original" and ckpt.preset is PRESETS[DEFAULT_MODEL_NAME]
    assert ckpt.preset.defaults.num_frames == 17 and ckpt.preset.defaults.height == ckpt.preset.defaults.width == 64


def test_shipped_files_hold_exactly_the_original_layout_keys() -> None:
    ckpt = WanCheckpoint.resolve(DEFAULT_MODEL_DIR)
    with meta_device():
        dit = WanTransformer(ckpt.preset.dit)
    with safe_open(str(DEFAULT_MODEL_DIR / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(dit.state_dict())
    vae_sd = torch.load(DEFAULT_MODEL_DIR / "Wan2.1_VAE.pth", weights_only=True, mmap=True)
    with meta_device():
        vae = WanVAE(infer_config_from_original(vae_sd))
    assert set(vae_sd) == set(vae.state_dict())
    t5_sd = torch.load(DEFAULT_MODEL_DIR / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True, mmap=True)
    vocab = t5_sd["token_embedding.weight"].shape[0]
    with meta_device():
        t5 = UMT5EncoderModel(tiny_t5_config(vocab, ckpt.preset.dit.text_dim))
    assert set(t5_sd) == set(transformers_to_wan_t5(t5.state_dict()))
    assert {v.dtype for v in t5_sd.values()} == {torch.bfloat16}  # as the release file name says


@pytest.fixture(scope="module")
def pipeline():  # noqa: ANN201 - stages.pipeline.Pipeline
    from stages.pipeline import Pipeline

    return Pipeline.from_pretrained(None)  # every component through its strict loader


def test_a_generated_video_shows_the_prompt(pipeline) -> None:  # noqa: ANN001
    spec = ShapeSpec("red", "circle", "left")
    result = pipeline.generate({"prompt": spec.prompt, "seed": 0})
    assert result.frames.shape == (17, 64, 64, 3)
    det = detect(result.frames)
    assert (det.colour, det.direction) == (spec.colour, spec.direction), det
    assert det.shape == spec.shape, det


def test_wan_tiny_names_the_random_model_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    path = resolve_model_path("wan-tiny")
    assert path.is_relative_to(tmp_path) and WanCheckpoint.resolve(path).preset.name == "wan-tiny"
    assert resolve_model_path("wan-tiny") == path  # created once


def test_unknown_names_are_refused_with_the_bundled_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="wan-tiny-shapes"):
        resolve_model_path("no-such-model")
    with pytest.raises(ValueError, match="must be downloaded first"):
        resolve_model_path("wan2.1-t2v-1.3b")
