"""The Qwen3 prompt encoder that Z-Image and FLUX.2-klein share: chat template -> Qwen3 -> chosen hidden states.

The network is transformers' `Qwen3Model` (the class the releases were trained with), so no encoder math is
written here. This module does what both diffusers pipelines do around it, and nothing else:

- each prompt is wrapped by the tokenizer's own chat template as one user turn with the generation prompt
  (`enable_thinking`: Z-Image renders the template with thinking on, which leaves the assistant turn open;
  FLUX.2-klein with thinking off, which appends an empty think block);
- tokenised padded to `max_length` with truncation; the attention mask goes to the encoder;
- the context is the encoder's `hidden_states[i]` for each i of `hidden_layers` (index 0 is the token
  embedding, index k the output of decoder layer k, negative indices count from the end, as in the tuple
  transformers returns), concatenated on the feature axis in the order given: [layer a | layer b | ...];
- keep_padding=False (Z-Image): only the valid (mask-1) positions, in order, and no mask travels on, since the
  DiT gets exactly those rows; keep_padding=True (FLUX.2): every one of the `max_length` positions, padding
  included, and no mask either, since that DiT attends to the padded rows unmasked.

Loading is strict (`models.loading.load_strict`): the model is built from the folder's config.json on the
meta device and every missing, unexpected or mis-shaped weight is an error naming the file. A folder saved
from `Qwen3ForCausalLM` (keys under `model.` plus `lm_head.weight`) and one saved from `Qwen3Model` (no
prefix) both load; the language-model head is dropped explicitly, since no prompt encoder reads logits.

`write_tiny_qwen3` writes a tiny random encoder and an offline byte-level BPE tokenizer with the Qwen3
special tokens and a Qwen3-style chat template (with the enable_thinking branch), for tests of both families.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen3Config, Qwen3Model

from models.conditioning import Conditioning
from models.loading import CheckpointError, StateDict, load_safetensors_dir, load_strict, meta_device

__all__ = ["QWEN3_CHAT_TEMPLATE", "Qwen3PromptEncoder", "build_tiny_qwen3_tokenizer", "load_qwen3",
           "load_qwen3_tokenizer", "qwen3_state_dict", "write_tiny_qwen3"]

logger = logging.getLogger(__name__)

WEIGHTS_STEM = "model"
CAUSAL_LM_PREFIX = "model."
LM_HEAD_KEY = "lm_head.weight"

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
THINK_START, THINK_END = "<think>", "</think>"

QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
"""The Qwen3 chat template's handling of system, user and assistant turns and of the generation prompt (the
released template also renders tools and reasoning content, which a prompt encoder never passes): with
enable_thinking false the open assistant turn gets an empty think block."""


class Qwen3PromptEncoder:
    """Qwen3 + its tokenizer; `encode(prompts) -> [Conditioning]` (see the module docstring for the rules).

    model: the encoder; tokenizer: its tokenizer, with a chat template; max_length: tokens every prompt is
    padded / truncated to; hidden_layers: indices into the encoder's hidden-state tuple, concatenated in this
    order; enable_thinking: passed to the chat template; keep_padding: keep all max_length rows (else the
    valid ones only).
    """

    def __init__(self, model: Qwen3Model, tokenizer: PreTrainedTokenizerBase, *, max_length: int = 512,
                 hidden_layers: Sequence[int] = (-2,), enable_thinking: bool = True,
                 keep_padding: bool = False) -> None:
        states = model.config.num_hidden_layers + 1  # the embedding output, then one per decoder layer
        layers = tuple(int(i) for i in hidden_layers)
        if not layers:
            raise ValueError("hidden_layers must name at least one hidden state, e.g. (-2,)")
        bad = [i for i in layers if not -states <= i < states]
        if bad:
            raise ValueError(f"hidden_layers {bad} out of range: the encoder has {states} hidden states "
                             f"(0 = embeddings, 1..{states - 1} = decoder layers; negative counts from the end)")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; Qwen3 prompts are rendered with it")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; prompts are padded to max_length")
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the encoder only "
                             f"{model.config.vocab_size} embeddings; pair the encoder with its own tokenizer")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.hidden_layers = layers
        self.enable_thinking = bool(enable_thinking)
        self.keep_padding = bool(keep_padding)

    @classmethod
    def from_pretrained(cls, root: str | Path, *, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", encoder_dir: str = "text_encoder",
                        tokenizer_dir: str = "tokenizer", max_length: int = 512,
                        hidden_layers: Sequence[int] = (-2,), enable_thinking: bool = True,
                        keep_padding: bool = False) -> "Qwen3PromptEncoder":
        """Load `root/encoder_dir` (config.json + model.safetensors or shards) and `root/tokenizer_dir`."""
        root = Path(root)
        missing = [d for d in (encoder_dir, tokenizer_dir) if not (root / d).is_dir()]
        if missing:
            raise CheckpointError(f"{root}: the Qwen3 text encoder is missing: {', '.join(m + '/' for m in missing)} "
                                  f"(expected {encoder_dir}/ and {tokenizer_dir}/)")
        tokenizer = load_qwen3_tokenizer(root / tokenizer_dir)
        model = load_qwen3(root / encoder_dir, dtype=dtype, device=device)
        logger.info("Qwen3 prompt encoder loaded from %s (width %d, %d layers, hidden states %s, %d tokens, %s)",
                    root, model.config.hidden_size, model.config.num_hidden_layers, layers_text(hidden_layers),
                    max_length, dtype)
        return cls(model, tokenizer, max_length=max_length, hidden_layers=hidden_layers,
                   enable_thinking=enable_thinking, keep_padding=keep_padding)

    @property
    def dim(self) -> int:
        """Width of the context rows: the encoder width times the number of hidden states taken."""
        return int(self.model.config.hidden_size) * len(self.hidden_layers)

    def render(self, prompt: str) -> str:
        """The chat-template text of one prompt (one user turn, generation prompt added)."""
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=self.enable_thinking)

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str]) -> list[Conditioning]:
        """One conditioning per prompt: context (L, dim) CPU float32, L = the valid tokens (keep_padding False)
        or max_length (True); pooled and mask None."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string; wrap it as [prompt]")
        prompts = list(prompts)
        if not prompts:
            return []
        batch = self.tokenizer([self.render(p) for p in prompts], padding="max_length", max_length=self.max_length,
                               truncation=True, return_tensors="pt")
        device = self.model.embed_tokens.weight.device
        mask = batch["attention_mask"].to(device).bool()
        out = self.model(input_ids=batch["input_ids"].to(device), attention_mask=mask, output_hidden_states=True,
                         use_cache=False)
        context = torch.cat([out.hidden_states[i] for i in self.hidden_layers], dim=-1)
        context = context.detach().to("cpu", torch.float32)
        mask = mask.cpu()
        if self.keep_padding:
            return [Conditioning(c.clone()) for c in context]
        return [Conditioning(c[m].clone()) for c, m in zip(context, mask)]

    conditioning = encode
    """The stages' `TextEncoder` protocol name for `encode`."""


def layers_text(layers: Sequence[int]) -> str:
    return "(" + ", ".join(str(i) for i in layers) + ")"


def load_qwen3_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The Qwen3 tokenizer (`AutoTokenizer`) from a local folder only (never the Hub)."""
    folder = Path(folder)
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load a tokenizer from {folder}: {exc}") from exc


def qwen3_state_dict(sd: StateDict, source: str) -> StateDict:
    """A `Qwen3Model` state dict from a `Qwen3ForCausalLM` one (`model.` stripped, `lm_head.weight` dropped) or
    a `Qwen3Model` one (as is). A mix of both layouts is an error naming the odd keys."""
    prefixed = [k for k in sd if k.startswith(CAUSAL_LM_PREFIX)]
    if not prefixed:
        return dict(sd)
    rest = sorted(k for k in sd if not k.startswith(CAUSAL_LM_PREFIX) and k != LM_HEAD_KEY)
    if rest:
        shown = ", ".join(rest[:5]) + (f" (+{len(rest) - 5} more)" if len(rest) > 5 else "")
        raise CheckpointError(f"{source} mixes Qwen3ForCausalLM keys (under '{CAUSAL_LM_PREFIX}') with others: {shown}")
    return {k[len(CAUSAL_LM_PREFIX):]: v for k, v in sd.items() if k != LM_HEAD_KEY}


def load_qwen3(folder: str | Path, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> Qwen3Model:
    """`Qwen3Model` from `folder` (config.json + model.safetensors or its shards), loaded strictly."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json; expected a transformers Qwen3 model folder")
    sd, source = load_safetensors_dir(folder, stem=WEIGHTS_STEM)
    sd = qwen3_state_dict(sd, source)
    try:
        config = Qwen3Config.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {folder / 'config.json'} as a Qwen3 config: {exc}") from exc
    with meta_device():
        model = Qwen3Model(config)
    # The RoPE inverse frequencies are non-persistent buffers (no checkpoint holds them): build them for real.
    model.rotary_emb = type(model.rotary_emb)(config=config).to(device)
    return load_strict(model, sd, source, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# Tiny random Qwen3 folders (tests of Z-Image and FLUX.2-klein)
# ---------------------------------------------------------------------------------------------
TINY_WORDS = ("user", "assistant", "system", "ĊĊ", "Ġa", "Ġred", "Ġcircle", "Ġon", "Ġthe", "Ġmoon", "Ġcat",
              "Ġblue", "Ġsquare", "Ġunder", "Ġsky")
"""Words the tiny BPE merges into single tokens (Ġ marks a leading space, Ċ a newline, as in byte-level BPE)."""


def build_tiny_qwen3_tokenizer(out_dir: str | Path, words: Sequence[str] = TINY_WORDS) -> PreTrainedTokenizerBase:
    """A byte-level BPE `Qwen2Tokenizer` (the class Qwen3 ships) built offline, saved to `out_dir`.

    Vocabulary: the 256 byte symbols (so any text encodes, no unknown token), merges that make each of
    `words` one token, then the special tokens at the top as in the release: `<|endoftext|>` (pad),
    `<|im_start|>`, `<|im_end|>` (eos), `<think>`, `</think>`; no BOS; right padding; `QWEN3_CHAT_TEMPLATE`.
    """
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    merges: list[tuple[str, str]] = []
    for word in words:
        current = word[0]
        for symbol in word[1:]:
            if (current, symbol) not in merges:
                merges.append((current, symbol))
            current += symbol
            vocab.setdefault(current, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=IM_END,
                               pad_token=PAD)
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END, THINK_START, THINK_END]})
    tokenizer.padding_side = "right"
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def write_tiny_qwen3(folder_encoder: str | Path, folder_tokenizer: str | Path, hidden: int, layers: int,
                     seed: int = 0, causal_lm: bool = True) -> Qwen3Config:
    """Write a tiny random Qwen3 encoder (config.json + model.safetensors) and its tokenizer.

    hidden: width (2 query heads and 1 key/value head of hidden/2, as Qwen3's grouped-query attention);
    layers: decoder layers; causal_lm: save as `Qwen3ForCausalLM` (keys under `model.`, an untied
    `lm_head.weight`) or as `Qwen3Model` (no prefix). Every parameter is random (`randomize_parameters`).
    """
    from transformers import Qwen3ForCausalLM

    from models.random_init import randomize_parameters

    if hidden % 2:
        raise ValueError(f"hidden must be even (two heads of hidden/2), got {hidden}")
    tokenizer = build_tiny_qwen3_tokenizer(folder_tokenizer)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=1024,
        rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model = Qwen3ForCausalLM(config) if causal_lm else Qwen3Model(config)
    randomize_parameters(model, seed=seed)
    model.save_pretrained(str(folder_encoder))
    return config
