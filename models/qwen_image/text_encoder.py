"""Qwen-Image's text encoder: the language model of Qwen2.5-VL-7B-Instruct, through transformers.

The network is transformers' `Qwen2_5_VLTextModel` (no encoder math is written here); this module does what
the release pipeline (diffusers `QwenImagePipeline.encode_prompt`) does around it, and nothing else:

- wrap each prompt in the chat template (`text_config.PROMPT_TEMPLATE`);
- tokenise with `Qwen2Tokenizer` from tokenizer/, truncated at 1024 + 34 tokens, padded to the longest prompt;
- run the encoder with the attention mask and keep `hidden_states[-1]` (the last layer after the final norm, which
  is `last_hidden_state`);
- per prompt keep its real tokens, drop the first 34 (the template's system turn and "<|im_start|>user\\n"),
  and keep at most `max_sequence_length` (512) of the rest (the trailing "<|im_end|>\\n<|im_start|>assistant\\n"
  stays, as in the release);
- return one `Conditioning(context (L_i, 3584), mask=None)` per prompt: every row is real; the DiT's `begin`
  pads the branches of one request to a common length and masks the padding.

Padding is on the right, always: each real token then sees only the prompt's own earlier tokens at positions
0, 1, ..., so a prompt encodes to the same rows whatever else shares its batch, which is what the release
pipeline computes when it encodes the prompt and the negative prompt one call each.

The released text_encoder/ is a whole Qwen2.5-VL-7B-Instruct checkpoint: language model, vision tower and LM
head. Text-only encoding uses the language model alone (with no image in the input the full model runs exactly
the language model: no vision token, positions 0 ... L-1 on all three M-RoPE axes), so the vision tower
(`visual.*`) and the next-token head (`lm_head.*`) are dropped explicitly by prefix, saving 1.2 B parameters; any
other key the language model lacks, and any key it misses, is an error (`models.loading.load_strict`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import torch
from transformers import PreTrainedTokenizerBase, Qwen2_5_VLConfig, Qwen2_5_VLTextModel, Qwen2Tokenizer

from models.conditioning import Conditioning
from models.config_files import read_json
from models.loading import CheckpointError, StateDict, load_safetensors_dir, load_strict, meta_device
from models.qwen_image.text_config import (
    MAX_SEQUENCE_LENGTH,
    PROMPT_TEMPLATE,
    TEMPLATE_PREFIX_TOKENS,
    TOKENIZER_MAX_LENGTH,
)

__all__ = ["DROPPED_PREFIXES", "QwenImageTextEncoder", "load_text_model", "load_tokenizer", "release_to_text_model"]

logger = logging.getLogger(__name__)

ENCODER_DIR, TOKENIZER_DIR = "text_encoder", "tokenizer"
WEIGHTS_STEM = "model"

DROPPED_PREFIXES = ("visual.", "model.visual.", "lm_head.")
"""Release keys Qwen-Image never uses: the vision tower (two spellings: transformers < 4.52 / >= 4.52 module
paths) and the LM head."""
_TEXT_PREFIXES = ("model.language_model.", "model.")
"""Where the language model's own keys sit in a release file (newer module path first)."""


def release_to_text_model(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """A Qwen2.5-VL checkpoint's keys -> (the language model's state dict, the dropped keys).

    `model.language_model.X` and `model.X` become `X` (embed_tokens, layers.N..., norm); keys under
    `DROPPED_PREFIXES` are dropped and returned; anything else is kept unchanged, so the strict load names it.
    """
    kept: StateDict = {}
    dropped: list[str] = []
    for key, tensor in sd.items():
        if key.startswith(DROPPED_PREFIXES):
            dropped.append(key)
            continue
        name = next((key[len(p):] for p in _TEXT_PREFIXES if key.startswith(p)), key)
        if name in kept:
            raise CheckpointError(f"the checkpoint holds the language-model weight {name} twice (as {key} and "
                                  f"under another prefix)")
        kept[name] = tensor
    return kept, sorted(dropped)


def load_text_model(folder: str | Path, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> Qwen2_5_VLTextModel:
    """The language model of the Qwen2.5-VL checkpoint in `folder` (config.json + model*.safetensors), strictly."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} holds no config.json: not a Qwen2.5-VL text_encoder/ folder")
    model_type = read_json(folder / "config.json").get("model_type")
    if model_type != "qwen2_5_vl":
        raise CheckpointError(f"{folder}/config.json is a {model_type!r} model; Qwen-Image's text encoder is "
                              f"Qwen2.5-VL (model_type 'qwen2_5_vl')")
    config = Qwen2_5_VLConfig.from_pretrained(str(folder), local_files_only=True)
    raw, source = load_safetensors_dir(folder, stem=WEIGHTS_STEM)
    sd, dropped = release_to_text_model(raw)
    del raw
    logger.info("%s: dropping %d keys Qwen-Image does not use (vision tower, LM head)", source, len(dropped))
    text_config = config.text_config
    text_config._attn_implementation = "sdpa"
    with meta_device():
        model = Qwen2_5_VLTextModel(text_config)
    # The RoPE frequencies are a non-persistent buffer (no checkpoint holds them): build them for real, in fp32.
    with torch.device(device):
        model.rotary_emb = type(model.rotary_emb)(config=text_config)
    return load_strict(model, sd, source, dtype=dtype, device=device)


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """`Qwen2Tokenizer` from a tokenizer/ folder (vocab.json + merges.txt, or tokenizer.json), right padding."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"tokenizer folder not found: {folder}")
    try:
        tokenizer = Qwen2Tokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot load a Qwen2 tokenizer from {folder}: {exc}") from exc
    tokenizer.padding_side = "right"
    return tokenizer


class QwenImageTextEncoder:
    """Qwen2.5-VL's language model + its tokenizer; `conditioning(prompts)` -> one (L_i, hidden) context each."""

    def __init__(self, model: Qwen2_5_VLTextModel, tokenizer: PreTrainedTokenizerBase,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> None:
        if not 1 <= max_sequence_length <= TOKENIZER_MAX_LENGTH:
            raise ValueError(f"max_sequence_length must be in 1..{TOKENIZER_MAX_LENGTH} (the release uses "
                             f"{MAX_SEQUENCE_LENGTH}), got {max_sequence_length}")
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the encoder only "
                             f"{model.config.vocab_size} embeddings; pair the encoder with its own tokenizer")
        prefix = PROMPT_TEMPLATE.split("{}")[0]
        prefix_tokens = len(tokenizer(prefix)["input_ids"])
        if prefix_tokens != TEMPLATE_PREFIX_TOKENS:
            raise ValueError(f"the tokenizer encodes the prompt template's prefix to {prefix_tokens} tokens; the "
                             f"pipeline drops {TEMPLATE_PREFIX_TOKENS} (the release tokenizer's count), so this "
                             f"tokenizer would leave template tokens in or cut prompt tokens off")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                        max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> "QwenImageTextEncoder":
        """Load from a release folder holding text_encoder/ and tokenizer/."""
        root = Path(path)
        missing = [d for d in (ENCODER_DIR, TOKENIZER_DIR) if not (root / d).is_dir()]
        if missing:
            raise CheckpointError(f"{root} is not a Qwen-Image release folder: missing {', '.join(missing)}/ "
                                  f"(expected {ENCODER_DIR}/ with the Qwen2.5-VL checkpoint and {TOKENIZER_DIR}/)")
        tokenizer = load_tokenizer(root / TOKENIZER_DIR)
        model = load_text_model(root / ENCODER_DIR, dtype=dtype, device=device)
        logger.info("Qwen-Image text encoder loaded from %s (width %d, %d layers, %s, text length %d)", root,
                    model.config.hidden_size, model.config.num_hidden_layers, dtype, max_sequence_length)
        return cls(model, tokenizer, max_sequence_length=max_sequence_length)

    @property
    def dim(self) -> int:
        """Width of the context rows (3584 for Qwen2.5-VL-7B: the DiT's joint_attention_dim)."""
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """prompts -> one (L_i, dim) tensor each, L_i <= max_sequence_length, in the encoder's dtype and device."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string; wrap it as [prompt]")
        prompts = list(prompts)
        if not prompts:
            return []
        batch = self.tokenizer([PROMPT_TEMPLATE.format(p) for p in prompts],
                               max_length=TOKENIZER_MAX_LENGTH + TEMPLATE_PREFIX_TOKENS, padding=True,
                               truncation=True, return_tensors="pt")
        device = self.model.embed_tokens.weight.device
        mask = batch["attention_mask"].to(device)
        # The pipeline reads hidden_states[-1], which is last_hidden_state (after the final norm); reading the
        # latter skips keeping every layer's states.
        hidden = self.model(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state
        return [h[m.bool()][TEMPLATE_PREFIX_TOKENS:][:self.max_sequence_length] for h, m in zip(hidden, mask)]

    def conditioning(self, prompts: Sequence[str]) -> list[Conditioning]:
        """`encode` as the family-neutral conditioning: each prompt's rows, CPU float32, no mask (all real)."""
        return [Conditioning(c.detach().to("cpu", torch.float32).clone()) for c in self.encode(prompts)]
