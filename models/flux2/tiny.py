"""Tiny FLUX.2-klein checkpoints with seeded random weights, in the exact release layouts (for tests and demos).

`write_random_checkpoint(root, layout=...)` writes a whole release folder:
- "diffusers" (black-forest-labs/FLUX.2-klein-*): `model_index.json` (`Flux2KleinPipeline`, `is_distilled`),
  `transformer/`, `vae/`, `scheduler/scheduler_config.json` (dynamic shifting on, so diffusers applies the mu
  the pipeline computes), `text_encoder/` (Qwen3ForCausalLM) and `tokenizer/`;
- "original" (BFL's names): the transformer file and `flux2-vae.safetensors` at the top, BFL key names, and the
  same `text_encoder/` + `tokenizer/` folders.
The text encoder is a tiny random Qwen3 with 28 layers (klein reads hidden states 9, 18 and 27) of width
context_dim / 3, with the offline Qwen3-style tokenizer of `models.qwen3_text`. Every parameter is random, and
so are the VAE's BatchNorm running statistics (a fresh BatchNorm's 0 / 1 would make the latent normalisation
the identity).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from models.flux2.config import FLUX2_TINY, Flux2DiTConfig
from models.flux2.vae_config import Flux2VAEConfig

__all__ = ["SCHEDULER_CONFIG", "TINY_VAE", "randomize_batch_norm", "write_random_checkpoint"]

M = TypeVar("M", bound=nn.Module)

TINY_VAE = Flux2VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=32)
"""Four levels like the release (8x, then the 2x2 patches: 16 pixels per DiT latent), 32 channels each."""
TEXT_LAYERS = 28
"""Qwen3 decoder layers of the tiny text encoder: the fewest that have hidden states 9, 18 and 27 (klein's)."""
TEXT_STATES = 3
"""Qwen3 hidden states stacked into each context row (the DiT's context_dim is 3 x the encoder width)."""
VAE_FILE = "flux2-vae.safetensors"
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.42.1", "num_train_timesteps": 1000,
    "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
    "max_image_seq_len": 4096, "time_shift_type": "exponential",
}
"""A klein-style scheduler config: with dynamic shifting the pipeline's empirical mu sets the shift (the static
`shift` and the base/max values are then unused)."""


@torch.no_grad()
def randomize_batch_norm(module: M, seed: int = 0) -> M:
    """Seeded random running statistics for every BatchNorm in `module`: mean 0.5 N(0, 1), var exp(0.5 N(0, 1))
    (positive), so latent normalisation is never the identity a fresh BatchNorm would be."""
    generator = torch.Generator("cpu").manual_seed(seed)
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.running_mean is not None:
            shape = sub.running_mean.shape
            sub.running_mean.copy_(0.5 * torch.randn(shape, generator=generator))
            sub.running_var.copy_(torch.exp(0.5 * torch.randn(shape, generator=generator)))
    return module


def write_random_checkpoint(root: str | Path, *, dit: Flux2DiTConfig = FLUX2_TINY, vae: Flux2VAEConfig = TINY_VAE,
                            layout: str = "diffusers", distilled: bool = True, seed: int = 0) -> Path:
    """A complete FLUX.2-klein release folder with seeded random weights; `distilled` is model_index.json's
    `is_distilled` (True: the step-distilled klein, one forward per step; False: a base model, true CFG)."""
    from models.flux2.transformer import Flux2Transformer
    from models.flux2.vae import Flux2VAE
    from models.qwen3_text import write_tiny_qwen3
    from models.random_init import randomize_parameters

    if layout not in ("original", "diffusers"):
        raise ValueError(f"layout must be 'original' or 'diffusers', got {layout!r}")
    if dit.context_dim % TEXT_STATES:
        raise ValueError(f"context_dim ({dit.context_dim}) must be {TEXT_STATES} x the text encoder width")
    if dit.in_channels != vae.dit_channels:
        raise ValueError(f"the DiT takes {dit.in_channels} latent channels but the VAE gives {vae.dit_channels}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_tiny_qwen3(root / "text_encoder", root / "tokenizer", dit.context_dim // TEXT_STATES,
                     TEXT_LAYERS, seed=seed, causal_lm=True)
    model = randomize_parameters(Flux2Transformer(dit), seed=seed + 1)
    autoencoder = randomize_batch_norm(randomize_parameters(Flux2VAE(vae), seed=seed + 2), seed=seed + 3)
    if layout == "original":
        model.save_pretrained(root, layout="original")
        autoencoder.save_pretrained(root / VAE_FILE, layout="original")
        return root
    model.save_pretrained(root / "transformer", layout="diffusers")
    autoencoder.save_pretrained(root / "vae", layout="diffusers")
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    index = {
        "_class_name": "Flux2KleinPipeline", "_diffusers_version": "0.42.1", "is_distilled": distilled,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3ForCausalLM"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root
