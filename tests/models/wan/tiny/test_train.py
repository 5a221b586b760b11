"""The training recipe: its VAE helpers are the inference math, and a tiny run writes a loadable checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from models.random_init import randomize_parameters
from models.wan.checkpoint import WanCheckpoint
from models.wan.config import WanVAEConfig
from models.wan.tiny import shapes
from models.wan.tiny.train import TrainConfig, normalise_vae, train, vae_decode_raw, vae_posterior_mean
from models.wan.vae import WanVAE


def _clips(count: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    specs = shapes.all_specs()
    videos = [shapes.sample_video(specs[int(rng.integers(90))], rng, num_frames=5, height=16, width=16)
              for _ in range(count)]
    return shapes.to_model_video(np.stack(videos))


@torch.no_grad()
def test_training_twins_of_encode_and_decode_are_the_inference_math() -> None:
    vae = randomize_parameters(WanVAE(WanVAEConfig(base_dim=8, num_res_blocks=1)), seed=0).eval()
    video = _clips(1)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    mu = vae_posterior_mean(vae, video)
    torch.testing.assert_close((mu - mean) / std, vae.encode(video), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vae_decode_raw(vae, mu).clamp(-1, 1), vae.decode(vae.encode(video)), atol=1e-4,
                               rtol=1e-4)


@torch.no_grad()
def test_normalisation_is_exact_and_gives_unit_latents() -> None:
    vae = randomize_parameters(WanVAE(WanVAEConfig(base_dim=8, num_res_blocks=1)), seed=1).eval()
    video = _clips(6, seed=1)
    before = vae.decode(vae.encode(video))
    normalise_vae(vae, video)
    latents = vae.encode(video)
    torch.testing.assert_close(latents.mean(dim=(0, 2, 3, 4)), torch.zeros(16), atol=1e-4, rtol=0)
    torch.testing.assert_close(latents.std(dim=(0, 2, 3, 4)), torch.ones(16), atol=1e-4, rtol=0)
    torch.testing.assert_close(vae.decode(latents), before, atol=1e-4, rtol=1e-4)  # a reparametrisation


def test_a_tiny_run_writes_a_checkpoint_the_pipeline_loads(tmp_path: Path) -> None:
    from stages.pipeline import Pipeline

    cfg = TrainConfig(threads=1, vae_base_dim=8, vae_steps=2, vae_eval_clips=0, clips=4, dit_dim=32, dit_ffn_dim=64,
                      dit_heads=2, dit_layers=1, dit_steps=2, dit_batch=2)
    record = train(cfg, tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "Wan2.1_VAE.pth",
            "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/tokenizer.json", "training_record.json"} <= names
    assert json.loads((tmp_path / "training_record.json").read_text())["config"]["dit_steps"] == 2
    assert record["parameters"]["dit"] > 0 and np.isfinite(record["dit_loss_final"])
    ckpt = WanCheckpoint.resolve(tmp_path)
    assert ckpt.layout == "original" and ckpt.preset.dit.dim == 32
    t5 = torch.load(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True)
    assert {v.dtype for v in t5.values()} == {torch.bfloat16}
    result = Pipeline.from_pretrained(tmp_path).generate(
        {"prompt": "a red circle moving left on a white background", "height": 32, "width": 32, "num_frames": 5,
         "num_inference_steps": 2, "seed": 0})
    assert result.frames.shape == (5, 32, 32, 3)
