"""Tiny FLUX.1 checkpoints with seeded random weights, in the exact release layouts (for tests and demos).

`write_random_checkpoint(root, layout=...)` writes a whole release folder:
- "original" (BFL's repositories): `flux1-dev.safetensors` (or `flux1-schnell.safetensors`) and `ae.safetensors`
  at the top, BFL key names;
- "diffusers": `model_index.json` (`FluxPipeline`), `transformer/`, `vae/`, `scheduler/`;
and in both the text encoders as the releases ship them: `text_encoder/` (CLIP-L, keys under `text_model.` as
the release's older transformers wrote them), `tokenizer/`, `text_encoder_2/` (T5), `tokenizer_2/`. The
tokenizers are word-level ones built offline (no download) with the released special-token conventions:
CLIP's BOS/EOS at the top of the vocabulary with EOS as the pad, T5's pad 0 and EOS 1.
"""

from __future__ import annotations

import json
from pathlib import Path

from models.flux.config import FLUX_TINY, FluxDiTConfig
from models.flux.vae_config import FluxVAEConfig

TINY_VAE = FluxVAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=16)
"""Four levels like the release (8x spatial stride), 32 channels each."""

TINY_WORDS = tuple(f"w{i}" for i in range(120)) + ("a", "cat", "on", "the", "moon", "red", "circle", ".", ",")
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_WIDTH = 32  # the tiny DiT's pooled_dim
SCHEDULER_CONFIGS = {
    True: {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
           "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True},
    False: {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
            "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False},
}
"""The releases' scheduler configs: dev (guidance embedding) shifts dynamically, schnell does not."""


def build_clip_tokenizer(out_dir: str | Path, words: tuple[str, ...] = TINY_WORDS):  # noqa: ANN201 - transformers type
    """Word-level, lowercased; BOS/EOS get the two highest ids (as in CLIP-L), EOS pads, 77 tokens max."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from models.flux.text_encoder import CLIP_MAX_LENGTH

    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    vocab[CLIP_BOS], vocab[CLIP_EOS] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=CLIP_EOS))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_BOS} $A {CLIP_EOS}", special_tokens=[(CLIP_BOS, vocab[CLIP_BOS]), (CLIP_EOS, vocab[CLIP_EOS])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=CLIP_BOS, eos_token=CLIP_EOS, pad_token=CLIP_EOS,
                                   unk_token=CLIP_EOS, model_max_length=CLIP_MAX_LENGTH)
    fast.save_pretrained(str(out_dir))
    return fast


def write_text_encoders(root: Path, context_dim: int, pooled_dim: int, seed: int) -> None:
    """text_encoder/ + tokenizer/ (tiny CLIP) and text_encoder_2/ + tokenizer_2/ (tiny T5), random weights."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from models.flux.text_encoder import CLIP_MAX_LENGTH
    from models.random_init import randomize_parameters
    from models.wan.tokenizer import build_word_tokenizer

    clip_tok = build_clip_tokenizer(root / "tokenizer")
    t5_tok = build_word_tokenizer(TINY_WORDS, root / "tokenizer_2")
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=pooled_dim, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu",
        projection_dim=pooled_dim, bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
        pad_token_id=clip_tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok) + 5, d_model=context_dim, d_kv=context_dim // 4, d_ff=2 * context_dim, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1))
    randomize_parameters(clip, seed=seed)
    randomize_parameters(t5, seed=seed + 1)
    clip.save_pretrained(root / "text_encoder")
    t5.save_pretrained(root / "text_encoder_2")
    path = root / "text_encoder" / "model.safetensors"
    save_file({f"text_model.{k}": v for k, v in load_file(str(path)).items()}, str(path))


def write_random_checkpoint(root: str | Path, *, dit: FluxDiTConfig = FLUX_TINY, vae: FluxVAEConfig = TINY_VAE,
                            layout: str = "original", seed: int = 0) -> Path:
    """A complete FLUX.1 release folder with seeded random weights (every parameter random); dev-style with
    `dit.guidance_embed`, schnell-style without."""
    from models.flux.transformer import FluxTransformer
    from models.flux.vae import FluxVAE
    from models.random_init import randomize_parameters

    if layout not in ("original", "diffusers"):
        raise ValueError(f"layout must be 'original' or 'diffusers', got {layout!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_text_encoders(root, dit.context_dim, dit.pooled_dim, seed)
    model = randomize_parameters(FluxTransformer(dit), seed=seed + 2)
    autoencoder = randomize_parameters(FluxVAE(vae), seed=seed + 3)
    if layout == "original":
        model.save_pretrained(root, layout="original")
        autoencoder.save_pretrained(root / "ae.safetensors", layout="original")
        return root
    model.save_pretrained(root / "transformer", layout="diffusers")
    autoencoder.save_pretrained(root / "vae", layout="diffusers")
    (root / "scheduler").mkdir(exist_ok=True)
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.42.1",
                 **SCHEDULER_CONFIGS[dit.guidance_embed]}
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {
        "_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer_2": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": [None, None], "feature_extractor": [None, None],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root
