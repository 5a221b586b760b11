"""Z-Image(-Turbo) end to end: our Pipeline vs diffusers' ZImagePipeline on the same tiny random release folder.

diffusers loads the folder `models.z_image.tiny` writes in its own way (so the writer and the release layout are
checked too): Qwen3ForCausalLM + Qwen2Tokenizer from the folder, the chat template with thinking on, the
second-to-last hidden state of the valid tokens, FlowMatchEulerDiscreteScheduler from scheduler/ (static shift 3,
sigmas linspace(1, 1/N, N) + [0], N forwards), the reversed time and negated output, guidance_scale 0 (one forward
per step, as Turbo is called), and AutoencoderKL's decode of latents / scaling_factor + shift_factor. Both start
from the same seeded latents.

Tolerances (measured on this folder, 8 steps at 64 x 64 and 48 x 80, |latents| up to 4.2):
- sigma schedule within 1.2e-7 (one float32 ulp at 1), measured 6e-8: stages/samplers.py evaluates the static shift
  in the exponential form s / (s + 1/sigma - 1) where diffusers' static path computes s sigma / (1 + (s - 1) sigma);
- latents within 5e-5, measured 1.1e-5 and 8e-6: almost all of it is that last-bit schedule difference, which moves
  t by 6e-5 and so the time embedding of this random tiny DiT;
- latents on the reference's own sigmas within 5e-6, measured 1e-6: the joint attention sums its keys in another
  order than the reference's [image, caption] sequence (tests/models/z_image/test_transformer.py);
- float pixels within 1e-4 (measured 4e-6); the written uint8 image within one 8-bit level.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.errors import CheckpointError
from models.flux.tiny import TINY_VAE
from models.registry import describe
from models.z_image.config import get_preset
from models.z_image.family import description
from models.z_image.tiny import write_random_checkpoint
from stages.cli import main
from stages.denoise import initial_noise
from stages.media import read_video
from stages.params import GenerationParams
from stages.pipeline import Pipeline

LATENT_ATOL = 5e-5
SAME_SCHEDULE_ATOL = 5e-6
PIXEL_ATOL = 1e-4
SIGMA_ATOL = 1.2e-7
PROMPT = "a red circle on the moon"
SIZE = 64
STEPS = 8


# Not FLUX.1's 0.3611 / 0.1159 (the VAE config's defaults): both decoders must read vae/config.json.
VAE = dataclasses.replace(TINY_VAE, scaling_factor=0.5, shift_factor=-0.25)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("z-image"), vae=VAE, seed=4)


@pytest.fixture(scope="module")
def ours(release: Path) -> Pipeline:
    return Pipeline.from_pretrained(release)


@pytest.fixture(scope="module")
def reference(release: Path):  # noqa: ANN201 - diffusers type
    diffusers = pytest.importorskip("diffusers")
    return diffusers.ZImagePipeline.from_pretrained(str(release), dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("height, width", [(SIZE, SIZE), (48, 80)])  # 4 x 4 and 3 x 5 tokens, both padded to 32
def test_pipeline_matches_diffusers_zimagepipeline(ours: Pipeline, reference,  # type: ignore[no-untyped-def]
                                                   height: int, width: int) -> None:
    assert ours.decode_stage.vae.config.scaling_factor == VAE.scaling_factor
    resolved = ours.resolve({"prompt": PROMPT, "seed": 3, "num_inference_steps": STEPS, "height": height,
                             "width": width})
    assert (resolved.height, resolved.width, resolved.num_frames) == (height, width, 1)
    assert resolved.sampler == "flowmatch-euler" and resolved.guidance == "none" and not resolved.guided
    result = ours.generate(resolved)
    noise = initial_noise(resolved, ours.model.latent)
    assert noise.shape == (16, height // 8, width // 8)

    common = dict(prompt=PROMPT, height=height, width=width, num_inference_steps=STEPS, guidance_scale=0.0,
                  max_sequence_length=ours.model.text_len)
    ref_latents = reference(**common, latents=noise[None].clone(), output_type="latent").images[0]
    err = (ref_latents - result.latents).abs().max().item()
    assert (ref_latents - noise).abs().max() > 0.5  # the steps move the latents far more than the tolerance
    assert err < LATENT_ATOL, f"latents differ by {err:.2e} (|latents| max {ref_latents.abs().max():.2f})"

    # The same run on the reference's own sigmas: what remains is the DiT's key order alone.
    scheduler = reference.scheduler  # as the call above left it: this request's schedule
    job = ours.denoise_stage.start(resolved, ours.text_stage.run([(PROMPT, None)])[0])
    job.sampler.sigmas, job.sampler.timesteps = scheduler.sigmas.clone(), scheduler.timesteps.clone()
    same_schedule = ours.denoise_stage.run_steps(job).latents
    err = (ref_latents - same_schedule).abs().max().item()
    assert err < SAME_SCHEDULE_ATOL, f"latents on the reference's sigmas differ by {err:.2e}"

    ref_image = reference(**common, latents=noise[None].clone(), output_type="np").images[0]  # (H, W, 3) in [0, 1]
    ours_image = (ours.decode_stage.vae.decode(result.latents[None])[0].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1)
    pixel_err = np.abs(ref_image - ours_image.numpy()).max()
    assert pixel_err < PIXEL_ATOL, f"pixels differ by {pixel_err:.2e}"
    assert result.frames.shape == (1, height, width, 3) and result.frames.dtype == np.uint8
    assert np.abs(result.frames[0].astype(np.int16) - np.round(ref_image * 255)).max() <= 1


@pytest.mark.parametrize("steps", [1, 2, STEPS, 9])
def test_sigma_schedule_matches_the_reference(ours: Pipeline, reference,  # type: ignore[no-untyped-def]
                                              steps: int) -> None:
    """N forwards on shift(linspace(1, 1/N, N)) + [0]; the model's time is (1000 - t) / 1000 of the same t."""
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

    scheduler = reference.scheduler
    scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(steps), device="cpu", mu=1.0)  # mu: unused (static)
    resolved = ours.resolve({"prompt": PROMPT, "num_inference_steps": steps})
    sampler = ours.denoise_stage.start(resolved, ours.text_stage.run([(PROMPT, None)])[0]).sampler
    assert sampler.sigmas.shape == scheduler.sigmas.shape == (steps + 1,) and sampler.sigmas[-1] == 0
    torch.testing.assert_close(sampler.sigmas, scheduler.sigmas, atol=SIGMA_ATOL, rtol=0)
    torch.testing.assert_close(sampler.timesteps, scheduler.timesteps, atol=1000 * SIGMA_ATOL, rtol=0)
    if steps == STEPS:  # the release's 8 steps
        expected = [1, 0.954545, 0.9, 0.833333, 0.75, 0.642857, 0.5, 0.3, 0]
        torch.testing.assert_close(sampler.sigmas, torch.tensor(expected), atol=1e-6, rtol=0)


def test_text_stage_equals_encode_prompt(ours: Pipeline, reference) -> None:  # type: ignore[no-untyped-def]
    """Exact: the same transformers modules on the same ids and mask (see tests/models/test_qwen3_text.py)."""
    (embeddings,) = ours.text_stage.run([(PROMPT, None)])
    assert embeddings.negative is None
    theirs, _ = reference.encode_prompt([PROMPT], device=torch.device("cpu"), do_classifier_free_guidance=False,
                                        max_sequence_length=ours.model.text_len)
    assert embeddings.positive.mask is None and torch.equal(embeddings.positive.context, theirs[0])


def test_description_of_the_folder_and_of_turbo(release: Path) -> None:
    model = describe(release)
    assert (model.family, model.name, model.output, model.guidance) == ("z-image", "z-image-tiny", "image", "none")
    assert not model.takes_guidance_scale and not model.takes_negative_prompt and not model.guided_by_default
    assert model.text_len == 32 and model.num_blocks == 2 and model.num_heads == 1
    assert model.teacache["default"].signal == "modulated_input" and model.teacache["default"].coefficients is None
    assert {k: v.name for k, v in model.components.items()} == {
        "transformer": "transformer", "text_encoder": "text_encoder", "tokenizer": "tokenizer", "vae": "vae"}
    turbo = description(get_preset("z-image-turbo"))
    assert (turbo.name, turbo.num_heads, turbo.num_blocks, turbo.text_len) == ("z-image-turbo", 30, 32, 512)
    d = turbo.defaults
    assert (d.height, d.width, d.num_inference_steps, d.guidance_scale, d.sampler) == (
        1024, 1024, 8, None, "flowmatch-euler")
    assert turbo.shift_for(1, 1024, 1024, 8) == 3.0 and turbo.shift_for(1, 512, 768, 30) == 3.0  # static
    assert turbo.latent.tokens(1, 1024, 1024) == 4096


def test_requests_follow_turbo_rules(ours: Pipeline) -> None:
    with pytest.raises(ValueError, match="guidance_scale"):
        GenerationParams.model_validate({"prompt": PROMPT, "guidance_scale": 3.0}).resolve(ours.model)
    with pytest.raises(ValueError, match="num_frames"):
        GenerationParams.model_validate({"prompt": PROMPT, "num_frames": 5}).resolve(ours.model)


def test_broken_folders_say_what_is_wrong(release: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(release, root)
    shutil.rmtree(root / "tokenizer")
    with pytest.raises(CheckpointError, match="missing tokenizer/"):
        describe(root)
    shutil.copytree(release / "tokenizer", root / "tokenizer")
    config = root / "text_encoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "hidden_size": 24}))
    with pytest.raises(CheckpointError, match="hidden_size 24 is not the DiT's cap_feat_dim 16"):
        describe(root)


@pytest.mark.slow
def test_both_text_encoder_layouts_generate_the_same_image(tmp_path: Path) -> None:
    """A Qwen3Model-saved text encoder (no `model.` prefix, no lm_head) is the same encoder."""
    params = {"prompt": PROMPT, "num_inference_steps": 2, "seed": 5}
    a = Pipeline.from_pretrained(write_random_checkpoint(tmp_path / "causal", seed=9)).generate(params)
    b = Pipeline.from_pretrained(write_random_checkpoint(tmp_path / "plain", seed=9, causal_lm=False)).generate(params)
    assert torch.equal(a.latents, b.latents) and np.array_equal(a.frames, b.frames)


def test_cli_writes_a_png(release: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    out = tmp_path / "image"
    assert main(["generate", "--model", str(release), "--prompt", PROMPT, "--steps", "2", "--seed", "1",
                 "--out", str(out), "-q"]) == 0
    assert read_video(out.with_suffix(".png")).shape == (1, SIZE, SIZE, 3)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["preset"] == "z-image-tiny" and record["params"]["sampler"] == "flowmatch-euler"


@pytest.mark.slow
def test_cli_two_local_ranks_ring_give_the_single_rank_image(release: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """--world-size 2 --ring-degree 2: the padded image stream over two gloo ranks (caption replicated) and the
    strip-parallel FLUX.1-architecture VAE decode; fp32 sums in another order can flip a rounding."""
    monkeypatch.setenv("HOME", str(tmp_path))
    args = ["generate", "--model", str(release), "--prompt", PROMPT, "--height", "48", "--width", "80", "--steps",
            "2", "--seed", "6", "-q"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--out", str(tmp_path / "two"), "--world-size", "2", "--ring-degree", "2"]) == 0
    one, two = (read_video(tmp_path / f"{n}.png").astype(np.int16) for n in ("one", "two"))
    assert one.shape == two.shape == (1, 48, 80, 3)
    assert np.abs(one - two).max() <= 1 and (one == two).mean() > 0.99
    assert json.loads((tmp_path / "two.json").read_text())["parallel_layout"] == "ring2"


IDENTITY = [1.0, 0.0]  # TeaCache polynomial P(x) = x: no polynomial is published for Z-Image
# kind -> (off setting, reusing setting, the counter that must show reuse), on 8 steps of the tiny model
CACHE_KINDS = {
    "dbcache": ({"kind": "dbcache", "threshold": 0.0, "first_blocks": 1, "last_blocks": 0, "warmup_steps": 1},
                {"kind": "dbcache", "threshold": 1.0, "first_blocks": 1, "last_blocks": 0, "warmup_steps": 1},
                "forwards_reused"),
    "teacache": ({"kind": "teacache", "threshold": 0.0, "coefficients": IDENTITY},
                 {"kind": "teacache", "threshold": 5.0, "coefficients": IDENTITY}, "forwards_reused"),
    "magcache": ({"kind": "magcache", "threshold": 0.0, "ratios": [[1.0] * STEPS]},
                 {"kind": "magcache", "threshold": 1.0, "retention_ratio": 0.25, "ratios": [[0.95] * STEPS]},
                 "forwards_reused"),
    "meancache": ({"kind": "meancache", "fresh_steps": STEPS}, {"kind": "meancache", "fresh_steps": 4},
                  "forwards_reused"),
    "blockdance": ({"kind": "blockdance", "boundary_block": 0, "group_size": 1},
                   {"kind": "blockdance", "boundary_block": 0, "warmup": 0, "cooldown": 0}, "forwards_reused"),
    "pab": ({"kind": "pab", "self_range": 1, "cross_range": 1}, {"kind": "pab", "warmup": 2, "cooldown": 1},
            "attention_reused"),
    "taylorseer": ({"kind": "taylorseer", "interval": 1}, {"kind": "taylorseer", "interval": 3, "warmup_steps": 2},
                   "forwards_reused"),
}


@pytest.fixture(scope="module")
def uncached(ours: Pipeline):  # noqa: ANN201
    params = {"prompt": PROMPT, "seed": 2, "num_inference_steps": STEPS}
    return params, ours.generate(params)


@pytest.mark.parametrize("kind", list(CACHE_KINDS))
def test_every_cache_kind_off_is_full_compute_and_on_reuses(ours: Pipeline, uncached,  # noqa: ANN001
                                                            kind: str) -> None:
    """The block protocol as the caches see it: the noise refiner (image self-attention) and the main layers
    (joint attention) are the blocks; the context refiner is part of begin and always runs."""
    params, full = uncached
    off_spec, on_spec, counter = CACHE_KINDS[kind]
    off = ours.generate(params | {"cache": off_spec})
    assert torch.equal(off.latents, full.latents) and off.cache[counter] == 0
    on = ours.generate(params | {"cache": on_spec})
    assert on.cache[counter] > 0, on.cache
    if counter == "forwards_reused":
        assert on.cache["forwards_computed"] + on.cache["forwards_reused"] == STEPS
    assert not torch.equal(on.latents, full.latents)


LONG_PROMPT = "a blue square under the sky, a red circle on the moon, a cat under the blue sky, a red cat on the moon"


def _cfg_pipeline(root: Path, scale: float) -> Pipeline:
    """Z-Image with true CFG as the non-distilled base runs it (cfg_form "cond": v_c + g (v_c - v_u)), on the tiny
    folder with 64 text tokens, so that the prompt (> 32 tokens) and the empty negative prompt pad to different
    lengths (64 and 32) in the one batched forward of both branches."""
    from stages.decode import DecodeStage
    from stages.denoise import DenoiseStage
    from stages.text_encode import TextEncodeStage

    model = describe(root)
    model = dataclasses.replace(model, name="z-image-tiny-cfg", guidance="cfg", cfg_form="cond", text_len=64,
                                defaults=dataclasses.replace(model.defaults, guidance_scale=scale))
    return Pipeline(TextEncodeStage.from_pretrained(model), DenoiseStage.from_pretrained(model),
                    DecodeStage.from_pretrained(model), model)


@pytest.mark.slow
def test_true_cfg_matches_diffusers(release: Path, reference) -> None:  # type: ignore[no-untyped-def]
    """The base model's guidance vs ZImagePipeline(guidance_scale=2.5): negative prompt "", pred = pos + g (pos -
    neg), one batched forward of both branches whose captions pad to 64 and 32. Same tolerance as Turbo's run
    (measured 2.9e-6 over 4 steps)."""
    pipe = _cfg_pipeline(release, 2.5)
    (embeddings,) = pipe.text_stage.run([(LONG_PROMPT, "")])
    assert len(embeddings.positive.context) > 32 >= len(embeddings.negative.context)
    resolved = pipe.resolve({"prompt": LONG_PROMPT, "seed": 3, "num_inference_steps": 4})
    assert resolved.guided and resolved.negative_prompt == ""
    result = pipe.generate(resolved)
    noise = initial_noise(resolved, pipe.model.latent)
    theirs = reference(prompt=LONG_PROMPT, height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=2.5,
                       max_sequence_length=64, latents=noise[None].clone(), output_type="latent").images[0]
    unguided = pipe.generate(resolved.model_copy(update={"guidance_scale": 0.0})).latents  # v_c alone
    assert (theirs - unguided).abs().max() > 0.1  # the guidance matters far more than the tolerance
    err = (theirs - result.latents).abs().max().item()
    assert err < LATENT_ATOL, f"CFG latents differ by {err:.2e}"


def test_true_cfg_scale_one_runs_both_branches_in_the_cond_form(release: Path,  # type: ignore[no-untyped-def]
                                                                reference) -> None:
    pipe = _cfg_pipeline(release, 1.0)
    resolved = pipe.resolve({"prompt": LONG_PROMPT, "seed": 3, "num_inference_steps": 2})
    result = pipe.generate(resolved)
    theirs = reference(prompt=LONG_PROMPT, height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=1.0,
                       max_sequence_length=64, latents=initial_noise(resolved, pipe.model.latent)[None].clone(),
                       output_type="latent").images[0]
    assert (theirs - result.latents).abs().max().item() < LATENT_ATOL
