"""The model registry: which family a checkpoint folder belongs to, and its torch-free description."""

from __future__ import annotations

import json
import math
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


def test_descriptions_carry_the_request_rules_torch_free() -> None:
    """The schema's per-model rules for a Wan, a FLUX.1-dev and a FLUX.1-schnell preset (no weights needed)."""
    from models.flux.config import get_preset as flux_preset
    from models.flux.family import description as flux_description
    from models.wan.config import get_preset as wan_preset
    from models.wan.family import description as wan_description
    from stages.sampler_names import SAMPLER_NAMES

    wan, a14b = wan_description(wan_preset("wan2.1-t2v-1.3b")), wan_description(wan_preset("wan2.2-t2v-a14b"))
    dev, schnell = flux_description(flux_preset("flux1-dev")), flux_description(flux_preset("flux1-schnell"))
    assert wan.frames.values()[:3] == (1, 5, 9) and wan.frames.values()[-1] == 257 and not wan.frames.allows(10)
    assert dev.frames.values() == (1,) and not dev.frames.allows(5)
    assert (wan.samplers, wan.defaults.sampler) == (("unipc", "dpm++", "euler"), "unipc")
    assert (dev.samplers, dev.defaults.sampler) == (("flowmatch-euler",), "flowmatch-euler")
    assert all(set(m.samplers) <= set(SAMPLER_NAMES) for m in (wan, a14b, dev, schnell))
    assert (wan.shift_for(81, 480, 832, 50), a14b.shift_for(81, 480, 832, 40), schnell.shift_for(1, 1024, 1024, 4)) == (
        5.0, 12.0, 1.0)
    # dev: mu from 0.5 at 256 image tokens (256x256 pixels) to 1.15 at 4096 (1024x1024), shift exp(mu)
    assert dev.shift_for(1, 256, 256, 28) == pytest.approx(math.exp(0.5))
    assert dev.shift_for(1, 1024, 1024, 28) == pytest.approx(math.exp(1.15))
    assert dev.shift_for(1, 512, 512, 28) == pytest.approx(math.exp(0.5 + 0.65 * (1024 - 256) / 3840))
    assert (wan.guidance, dev.guidance, schnell.guidance) == ("cfg", "distilled", "none")
    assert wan.takes_negative_prompt and not dev.takes_negative_prompt and not schnell.takes_negative_prompt
    assert dev.takes_guidance_scale and not schnell.takes_guidance_scale and dev.defaults.guidance_scale == 3.5
    assert a14b.takes_guidance_scale_2 and not wan.takes_guidance_scale_2 and not dev.takes_guidance_scale_2
    assert not dev.guided_by_default and not schnell.guided_by_default and wan.guided_by_default
    assert (dev.text_len, schnell.text_len) == (512, 256)


def test_a_description_that_breaks_its_own_rules_is_refused() -> None:
    import dataclasses

    from models.flux.config import get_preset as flux_preset
    from models.flux.family import description as flux_description

    dev = flux_description(flux_preset("flux1-dev"))
    with pytest.raises(ValueError, match="default sampler 'unipc' is not one of the family's samplers"):
        dataclasses.replace(dev, defaults=dataclasses.replace(dev.defaults, sampler="unipc"))
    with pytest.raises(ValueError, match="default num_frames 5 breaks the frame rule"):
        dataclasses.replace(dev, defaults=dataclasses.replace(dev.defaults, num_frames=5))
    with pytest.raises(ValueError, match="default guidance_scale is needed exactly when"):
        dataclasses.replace(dev, guidance="none")
