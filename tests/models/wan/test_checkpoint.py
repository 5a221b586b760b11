"""Finding the parts of a checkpoint in both release layouts, and matching it to a preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.loading import CheckpointError
from models.wan.checkpoint import WanCheckpoint
from models.wan.config import WAN21_T2V_1_3B, WAN21_T2V_14B, WanDiTConfig


def _original(root: Path, dit: WanDiTConfig, experts: int = 1) -> Path:
    """Only the small files resolve() reads; weights are not needed to find the parts."""
    dirs = [root] if experts == 1 else [root / "high_noise_model", root / "low_noise_model"]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(dit.to_original_json()))
    (root / "Wan2.1_VAE.pth").touch()
    (root / "models_t5_umt5-xxl-enc-bf16.pth").touch()
    (root / "google" / "umt5-xxl").mkdir(parents=True)
    return root


def _diffusers(root: Path, dit: WanDiTConfig, experts: int = 1, boundary: float | None = None) -> Path:
    names = ["transformer", "transformer_2"][:experts]
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(dit.to_diffusers_json()))
    for name in ("vae", "text_encoder", "tokenizer"):
        (root / name).mkdir()
    index = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
             "transformer_2": ["diffusers", "WanTransformer3DModel"] if experts == 2 else [None, None],
             "boundary_ratio": boundary}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_original_wan21_matches_its_preset(tmp_path: Path) -> None:
    ckpt = WanCheckpoint.resolve(_original(tmp_path, WAN21_T2V_1_3B))
    assert ckpt.layout == "original" and ckpt.transformer_dirs == (tmp_path.resolve(),)
    assert ckpt.vae.name == "Wan2.1_VAE.pth" and ckpt.preset.name == "wan2.1-t2v-1.3b"


def test_original_wan22_has_two_experts_high_noise_first(tmp_path: Path) -> None:
    ckpt = WanCheckpoint.resolve(_original(tmp_path, WAN21_T2V_14B, experts=2))
    assert [d.name for d in ckpt.transformer_dirs] == ["high_noise_model", "low_noise_model"]
    assert ckpt.preset.name == "wan2.2-t2v-a14b" and ckpt.preset.boundary == 0.875
    assert ckpt.preset.guidance_scale_2 == 3.0 and ckpt.preset.defaults.guidance_scale == 4.0


def test_diffusers_layout_reads_boundary_ratio(tmp_path: Path) -> None:
    ckpt = WanCheckpoint.resolve(_diffusers(tmp_path, WAN21_T2V_14B, experts=2, boundary=0.9))
    assert ckpt.layout == "diffusers" and [d.name for d in ckpt.transformer_dirs] == ["transformer", "transformer_2"]
    assert ckpt.preset.boundary == 0.9 and ckpt.vae.name == "vae"
    single = WanCheckpoint.resolve(_diffusers(tmp_path / "one", WAN21_T2V_1_3B))
    assert single.preset.name == "wan2.1-t2v-1.3b" and single.preset.boundary is None


def test_unknown_shapes_get_a_custom_preset(tmp_path: Path) -> None:
    odd = WanDiTConfig(dim=96, ffn_dim=128, num_heads=3, num_layers=1)
    assert WanCheckpoint.resolve(_original(tmp_path, odd)).preset.name == "custom"


@pytest.mark.parametrize("missing", ["Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"])
def test_missing_part_is_named(tmp_path: Path, missing: str) -> None:
    root = _original(tmp_path, WAN21_T2V_1_3B)
    (root / missing).unlink()
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        WanCheckpoint.resolve(root)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a Wan checkpoint"):
        WanCheckpoint.resolve(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        WanCheckpoint.resolve(tmp_path / "absent")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    (tmp_path / "Wan2.1_VAE.pth").touch()
    (tmp_path / "models_t5_umt5-xxl-enc-bf16.pth").touch()
    (tmp_path / "google" / "umt5-xxl").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="FluxTransformer2DModel"):
        WanCheckpoint.resolve(tmp_path)
