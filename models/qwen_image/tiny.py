"""Tiny Qwen-Image release folders with seeded random weights, in the exact diffusers release layout (tests, demos).

`write_random_checkpoint(root, seed=0)` writes what the Qwen/Qwen-Image repository holds:
- `model_index.json` (`QwenImagePipeline`), `scheduler/scheduler_config.json` with the release's values;
- `transformer/` (the tiny DiT, diffusers keys), `vae/` (`AutoencoderKLQwenImage` config, diffusers keys);
- `text_encoder/`: a whole tiny Qwen2.5-VL checkpoint (language model, a one-block vision tower and the LM head,
  the key names transformers writes for the release: `model.layers.N...`, `visual...`, `lm_head.weight`);
- `tokenizer/`: a byte-level BPE `Qwen2Tokenizer` (vocab.json + merges.txt) trained offline on the prompt
  template and a small word list, with the special tokens <|endoftext|> (pad), <|im_start|>, <|im_end|> as single
  tokens. Every word of the template is one token, so the template's prefix is 34 tokens as with the release
  tokenizer (checked); any other text still tokenises (byte fallback through the 256 byte symbols).
Every parameter is random (`models.random_init.randomize_parameters`).
"""

from __future__ import annotations

import json
from pathlib import Path

from models.qwen_image.config import QWEN_IMAGE_TINY, QwenImageDiTConfig
from models.qwen_image.text_config import PROMPT_TEMPLATE, TEMPLATE_PREFIX_TOKENS
from models.wan.config import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, WanVAEConfig

__all__ = ["SCHEDULER_CONFIG", "TINY_WORDS", "build_tokenizer", "tiny_vae_config", "write_random_checkpoint",
           "write_text_encoder"]

TINY_WORDS = tuple(f"w{i}" for i in range(120)) + ("a", "cat", "on", "the", "moon", "red", "circle", "blue",
                                                    "square", ".", ",")
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.34.0.dev0",
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02, "stochastic_sampling": False,
    "time_shift_type": "exponential", "use_beta_sigmas": False, "use_dynamic_shifting": True,
    "use_exponential_sigmas": False, "use_karras_sigmas": False,
}
"""The release's scheduler config: mu from 0.5 at 256 tokens to 0.9 at 8192, exponential shift, last sigma 0.02."""

MODEL_INDEX = {
    "_class_name": "QwenImagePipeline", "_diffusers_version": "0.34.0.dev0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
}


def tiny_vae_config(z_dim: int) -> WanVAEConfig:
    """A 16-wide Wan2.1 VAE with the release's 8x spatial stride, `z_dim` latent channels and the first `z_dim`
    of the release's latent means / stds."""
    return WanVAEConfig(base_dim=16, z_dim=z_dim, latents_mean=WAN21_LATENTS_MEAN[:z_dim],
                        latents_std=WAN21_LATENTS_STD[:z_dim])


def build_tokenizer(out_dir: str | Path, words: tuple[str, ...] = TINY_WORDS):  # noqa: ANN201 - transformers type
    """Train a byte-level BPE with Qwen2's pre-tokenizer on the template and `words`, write it as the release does
    (vocab.json, merges.txt, tokenizer_config.json) and return it loaded back with `Qwen2Tokenizer`."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    out_dir = Path(out_dir)
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    text = " ".join(words)
    trainer = trainers.BpeTrainer(vocab_size=4000, min_frequency=1, special_tokens=[PAD, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([PROMPT_TEMPLATE.format(text), text], trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=trained["vocab"], merges=merges, unk_token=None, eos_token=IM_END,
                               pad_token=PAD)
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.save_pretrained(str(out_dir))
    # The release ships vocab.json + merges.txt (no tokenizer.json): write that layout.
    (out_dir / "vocab.json").write_text(json.dumps(trained["vocab"], ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (out_dir / "tokenizer.json").unlink()
    loaded = Qwen2Tokenizer.from_pretrained(str(out_dir), local_files_only=True)
    prefix = len(loaded(PROMPT_TEMPLATE.split("{}")[0])["input_ids"])
    if prefix != TEMPLATE_PREFIX_TOKENS:
        raise RuntimeError(f"the tiny tokenizer encodes the template prefix to {prefix} tokens, not "
                           f"{TEMPLATE_PREFIX_TOKENS}")
    return loaded


def write_text_encoder(root: Path, hidden: int, seed: int) -> None:
    """tokenizer/ and text_encoder/ (a tiny Qwen2.5-VL: 2 layers of width `hidden`, one vision block)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from models.random_init import randomize_parameters

    tokenizer = build_tokenizer(root / "tokenizer")
    heads = 2
    head_dim = hidden // heads
    if head_dim % 4:
        raise ValueError(f"the tiny encoder needs a width divisible by 8 (2 heads, M-RoPE sections), got {hidden}")
    section = [head_dim // 4, head_dim // 8, head_dim // 8]  # sums to head_dim / 2, as (16, 24, 24) for 128
    section[0] += head_dim // 2 - sum(section)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer) + 3, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=1,
                         max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         # rope_theta unlike transformers' default (the release's 1e6), so a config reader that
                         # dropped it would show
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
                         bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[0]),
        tie_word_embeddings=False)
    model = Qwen2_5_VLForConditionalGeneration(config)
    randomize_parameters(model, seed=seed)
    model.save_pretrained(root / "text_encoder")  # release key names: model.*, visual.*, lm_head.weight


def write_random_checkpoint(root: str | Path, *, dit: QwenImageDiTConfig = QWEN_IMAGE_TINY, seed: int = 0) -> Path:
    """A complete tiny Qwen-Image release folder (diffusers layout) with seeded random weights; returns `root`."""
    from models.qwen_image.transformer import QwenImageTransformer
    from models.qwen_image.vae import QwenImageVAE
    from models.random_init import randomize_parameters

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_text_encoder(root, dit.joint_attention_dim, seed)
    randomize_parameters(QwenImageTransformer(dit), seed=seed + 1).save_pretrained(root / "transformer")
    randomize_parameters(QwenImageVAE(tiny_vae_config(dit.latent_channels)), seed=seed + 2).save_pretrained(
        root / "vae")
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return root
