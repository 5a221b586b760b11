"""FLUX.1's two text encoders: CLIP-L for the pooled vector, T5-XXL for the token context.

The networks are transformers' `CLIPTextModel` and `T5EncoderModel` (the very classes the release
was trained and shipped with), so no encoder math is written here. This module does what the FLUX
pipeline does around them, and nothing else:

- CLIP: tokenise padded to 77 with truncation, no attention mask; keep `pooler_output` (the final-LN
  state at the first EOS), (B, 768).
- T5: tokenise padded to `max_sequence_length` (512 for dev, 256 for schnell), truncated,
  no attention mask; keep `last_hidden_state`, (B, L, 4096). The padded positions are not zeroed and
  not masked: the DiT attends to them as in the release.
- The T5 prompt defaults to the CLIP prompt.

Loading is strict (`models.loading.load_strict`): the models are built from each folder's config.json on
the meta device and every missing, unexpected or mis-shaped weight is an error naming the file, where
`from_pretrained` would silently initialise what is missing. Both checkpoints keep their original key
names; the release's CLIP file prefixes every key with `text_model.` (written by older transformers),
which is stripped here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
)

from models.conditioning import Conditioning
from models.loading import CheckpointError, StateDict, load_safetensors_dir, load_strict, meta_device

__all__ = ["CLIP_MAX_LENGTH", "FluxTextEncoder", "T5_MAX_LENGTH", "load_clip", "load_t5", "load_tokenizer"]

logger = logging.getLogger(__name__)

# diffusers release folder layout (black-forest-labs/FLUX.1-{dev,schnell}).
CLIP_ENCODER, CLIP_TOKENIZER = "text_encoder", "tokenizer"
T5_ENCODER, T5_TOKENIZER = "text_encoder_2", "tokenizer_2"
WEIGHTS_STEM = "model"

CLIP_MAX_LENGTH = 77
"""CLIP-L's context: prompts are padded / truncated to 77 tokens (BOS and EOS included)."""
T5_MAX_LENGTH = 512
"""The longest T5 context FLUX.1 accepts (dev's default; schnell uses 256)."""

_CLIP_PREFIX = "text_model."
# Persistent in checkpoints written by transformers < 4.31; now a rebuilt, non-persistent buffer.
_CLIP_LEGACY_KEYS = ("embeddings.position_ids",)
_T5_SHARED, _T5_EMBED = "shared.weight", "encoder.embed_tokens.weight"


class FluxTextEncoder:
    """CLIP-L + T5 with their tokenizers; `encode(prompts) -> (context (B, L, 4096), pooled (B, 768))`."""

    def __init__(self, clip: CLIPTextModel, clip_tokenizer: PreTrainedTokenizerBase, t5: T5EncoderModel,
                 t5_tokenizer: PreTrainedTokenizerBase, max_sequence_length: int = T5_MAX_LENGTH) -> None:
        if not 1 <= max_sequence_length <= T5_MAX_LENGTH:
            raise ValueError(f"max_sequence_length must be in 1..{T5_MAX_LENGTH} (dev 512, schnell 256), "
                             f"got {max_sequence_length}")
        if clip.config.max_position_embeddings < CLIP_MAX_LENGTH:
            raise ValueError(f"the CLIP encoder has {clip.config.max_position_embeddings} positions; FLUX feeds "
                             f"{CLIP_MAX_LENGTH}")
        for name, tok, model in (("CLIP", clip_tokenizer, clip), ("T5", t5_tokenizer, t5)):
            if len(tok) > model.config.vocab_size:
                raise ValueError(f"the {name} tokenizer has {len(tok)} tokens but its encoder only "
                                 f"{model.config.vocab_size} embeddings; pair each encoder with its own tokenizer")
        self.clip, self.clip_tokenizer = clip.eval(), clip_tokenizer
        self.t5, self.t5_tokenizer = t5.eval(), t5_tokenizer
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                        max_sequence_length: int = T5_MAX_LENGTH) -> "FluxTextEncoder":
        """Load from a release folder holding text_encoder/, tokenizer/, text_encoder_2/ and tokenizer_2/."""
        root = Path(path)
        missing = [d for d in (CLIP_ENCODER, CLIP_TOKENIZER, T5_ENCODER, T5_TOKENIZER) if not (root / d).is_dir()]
        if missing:
            raise CheckpointError(f"{root} is not a FLUX.1 release folder: missing {', '.join(missing)}/ "
                                  f"(expected {CLIP_ENCODER}/, {CLIP_TOKENIZER}/, {T5_ENCODER}/, {T5_TOKENIZER}/)")
        clip_tokenizer = load_tokenizer(root / CLIP_TOKENIZER)
        t5_tokenizer = load_tokenizer(root / T5_TOKENIZER)
        clip = load_clip(root / CLIP_ENCODER, dtype=dtype, device=device)
        t5 = load_t5(root / T5_ENCODER, dtype=dtype, device=device)
        logger.info("FLUX text encoders loaded from %s (CLIP width %d, T5 width %d, T5 length %d, %s)", root,
                    clip.config.hidden_size, t5.config.d_model, max_sequence_length, dtype)
        return cls(clip, clip_tokenizer, t5, t5_tokenizer, max_sequence_length=max_sequence_length)

    @property
    def dim(self) -> int:
        """Width of the context rows (T5-XXL: 4096, the DiT's context_in_dim)."""
        return int(self.t5.config.d_model)

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled vector (CLIP-L: 768, the DiT's vec_in_dim)."""
        return int(self.clip.config.hidden_size)

    def _ids(self, tokenizer: PreTrainedTokenizerBase, prompts: list[str], length: int) -> torch.Tensor:
        batch = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return batch["input_ids"]

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str], prompts_2: Sequence[str] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts (CLIP) and prompts_2 (T5, default: prompts) -> (context (B, L, dim), pooled (B, pooled_dim)).

        L = max_sequence_length. Outputs are in each encoder's dtype on its device.
        """
        if isinstance(prompts, str) or isinstance(prompts_2, str):
            raise TypeError("prompts must be a list of strings, not a single string; wrap it as [prompt]")
        prompts = list(prompts)
        prompts_2 = prompts if prompts_2 is None else list(prompts_2)
        if not prompts or len(prompts_2) != len(prompts):
            raise ValueError(f"need one or more prompts and as many prompts_2; got {len(prompts)} and {len(prompts_2)}")
        clip_ids = self._ids(self.clip_tokenizer, prompts, CLIP_MAX_LENGTH)
        pooled = self.clip(clip_ids.to(self.clip.device)).pooler_output
        t5_ids = self._ids(self.t5_tokenizer, prompts_2, self.max_sequence_length)
        context = self.t5(t5_ids.to(self.t5.device)).last_hidden_state
        return context, pooled

    def conditioning(self, prompts: Sequence[str]) -> list[Conditioning]:
        """`encode` as the family-neutral conditioning: the padded T5 sequence and the CLIP pooled vector of
        each prompt (both encoders read the same prompt), CPU float32."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string; wrap it as [prompt]")
        if not prompts:
            return []
        context, pooled = (x.detach().to("cpu", torch.float32) for x in self.encode(prompts))
        return [Conditioning(c.clone(), p.clone()) for c, p in zip(context, pooled)]


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """`AutoTokenizer` from a local folder only (never the Hub), with a clear error when it cannot."""
    folder = Path(folder)
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load a tokenizer from {folder}: {exc}") from exc


def _weights(folder: Path) -> tuple[StateDict, str]:
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json; expected a transformers model folder")
    return load_safetensors_dir(folder, stem=WEIGHTS_STEM)


def load_clip(folder: str | Path, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> CLIPTextModel:
    """CLIPTextModel from `folder` (config.json + model.safetensors or shards), loaded strictly."""
    folder = Path(folder)
    sd, source = _weights(folder)
    if sd and all(k.startswith(_CLIP_PREFIX) for k in sd):
        sd = {k[len(_CLIP_PREFIX):]: v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if k not in _CLIP_LEGACY_KEYS}
    config = CLIPTextConfig.from_pretrained(str(folder), local_files_only=True)
    with meta_device():
        model = CLIPTextModel(config)
    # The position ids are a non-persistent buffer (arange), so no checkpoint carries them: rebuild it.
    positions = torch.arange(config.max_position_embeddings, device=device).expand((1, -1))
    model.embeddings.register_buffer("position_ids", positions, persistent=False)
    return load_strict(model, sd, source, dtype=dtype, device=device)


def load_t5(folder: str | Path, dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu") -> T5EncoderModel:
    """T5EncoderModel from `folder`, loaded strictly; the token embedding is stored once and tied."""
    folder = Path(folder)
    sd, source = _weights(folder)
    config = T5Config.from_pretrained(str(folder), local_files_only=True)
    with meta_device():
        model = T5EncoderModel(config)
    sd = dict(sd)
    if _T5_SHARED in sd and _T5_EMBED in sd and not torch.equal(sd[_T5_SHARED], sd[_T5_EMBED]):
        raise CheckpointError(f"{source}: {_T5_SHARED} and {_T5_EMBED} differ, but the encoder ties them")
    embedding = sd.get(_T5_SHARED, sd.get(_T5_EMBED))
    if embedding is not None:  # one tensor under both tied names, so it is cast and held once
        embedding = embedding.to(device=device, dtype=dtype)
        sd[_T5_SHARED] = sd[_T5_EMBED] = embedding
    load_strict(model, sd, source, dtype=dtype, device=device)
    model.encoder.embed_tokens.weight = model.shared.weight
    return model
