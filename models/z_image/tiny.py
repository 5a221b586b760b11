"""Tiny Z-Image checkpoints with seeded random weights, in the exact release layout (for tests and demos).

`write_random_checkpoint(root)` writes a whole diffusers release folder as Tongyi-MAI ships Z-Image-Turbo:
`model_index.json` (`ZImagePipeline`), `transformer/` (the DiT), `text_encoder/` (a tiny Qwen3, saved as
`Qwen3ForCausalLM` by default), `tokenizer/` (the offline byte-level BPE with Qwen3's special tokens and chat
template), `vae/` (a tiny FLUX.1-architecture `AutoencoderKL`) and `scheduler/scheduler_config.json` with the
release's scheduler values. Every parameter is random, the DiT's pad tokens included (diffusers inits them to
zeros, which would hide a pad-handling mistake).
"""

from __future__ import annotations

import json
from pathlib import Path

from models.flux.tiny import TINY_VAE
from models.flux.vae_config import FluxVAEConfig
from models.z_image.config import Z_IMAGE_TINY, ZImageDiTConfig

TINY_TEXT_LAYERS = 3
"""Decoder layers of the tiny Qwen3 (the DiT reads the second-to-last hidden state, so two would do)."""

SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
"""The release's FlowMatchEulerDiscreteScheduler: the static shift 3, no resolution-dependent shift."""


def write_random_checkpoint(root: str | Path, *, dit: ZImageDiTConfig = Z_IMAGE_TINY, vae: FluxVAEConfig = TINY_VAE,
                            seed: int = 0, causal_lm: bool = True) -> Path:
    """A complete Z-Image release folder at `root` with seeded random weights; the Qwen3 width is the DiT's
    cap_feat_dim. causal_lm: save the text encoder as `Qwen3ForCausalLM` (else `Qwen3Model`)."""
    from models.flux.vae import FluxVAE
    from models.qwen3_text import write_tiny_qwen3
    from models.random_init import randomize_parameters
    from models.z_image.transformer import ZImageTransformer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_tiny_qwen3(root / "text_encoder", root / "tokenizer", dit.cap_feat_dim, TINY_TEXT_LAYERS, seed=seed,
                     causal_lm=causal_lm)
    randomize_parameters(ZImageTransformer(dit), seed=seed + 1).save_pretrained(root / "transformer")
    randomize_parameters(FluxVAE(vae), seed=seed + 2).save_pretrained(root / "vae", layout="diffusers")
    (root / "scheduler").mkdir(exist_ok=True)
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.42.1", **SCHEDULER_CONFIG}
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {
        "_class_name": "ZImagePipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3ForCausalLM" if causal_lm else "Qwen3Model"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root
