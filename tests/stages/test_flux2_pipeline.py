"""FLUX.2-klein end to end: our Pipeline vs diffusers' Flux2KleinPipeline on the same tiny random release folder.

diffusers loads the folder we write in its own layout (so the writer and the diffusers layout are checked too),
encodes the prompt with Qwen3 its own way (hidden states 9/18/27, all padded rows), draws nothing (both start
from the same (128, H/16, W/16) latents), runs FlowMatchEulerDiscreteScheduler with the empirical mu of the image
size and step count, and denormalises (BatchNorm statistics, 2x2 unpatchify) and decodes with
AutoencoderKLFlux2. Tolerances: the step-distilled run is bit-identical (measured max |diff| 0 on the final
latents, the float pixels and the sigmas; asserted 2e-5 and 1e-4 in case another CPU picks other kernels); the
base (CFG) run batches both branches into one forward where diffusers runs two, which rounds differently, and
g = 4 amplifies that 7-fold in g (v_c - v_u) (measured max |diff| 6.4e-6 on latents of |x| <= 4.8, 2.7e-6 on
pixels; asserted 5e-5 on both); sigmas within 1e-6 (numpy vs torch float32 math; measured 0).
Also here: the family's recognition, description and errors, both release layouts, and the CLI's png.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.errors import CheckpointError
from models.family import EmpiricalShift
from models.flux2 import family
from models.flux2.config import get_preset
from models.flux2.tiny import write_random_checkpoint
from models.registry import describe
from stages.denoise import initial_noise
from stages.pipeline import Pipeline
from stages.samplers import make_sampler

LATENT_ATOL = 2e-5
PIXEL_ATOL = 1e-4
SIGMA_ATOL = 1e-6
CFG_ATOL = 5e-5
PROMPT = "a red circle on the moon"
SIZE = 64


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("klein"), seed=4)


def _copy_with_index(release: Path, root: Path, **index: Any) -> Path:
    """A copy of the release folder with model_index.json entries replaced."""
    import shutil

    shutil.copytree(release, root)
    path = root / "model_index.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **index}))
    return root


def _reference_run(root: Path, resolved: Any, noise: torch.Tensor, text_len: int
                   ) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """diffusers on the same folder and noise: (final DiT latents (128, h, w), image (H, W, 3) in [0, 1], sigmas)."""
    from diffusers import Flux2KleinPipeline

    reference = Flux2KleinPipeline.from_pretrained(str(root), dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    seen: list[torch.Tensor] = []

    def record(pipe: Any, step: int, t: Any, kwargs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seen.append(kwargs["latents"].clone())
        return kwargs

    image = reference(prompt=resolved.prompt, height=resolved.height, width=resolved.width,
                      num_inference_steps=resolved.num_inference_steps,
                      guidance_scale=resolved.guidance_scale if resolved.guided else 1.0,
                      max_sequence_length=text_len, latents=noise[None].clone(), output_type="np",
                      callback_on_step_end=record).images[0]
    assert len(seen) == resolved.num_inference_steps
    c, h, w = noise.shape
    final = seen[-1][0].transpose(0, 1).reshape(c, h, w)  # packed (h*w, C) tokens, row-major -> (C, h, w)
    return final, image, reference.scheduler.sigmas.clone()


def _compare(root: Path, params: dict[str, Any], latent_atol: float, pixel_atol: float) -> Any:
    ours = Pipeline.from_pretrained(root)
    resolved = ours.resolve(params)
    result = ours.generate(resolved)
    noise = initial_noise(resolved, ours.model.latent)
    assert noise.shape == (128, resolved.height // 16, resolved.width // 16)
    ref_latents, ref_image, ref_sigmas = _reference_run(root, resolved, noise, ours.model.text_len)

    sigmas = make_sampler(resolved.sampler, resolved.num_inference_steps, resolved.shift).sigmas
    torch.testing.assert_close(sigmas, ref_sigmas.to(sigmas.dtype), atol=SIGMA_ATOL, rtol=0)
    err = (ref_latents - result.latents).abs().max().item()
    assert err <= latent_atol, f"latents differ by {err:.2e} (|latents| max {ref_latents.abs().max():.2f})"
    with torch.no_grad():
        pixels = ours.decode_stage.vae.decode(result.latents[None])[0]
    ours_image = (pixels.permute(1, 2, 0) / 2 + 0.5).clamp(0, 1).numpy()
    pixel_err = np.abs(ref_image - ours_image).max()
    assert pixel_err <= pixel_atol, f"pixels differ by {pixel_err:.2e}"
    assert result.frames.shape == (1, resolved.height, resolved.width, 3) and result.frames.dtype == np.uint8
    assert np.abs(result.frames[0].astype(np.int16) - np.round(ref_image * 255)).max() <= 1
    return resolved


@pytest.mark.slow
def test_pipeline_matches_diffusers_flux2_klein(release: Path) -> None:
    pytest.importorskip("diffusers")
    resolved = _compare(release, {"prompt": PROMPT, "seed": 3}, LATENT_ATOL, PIXEL_ATOL)
    assert (resolved.height, resolved.width, resolved.num_inference_steps) == (SIZE, SIZE, 4)
    assert resolved.sampler == "flowmatch-euler" and resolved.guidance == "none" and not resolved.guided
    # The empirical shift of 16 image tokens and 4 steps, as the pipeline's compute_empirical_mu gives it.
    assert resolved.shift == pytest.approx(math.exp(EmpiricalShift().mu(16, 4)), rel=1e-12)


@pytest.mark.slow
def test_base_klein_runs_true_cfg_like_diffusers(tmp_path: Path, release: Path) -> None:
    """A non-distilled folder (model_index.json's is_distilled false): two branches per step (the empty prompt as
    the negative one), g = 4, at 2 steps and 48 x 64 pixels."""
    pytest.importorskip("diffusers")
    root = _copy_with_index(release, tmp_path / "base", is_distilled=False)
    resolved = _compare(root, {"prompt": PROMPT, "seed": 2, "num_inference_steps": 2, "height": 48},
                        CFG_ATOL, CFG_ATOL)
    assert resolved.guidance == "cfg" and resolved.guided and resolved.guidance_scale == 4.0
    assert resolved.negative_prompt == ""


def test_registry_describes_the_tiny_release(release: Path) -> None:
    model = describe(release)
    assert (model.family, model.name, model.output, model.guidance) == ("flux2", "flux2-tiny", "image", "none")
    assert model.text_len == 32 and model.num_blocks == 4 and model.num_heads == 2 and model.max_frames == 1
    assert model.latent.channels == 128 and model.latent.spatial_stride == 16
    assert model.defaults.sampler == "flowmatch-euler" and isinstance(model.defaults.shift, EmpiricalShift)
    assert not model.takes_guidance_scale and not model.takes_negative_prompt
    assert model.components["vae"] == release / "vae" and model.components["transformer"] == release / "transformer"
    assert family.recognises(release)


def test_released_klein_description() -> None:
    """klein-4B at its defaults: 1024 x 1024, 4 steps, sigma = [1, 0.967384, 0.908144, 0.7672, 0] (mu 2.29118 for
    4096 tokens at 4 steps)."""
    model = family.description(get_preset("flux2-klein-4b"))
    assert (model.guidance, model.text_len, model.num_blocks, model.num_heads) == ("none", 512, 25, 24)
    d = model.defaults
    assert (d.height, d.width, d.num_inference_steps, d.guidance_scale, d.sampler) == (1024, 1024, 4, None,
                                                                                     "flowmatch-euler")
    shift = model.shift_for(1, 1024, 1024, 4)
    assert math.log(shift) == pytest.approx(2.29118, abs=1e-5)
    sigmas = make_sampler("flowmatch-euler", 4, shift).sigmas
    torch.testing.assert_close(sigmas, torch.tensor([1, 0.967384, 0.908144, 0.7672, 0]), atol=1e-6, rtol=0)
    base = family.description(get_preset("flux2-klein-4b"), distilled=False)
    assert (base.name, base.guidance, base.defaults.num_inference_steps, base.defaults.guidance_scale) == (
        "flux2-klein-4b-base", "cfg", 50, 4.0)


def test_both_release_layouts_load_the_same_model(tmp_path: Path, release: Path) -> None:
    from models.flux2.transformer import Flux2Transformer
    from models.flux2.vae import Flux2VAE

    orig = write_random_checkpoint(tmp_path / "orig", layout="original", seed=4)  # the release's seed
    diff = release
    assert not (orig / "model_index.json").exists() and family.recognises(orig)
    a, b = describe(orig), describe(diff)
    assert (a.family, a.name, a.guidance) == (b.family, b.name, b.guidance) == ("flux2", "flux2-tiny", "none")
    assert a.components["vae"] == orig / "flux2-vae.safetensors" and a.components["transformer"].parent == orig
    for cls, key in ((Flux2Transformer, "transformer"), (Flux2VAE, "vae")):
        sa = cls.from_pretrained(a.components[key]).state_dict()
        sb = cls.from_pretrained(b.components[key]).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), cls.__name__


def test_recognition_and_errors_name_what_is_missing(tmp_path: Path, release: Path) -> None:
    import shutil

    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert not family.recognises(other) and not family.recognises(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(release, broken)
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(CheckpointError, match=r"text encoder is missing: tokenizer/"):
        family.describe(broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError, match="no FLUX.2 VAE"):
        family.describe(broken)
    odd = _copy_with_index(release, tmp_path / "odd", is_distilled="yes")
    with pytest.raises(CheckpointError, match="is_distilled must be true or false"):
        family.describe(odd)


@pytest.mark.slow
def test_cli_writes_a_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, release: Path) -> None:
    from stages.cli import main
    from stages.media import read_video

    monkeypatch.setenv("HOME", str(tmp_path))
    out = tmp_path / "image"
    assert main(["generate", "--model", str(release), "--prompt", PROMPT, "--steps", "1", "--seed", "1",
                 "--out", str(out), "-q"]) == 0
    assert read_video(out.with_suffix(".png")).shape == (1, SIZE, SIZE, 3)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["preset"] == "flux2-tiny" and record["params"]["sampler"] == "flowmatch-euler"


@pytest.mark.slow
def test_cli_two_local_ranks_ring_give_the_single_rank_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             release: Path) -> None:
    """--world-size 2 --ring-degree 2: the joint sequence over two gloo ranks and the strip-parallel FLUX.2 VAE
    decode (BatchNorm statistics, patch unfold, image-wide GroupNorm sums); fp32 sums in another order can flip a
    rounding (measured: the same png)."""
    from stages.cli import main
    from stages.media import read_video

    monkeypatch.setenv("HOME", str(tmp_path))
    args = ["generate", "--model", str(release), "--prompt", PROMPT, "--height", "48", "--width", "64", "--steps",
            "2", "--seed", "6", "-q"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--out", str(tmp_path / "two"), "--world-size", "2", "--ring-degree", "2"]) == 0
    one, two = (read_video(tmp_path / f"{n}.png").astype(np.int16) for n in ("one", "two"))
    assert one.shape == two.shape == (1, 48, 64, 3)
    assert np.abs(one - two).max() <= 1 and (one == two).mean() > 0.99
    assert json.loads((tmp_path / "two.json").read_text())["parallel_layout"] == "ring2"


def test_describing_a_folder_imports_no_torch(release: Path) -> None:
    import subprocess
    import sys

    code = (f"import sys; from models.registry import describe; m = describe({str(release)!r}); "
            f"assert m.family == 'flux2', m.family; "
            f"assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
