"""Qwen-Image end to end: our Pipeline vs diffusers' QwenImagePipeline on the same tiny random release folder.

diffusers loads the folder we write in its own layout (so the writer and the release layout are checked too):
it encodes prompt and negative prompt with Qwen2.5-VL its own way, runs true CFG with its per-token renorm,
FlowMatchEulerDiscreteScheduler from the folder's scheduler_config.json (dynamic shift from the image size,
terminal sigma 0.02) and decodes with AutoencoderKLQwenImage; both start from the same latents.
Tolerances: measured max |latents| diff 3.3e-6 (|latents| up to 4.6) and decoded pixels 1.3e-6, within one level
on the uint8 image (a rounding tie); asserted 2e-5 on latents, 1e-4 on float pixels, 1 level on the uint8 image. The latents
differ at all only because we encode prompt and negative prompt in one padded batch and run both DiT branches as
one masked batch, where diffusers runs each alone.
Also here: the sigma schedule from the description vs the release scheduler config, the description read from a
folder (torch-free), the CLI writing a png, and CFG parallelism over two local ranks giving the one-rank image.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.errors import CheckpointError
from models.registry import describe
from stages.cli import main
from stages.denoise import initial_noise
from stages.media import read_video
from stages.pipeline import Pipeline
from stages.samplers import make_sampler

diffusers = pytest.importorskip("diffusers")

LATENT_ATOL = 2e-5
PIXEL_ATOL = 1e-4
SIGMA_ATOL = 1e-6  # the same float32 numpy operations as the scheduler: measured 0
PROMPT, NEGATIVE = "a red circle on the moon", "w1 w2 blue square"
SIZE = 64
STEPS = 3


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.qwen_image.tiny import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("qwen-image"), seed=4)


@pytest.mark.slow
def test_pipeline_matches_diffusers_qwenimagepipeline(release: Path) -> None:
    from diffusers import QwenImagePipeline

    ours = Pipeline.from_pretrained(release)
    resolved = ours.resolve({"prompt": PROMPT, "negative_prompt": NEGATIVE, "num_inference_steps": STEPS,
                             "seed": 3})
    assert (resolved.height, resolved.width, resolved.num_frames) == (SIZE, SIZE, 1)
    assert resolved.sampler == "flowmatch-euler" and resolved.guided and resolved.guidance_scale == 4.0
    noise = initial_noise(resolved, ours.model.latent)
    channels = noise.shape[0]
    assert noise.shape == (channels, SIZE // 8, SIZE // 8)
    result = ours.generate(resolved, latents=noise)

    reference = QwenImagePipeline.from_pretrained(str(release), dtype=torch.float32)
    packed = QwenImagePipeline._pack_latents(noise[None], 1, channels, SIZE // 8, SIZE // 8)
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=resolved.guidance_scale, height=SIZE,
                  width=SIZE, num_inference_steps=STEPS, max_sequence_length=ours.model.text_len)
    out = reference(**common, latents=packed.clone(), output_type="latent").images
    ref_latents = QwenImagePipeline._unpack_latents(out, SIZE, SIZE, 8)[0, :, 0]
    err = (ref_latents - result.latents).abs().max().item()
    assert err < LATENT_ATOL, f"latents differ by {err:.2e} (|latents| max {ref_latents.abs().max():.2f})"
    assert (result.latents - noise).abs().max() > 0.5  # the steps moved the latents: the check can fail

    ref_image = reference(**common, latents=packed.clone(), output_type="np").images[0]  # (H, W, 3) in [0, 1]
    ours_image = (ours.decode_stage.vae.decode(result.latents[None])[0].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1)
    pixel_err = np.abs(ref_image - ours_image.numpy()).max()
    assert pixel_err < PIXEL_ATOL, f"pixels differ by {pixel_err:.2e}"
    assert result.frames.shape == (1, SIZE, SIZE, 3) and result.frames.dtype == np.uint8
    assert np.abs(result.frames[0].astype(np.int16) - np.round(ref_image * 255)).max() <= 1


@pytest.mark.parametrize("size, steps", [((64, 64), 2), ((1024, 1024), 50), ((1328, 1328), 50), ((928, 1664), 20)])
def test_sigmas_follow_the_release_scheduler_config(release: Path, size: tuple[int, int], steps: int) -> None:
    """The description's shift rule and terminal sigma give the schedule the pipeline builds from the folder's
    scheduler_config.json (its calculate_shift, then set_timesteps)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    model = describe(release)
    height, width = size
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(release / "scheduler")
    config = scheduler.config
    tokens = (height // 16) * (width // 16)
    mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = make_sampler(model.defaults.sampler, steps, model.shift_for(1, height, width, steps),
                        shift_terminal=model.shift_terminal)
    torch.testing.assert_close(ours.sigmas, scheduler.sigmas, rtol=0, atol=SIGMA_ATOL)
    torch.testing.assert_close(ours.timesteps, scheduler.timesteps, rtol=0, atol=SIGMA_ATOL * 1000)
    assert float(ours.sigmas[-2]) == pytest.approx(0.02, abs=1e-6) and float(ours.sigmas[-1]) == 0.0


def test_a_release_folder_is_described_torch_free(release: Path) -> None:
    from models.qwen_image.config import PRESETS
    from models.qwen_image.family import description

    code = ("import sys; from models.registry import describe; m = describe(sys.argv[1]); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; print(m.family, m.name)")
    run = subprocess.run([sys.executable, "-c", code, str(release)], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0 and run.stdout.split() == ["qwen-image", "qwen-image-tiny"], run.stderr
    model = describe(release)
    assert (model.family, model.name, model.output, model.guidance) == ("qwen-image", "qwen-image-tiny", "image",
                                                                        "cfg")
    assert model.cfg_renorm and model.cfg_form == "uncond" and model.shift_terminal == 0.02
    assert model.negative_prompt == " " and model.takes_negative_prompt and model.guided_by_default
    assert model.latent.latent_shape(1, SIZE, SIZE) == (4, 8, 8) and model.num_blocks == 2 and model.num_heads == 4
    assert set(model.components) == {"transformer", "vae", "text_encoder", "tokenizer"}
    release_model = description(PRESETS["qwen-image"])
    defaults = release_model.defaults
    assert (defaults.height, defaults.width, defaults.num_inference_steps, defaults.guidance_scale) == (
        1328, 1328, 50, 4.0)
    assert release_model.text_len == 512 and release_model.num_blocks == 60 and release_model.num_heads == 24
    assert release_model.latent.tokens(1, 1328, 1328) == 6889
    assert release_model.teacache["default"].signal == "modulated_input"
    assert release_model.teacache["default"].coefficients is None  # none published for Qwen-Image
    # An empty negative prompt means the release's " ".
    from stages.params import GenerationParams

    assert GenerationParams(prompt="p").resolve(model).negative_prompt == " "


def test_a_broken_folder_says_what_is_missing(release: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(release, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError, match=r"lacks vae/"):
        describe(broken)
    (broken / "vae").mkdir()
    (broken / "transformer" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(CheckpointError, match="is not QwenImageTransformer2DModel"):
        describe(broken)


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


@pytest.mark.slow
def test_cli_writes_a_png(home: Path, release: Path) -> None:
    out = home / "image"
    assert main(["generate", "--model", str(release), "--prompt", PROMPT, "--steps", "2", "--seed", "1",
                 "--out", str(out), "-q"]) == 0
    image = read_video(out.with_suffix(".png"))
    assert image.shape == (1, SIZE, SIZE, 3)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["params"]["sampler"] == "flowmatch-euler" and record["frames"] == 1
    assert record["params"]["negative_prompt"] == " " and record["preset"] == "qwen-image-tiny"


@pytest.mark.slow
def test_cli_cfg_parallel_gives_the_single_rank_image(home: Path, release: Path) -> None:
    """--world-size 2 --cfg-degree 2: each rank runs one guidance branch; the strip-parallel VAE decode."""
    args = ["generate", "--model", str(release), "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--height", "48",
            "--width", "80", "--steps", "2", "--seed", "6", "-q"]
    assert main([*args, "--out", str(home / "one")]) == 0
    assert main([*args, "--out", str(home / "two"), "--world-size", "2", "--cfg-degree", "2"]) == 0
    one, two = (read_video(home / f"{n}.png").astype(np.int16) for n in ("one", "two"))
    assert one.shape == two.shape == (1, 48, 80, 3)
    assert np.abs(one - two).max() <= 1 and (one == two).mean() > 0.99
    assert json.loads((home / "two.json").read_text())["parallel_layout"] == "cfg2"


@pytest.mark.slow
def test_feature_caches_run_on_qwen_image(release: Path) -> None:
    """A cache at threshold 0 changes nothing; TeaCache (on the modulated-input signal, with request coefficients)
    and FBCache at a high threshold reuse steps; TeaCache without coefficients is refused naming them."""
    ours = Pipeline.from_pretrained(release)
    params = {"prompt": PROMPT, "num_inference_steps": 4, "seed": 2}
    full = ours.generate(params)
    for cache in ({"kind": "fbcache", "threshold": 0.0},
                  {"kind": "teacache", "threshold": 0.0, "coefficients": [1.0, 0.0]}):
        again = ours.generate({**params, "cache": cache})
        assert torch.equal(again.latents, full.latents), cache
    for cache in ({"kind": "fbcache", "threshold": 1.0},
                  {"kind": "teacache", "threshold": 1.0, "coefficients": [1.0, 0.0]}):
        reused = ours.generate({**params, "cache": cache})
        assert reused.cache is not None and reused.cache["forwards_reused"] > 0, cache
    with pytest.raises(ValueError, match="coefficients"):
        ours.generate({**params, "cache": {"kind": "teacache", "threshold": 0.1}})
