"""Request schema: defaults, seeds, and error messages that name the field and its rule."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from pydantic import ValidationError

from models.family import ModelDescription
from models.flux.config import get_preset as flux_preset
from models.flux.family import description as flux_description
from models.wan.config import WAN_DEFAULT_NEGATIVE_PROMPT, get_preset
from models.wan.family import description
from stages.params import FIELD_RULES, MAX_SEED, GenerationParams, ResolvedParams, format_validation_error


WAN_1_3B = description(get_preset("wan2.1-t2v-1.3b"))  # a single-expert model with the default defaults

def test_empty_fields_resolve_to_the_model_defaults() -> None:
    preset = get_preset("wan2.2-t2v-a14b")
    r = GenerationParams(prompt="a cat surfing").resolve(description(preset))
    assert (r.height, r.width, r.num_frames, r.fps) == (480, 832, 81, 16)
    assert (r.num_inference_steps, r.shift, r.sampler) == (40, 12.0, "unipc")
    assert (r.guidance_scale, r.guidance_scale_2) == (4.0, 3.0)
    assert r.prompt == "a cat surfing"
    assert r.negative_prompt == WAN_DEFAULT_NEGATIVE_PROMPT
    assert json.loads(r.model_dump_json()) == r.model_dump()  # recordable as result metadata


def test_given_fields_override_the_defaults() -> None:
    params = GenerationParams(prompt="p", negative_prompt="blurry", height=720, width=1280, num_frames=17,
                              num_inference_steps=8, guidance_scale=6, guidance_scale_2=2.5, shift=8,
                              seed=7, sampler="dpm++")
    r = params.resolve(description(get_preset("wan2.2-t2v-a14b")))
    assert (r.height, r.width, r.num_frames, r.num_inference_steps) == (720, 1280, 17, 8)
    assert (r.guidance_scale, r.guidance_scale_2, r.shift, r.seed, r.sampler) == (6.0, 2.5, 8.0, 7, "dpm++")
    assert r.negative_prompt == "blurry"


def test_default_negative_prompt_is_wans() -> None:
    assert WAN_DEFAULT_NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态，")
    assert WAN_DEFAULT_NEGATIVE_PROMPT.endswith("三条腿，背景人很多，倒着走")
    assert len(WAN_DEFAULT_NEGATIVE_PROMPT) == 137
    empty = GenerationParams(prompt="p", negative_prompt="").resolve(WAN_1_3B)
    assert empty.negative_prompt == WAN_DEFAULT_NEGATIVE_PROMPT


def test_single_expert_models_ignore_guidance_scale_2(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="stages.params"):
        r = GenerationParams(prompt="p", guidance_scale=6.0, guidance_scale_2=2.0).resolve(WAN_1_3B)
    assert r.guidance_scale_2 == r.guidance_scale == 6.0
    assert "guidance_scale_2=2.0 ignored" in caplog.text


def test_seed_is_drawn_when_empty_and_kept_when_given() -> None:
    params = GenerationParams(prompt="p")
    seeds = {params.resolve(WAN_1_3B).seed for _ in range(3)}
    assert len(seeds) == 3  # independent 63-bit draws
    assert all(0 <= s <= MAX_SEED for s in seeds)
    fixed = GenerationParams(prompt="p", seed=MAX_SEED)
    assert fixed.resolve(WAN_1_3B).seed == fixed.resolve(WAN_1_3B).seed == MAX_SEED


def test_boundary_values_are_accepted() -> None:
    GenerationParams(prompt="p", height=16, width=2048, num_frames=1, num_inference_steps=200,
                     guidance_scale=0, guidance_scale_2=30, shift=100, seed=0, sampler="euler")
    GenerationParams(prompt="p", num_frames=257)


@pytest.mark.parametrize("field,value,message", [
    ("height", 100, "height must be a multiple of 16 between 16 and 2048, got 100"),
    ("height", 2064, "height must be a multiple of 16 between 16 and 2048, got 2064"),
    ("width", 0, "width must be a multiple of 16 between 16 and 2048, got 0"),
    ("num_frames", 10, "num_frames must be of the form 4n+1 (1, 5, 9, ..., 81, ...) between 1 and 257, got 10"),
    ("num_frames", 261, "between 1 and 257, got 261"),
    ("num_inference_steps", 0, "num_inference_steps must be an integer between 1 and 200, got 0"),
    ("num_inference_steps", 2.5, "num_inference_steps must be an integer between 1 and 200, got 2.5"),
    ("guidance_scale", -1, "guidance_scale must be a number between 0 and 30, got -1"),
    ("guidance_scale", float("nan"), "guidance_scale must be a number between 0 and 30, got nan"),
    ("guidance_scale_2", 31, "guidance_scale_2 must be a number between 0 and 30, got 31"),
    ("shift", 0, "shift must be a number greater than 0 and at most 100, got 0"),
    ("seed", -1, "seed must be an integer between 0 and 2**63-1"),
    ("seed", True, "seed must be an integer between 0 and 2**63-1 (9223372036854775807), or null for a random "
                   "seed, got True"),
    ("sampler", "ddim", "sampler must be one of 'unipc', 'euler', 'dpm++', 'flowmatch-euler', got 'ddim'"),
    ("prompt", "", "prompt must be a non-blank string of at most 2000 characters, got ''"),
    ("prompt", "   ", "prompt must be a non-blank string of at most 2000 characters, got '   '"),
    ("prompt", "x" * 2001, "prompt must be a non-blank string of at most 2000 characters, got a string of 2001 "
                           "characters"),
])
def test_each_bad_field_names_itself_and_its_rule(field: str, value: object, message: str) -> None:
    request = {"prompt": "a cat", field: value}
    with pytest.raises(ValidationError) as info:  # the schema's bounds, or (num_frames 10) Wan's frame rule
        GenerationParams.model_validate(request).resolve(WAN_1_3B)
    (error,) = info.value.errors()
    assert error["loc"] == (field,)
    assert message in error["msg"]
    assert message in format_validation_error(info.value)


def test_unknown_field_is_refused_with_the_allowed_list() -> None:
    with pytest.raises(ValidationError) as info:
        GenerationParams(prompt="p", guidance=5.0)  # type: ignore[call-arg]
    (error,) = info.value.errors()
    assert error["loc"] == ("guidance",)
    assert error["msg"].startswith("unknown field 'guidance'; allowed fields are prompt, negative_prompt, height")


def test_missing_prompt_and_several_errors_give_one_line_each() -> None:
    with pytest.raises(ValidationError) as info:
        GenerationParams.model_validate({"height": 100, "steps": 3})
    lines = format_validation_error(info.value).splitlines()
    assert lines == [
        "prompt is required and must be a non-blank string of at most 2000 characters",
        "height must be a multiple of 16 between 16 and 2048, got 100",
        "unknown field 'steps'; allowed fields are " + ", ".join(FIELD_RULES),
    ]


def test_non_object_request_is_explained() -> None:
    with pytest.raises(ValidationError) as info:
        GenerationParams.model_validate(["a cat"])
    assert format_validation_error(info.value).startswith("the request must be an object with the fields prompt")


def test_every_field_is_documented_and_has_a_rule() -> None:
    fields = GenerationParams.model_fields
    assert set(FIELD_RULES) == set(fields)
    assert all(f.description for f in fields.values())
    schema = GenerationParams.model_json_schema()
    assert schema["additionalProperties"] is False
    assert schema["properties"]["height"]["anyOf"][0] == {"type": "integer", "minimum": 16, "maximum": 2048,
                                                          "multipleOf": 16}


# ---------------------------------------------------------------------------------------------
# Per-model rules: the same schema, narrowed by each model's description
# ---------------------------------------------------------------------------------------------
FLUX_DEV = flux_description(flux_preset("flux1-dev"))
FLUX_SCHNELL = flux_description(flux_preset("flux1-schnell"))


def _refused(params: GenerationParams, model: ModelDescription) -> dict[str, str]:
    """field -> message of every per-model error `resolve` raises."""
    with pytest.raises(ValidationError) as info:
        params.resolve(model)
    errors = info.value.errors()
    assert all(len(e["loc"]) == 1 for e in errors)
    return {str(e["loc"][0]): e["msg"] for e in errors}


def test_flux_dev_resolves_distilled_guidance_and_the_dynamic_shift() -> None:
    r = GenerationParams(prompt="a red circle", seed=1).resolve(FLUX_DEV)
    assert (r.height, r.width, r.num_frames, r.num_inference_steps, r.fps) == (1024, 1024, 1, 28, 1)
    assert (r.guidance, r.guidance_scale, r.guidance_scale_2, r.sampler) == ("distilled", 3.5, 3.5, "flowmatch-euler")
    assert r.shift == pytest.approx(math.exp(1.15)) and r.negative_prompt == "" and not r.guided
    given = GenerationParams(prompt="p", guidance_scale=2.0, shift=2.5, height=512, width=512).resolve(FLUX_DEV)
    assert (given.guidance_scale, given.shift, given.guided) == (2.0, 2.5, False)


def test_flux_schnell_resolves_unguided_with_shift_one() -> None:
    r = GenerationParams(prompt="p", negative_prompt="").resolve(FLUX_SCHNELL)
    assert (r.guidance, r.guidance_scale, r.num_inference_steps, r.shift, r.sampler) == (
        "none", 1.0, 4, 1.0, "flowmatch-euler")
    assert not r.guided and r.negative_prompt == ""


def test_flux_schnell_refuses_guidance_and_negative_prompts_naming_the_rule() -> None:
    errors = _refused(GenerationParams(prompt="p", guidance_scale=3.5, guidance_scale_2=2.0,
                                       negative_prompt="blurry"), FLUX_SCHNELL)
    assert errors == {
        "guidance_scale": "guidance_scale must be null: flux1-schnell takes no guidance scale (one forward per "
                          "step, no guidance input), got 3.5",
        "guidance_scale_2": "guidance_scale_2 must be null: flux1-schnell has a single expert, got 2.0",
        "negative_prompt": "negative_prompt must be null or empty: flux1-schnell runs no negative branch (its "
                           "guidance is 'none', not classifier-free), got 'blurry'",
    }


def test_flux_dev_refuses_frames_samplers_and_negative_prompts_naming_the_rule() -> None:
    errors = _refused(GenerationParams(prompt="p", num_frames=5, sampler="unipc", negative_prompt="blurry",
                                       guidance_scale_2=1.0), FLUX_DEV)
    assert errors["num_frames"] == "num_frames must be 1 (the model makes single images), got 5"
    assert errors["sampler"] == ("sampler must be one of 'flowmatch-euler' (the samplers of flux1-dev), or null "
                                 "for 'flowmatch-euler', got 'unipc'")
    assert errors["negative_prompt"].startswith("negative_prompt must be null or empty: flux1-dev runs no negative "
                                                "branch (its guidance is 'distilled'")
    assert errors["guidance_scale_2"] == "guidance_scale_2 must be null: flux1-dev has a single expert, got 1.0"
    assert "guidance_scale" not in errors  # dev takes its distilled scale
    with pytest.raises(ValidationError) as info:  # what the CLI prints
        GenerationParams(prompt="p", num_frames=5).resolve(FLUX_DEV)
    assert format_validation_error(info.value) == "num_frames must be 1 (the model makes single images), got 5"


def test_wan_refuses_other_families_samplers_and_frame_counts() -> None:
    errors = _refused(GenerationParams(prompt="p", sampler="flowmatch-euler", num_frames=6), WAN_1_3B)
    assert errors == {
        "sampler": "sampler must be one of 'unipc', 'dpm++', 'euler' (the samplers of wan2.1-t2v-1.3b), or null for "
                   "'unipc', got 'flowmatch-euler'",
        "num_frames": "num_frames must be of the form 4n+1 (1, 5, 9, ..., 81, ...) between 1 and 257, got 6",
    }
    r = GenerationParams(prompt="p", num_frames=1).resolve(WAN_1_3B)  # a one-frame video is still Wan's
    assert (r.guidance, r.num_frames, r.shift, r.guided) == ("cfg", 1, 5.0, True)
    assert not GenerationParams(prompt="p", guidance_scale=1.0).resolve(WAN_1_3B).guided  # one branch


@pytest.mark.parametrize("size", [(1024, 1024), (512, 768)])
def test_dynamic_shift_matches_diffusers_flux_pipeline(size: tuple[int, int]) -> None:
    """FluxPipeline: mu = calculate_shift(packed latent length, scheduler config), the scheduler shifts by exp(mu)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from stages.samplers import make_sampler

    height, width = size
    r = GenerationParams(prompt="p", height=height, width=width).resolve(FLUX_DEV)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    latent_h, latent_w = 2 * (height // 16), 2 * (width // 16)  # prepare_latents, vae_scale_factor 8
    seq_len = (latent_h // 2) * (latent_w // 2)  # _pack_latents: 2x2 patches
    cfg = sched.config
    mu = calculate_shift(seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    assert r.shift == math.exp(mu)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 28, 28), mu=mu)
    ours = make_sampler(r.sampler, r.num_inference_steps, r.shift)
    assert ours.sigmas.tolist() == pytest.approx(sched.sigmas.tolist(), abs=1e-6)


def test_stored_records_without_a_guidance_kind_still_load() -> None:
    old = GenerationParams(prompt="p", seed=3).resolve(WAN_1_3B).model_dump()
    del old["guidance"]
    restored = ResolvedParams.model_validate(old)
    assert restored.guidance == "cfg" and restored.guided
    assert ResolvedParams.model_validate({**old, "guidance": "distilled"}).guided is False


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["distilled", "none"])
def test_a_tiny_flux_folder_generates_with_its_resolved_params(kind: str,
                                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    """Pipeline.from_pretrained on a random tiny FLUX.1 release folder (dev- or schnell-style): a request with
    only a prompt and a seed resolves to the model's rules and runs to one 64x64 RGB image."""
    from models.flux.config import FLUX_TINY, FLUX_TINY_SCHNELL
    from models.flux.tiny import write_random_checkpoint
    from stages.pipeline import Pipeline

    dit = FLUX_TINY if kind == "distilled" else FLUX_TINY_SCHNELL
    root = write_random_checkpoint(tmp_path_factory.mktemp(f"flux-{kind}"), dit=dit, layout="diffusers")
    result = Pipeline.from_pretrained(root).generate({"prompt": "a red circle", "seed": 1})
    assert result.frames.shape == (1, 64, 64, 3) and result.frames.dtype == np.uint8
    r = result.params
    assert (r.guidance, r.sampler, r.num_frames, r.seed, r.negative_prompt, r.guided) == (
        kind, "flowmatch-euler", 1, 1, "", False)
    if kind == "distilled":  # flux-tiny: 4 steps, distilled 3.5, dynamic shift at 64x64 = 16 image tokens
        assert (r.num_inference_steps, r.guidance_scale) == (4, 3.5)
        assert r.shift == pytest.approx(math.exp(0.5 + (16 - 256) * 0.65 / 3840))
    else:  # flux-tiny-schnell: 2 steps, no guidance input, shift 1
        assert (r.num_inference_steps, r.guidance_scale, r.shift) == (2, 1.0, 1.0)
