"""Stage 1: prompts -> text conditioning, batched over every prompt it is given (the family's encoder)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import torch

from models.conditioning import Conditioning
from models.family import ModelDescription
from models.registry import describe, family_module
from stages.embeddings import PromptEmbeddings


class TextEncoder(Protocol):
    """A family's text encoder(s): prompts -> one conditioning each (CPU float32)."""

    def conditioning(self, prompts: Sequence[str]) -> list[Conditioning]: ...


class TextEncodeStage:
    """Encodes the prompts of one or many requests in a single encoder forward."""

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder = encoder

    @classmethod
    def from_pretrained(cls, model: ModelDescription | str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "TextEncodeStage":
        """The text encoder(s) of a checkpoint folder (or its description), by the family's factory."""
        model = model if isinstance(model, ModelDescription) else describe(model)
        return cls(family_module(model.family).load_text_encoder(model, dtype=dtype, device=device))

    @torch.inference_mode()
    def run(self, requests: list[tuple[str, str | None]]) -> list[PromptEmbeddings]:
        """requests: (prompt, negative prompt or None when unguided) per request, in order."""
        texts: list[str] = []
        for prompt, negative in requests:
            texts.append(prompt)
            if negative is not None:
                texts.append(negative)
        encoded = iter(self.encoder.conditioning(texts))
        return [PromptEmbeddings(next(encoded), next(encoded) if negative is not None else None)
                for _, negative in requests]
