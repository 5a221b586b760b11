"""FLUX.1 configs and presets: the released shapes and sampling defaults, validation, diffusers config.json,
and that `import models.flux` (presets, checkpoint resolution) loads no torch. Parameter counts on the meta
device are in test_transformer.py (they need torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from models.family import DynamicShift
from models.flux.config import FLUX1_DEV, FLUX1_SCHNELL, PRESETS, FluxDiTConfig, get_preset, match_preset

ROOT = Path(__file__).resolve().parents[3]


def test_released_shapes() -> None:
    for cfg in (FLUX1_DEV, FLUX1_SCHNELL):
        assert (cfg.in_channels, cfg.hidden_size, cfg.num_heads, cfg.head_dim) == (64, 3072, 24, 128)
        assert (cfg.num_double_blocks, cfg.num_single_blocks, cfg.mlp_hidden) == (19, 38, 12288)
        assert (cfg.context_dim, cfg.pooled_dim, cfg.axes_dims_rope, cfg.theta) == (4096, 768, (16, 56, 56), 10000)
        assert cfg.latent_channels == 16
    assert FLUX1_DEV.guidance_embed and not FLUX1_SCHNELL.guidance_embed


def test_presets_carry_the_release_sampling_defaults() -> None:
    dev, schnell = get_preset("flux1-dev"), get_preset("flux1-schnell")
    assert dev.dit == FLUX1_DEV and schnell.dit == FLUX1_SCHNELL
    d, s = dev.defaults, schnell.defaults
    assert (d.height, d.width, d.num_inference_steps, d.guidance_scale, dev.max_sequence_length) == (
        1024, 1024, 28, 3.5, 512)
    assert d.shift == DynamicShift(base_shift=0.5, max_shift=1.15, base_seq_len=256, max_seq_len=4096)
    assert (s.height, s.width, s.num_inference_steps, s.guidance_scale, schnell.max_sequence_length) == (
        1024, 1024, 4, None, 256)
    assert s.shift == 1.0 and d.sampler == s.sampler == "flowmatch-euler" and d.num_frames == s.num_frames == 1
    tiny = get_preset("flux-tiny")
    assert tiny.dit.head_dim == 128 and tiny.dit.num_double_blocks == 2 and tiny.dit.guidance_embed


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown FLUX preset 'flux2'.*flux1-dev"):
        get_preset("flux2")


def test_match_preset() -> None:
    assert match_preset(FLUX1_SCHNELL) is PRESETS["flux1-schnell"]
    odd = FluxDiTConfig(hidden_size=256, num_heads=2, num_double_blocks=1, num_single_blocks=1, guidance_embed=False)
    custom = match_preset(odd)
    assert custom.name == "custom" and custom.defaults.guidance_scale is None
    assert custom.defaults.num_inference_steps == 4
    assert custom.max_sequence_length == 256


@pytest.mark.parametrize("kwargs,match", [
    ({"hidden_size": 100, "num_heads": 3}, "divisible by num_heads"),
    ({"axes_dims_rope": (16, 56, 48)}, "must sum to head_dim"),
    ({"hidden_size": 48, "num_heads": 2, "axes_dims_rope": (4, 9, 11)}, "must be even"),
    ({"hidden_size": 32, "num_heads": 2, "axes_dims_rope": (16,)}, "3 axes"),
    ({"in_channels": 30}, "4 x the latent channels"),
])
def test_invalid_configs_name_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FluxDiTConfig(**kwargs)


def test_diffusers_json_round_trip() -> None:
    for cfg in (FLUX1_DEV, FLUX1_SCHNELL, PRESETS["flux-tiny"].dit):
        assert FluxDiTConfig.from_diffusers_json(cfg.to_diffusers_json()) == cfg
    # diffusers' own defaults are schnell-shaped (guidance_embeds False)
    assert FluxDiTConfig.from_diffusers_json({"_class_name": "FluxTransformer2DModel"}) == FLUX1_SCHNELL
    with pytest.raises(ValueError, match="patch_size"):
        FluxDiTConfig.from_diffusers_json({"patch_size": 2})
    with pytest.raises(ValueError, match="out_channels"):
        FluxDiTConfig.from_diffusers_json({"out_channels": 16})


def test_import_models_flux_loads_no_torch() -> None:
    code = ("import sys, models.flux; models.flux.get_preset('flux1-dev'); "
            "assert 'FluxTransformer' in models.flux.__all__; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
