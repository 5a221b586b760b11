"""Stage 1: prompts -> text embeddings (umT5), batched over every prompt it is given."""

from __future__ import annotations

from pathlib import Path

import torch

from models.wan.text_encoder import WanTextEncoder
from stages.embeddings import PromptEmbeddings


class TextEncodeStage:
    """Encodes the prompts of one or many requests in a single encoder forward."""

    def __init__(self, encoder: WanTextEncoder) -> None:
        self.encoder = encoder

    @classmethod
    def from_pretrained(cls, root: str | Path, text_len: int = 512, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "TextEncodeStage":
        """text_len: the DiT's context length (longer prompts are cut to it, EOS kept)."""
        return cls(WanTextEncoder.from_pretrained(root, dtype=dtype, device=device, text_len=text_len))

    @torch.inference_mode()
    def run(self, requests: list[tuple[str, str | None]]) -> list[PromptEmbeddings]:
        """requests: (prompt, negative prompt or None when unguided) per request, in order."""
        texts: list[str] = []
        for prompt, negative in requests:
            texts.append(prompt)
            if negative is not None:
                texts.append(negative)
        encoded = iter(e.detach().to("cpu", torch.float32) for e in self.encoder.encode(texts))
        return [PromptEmbeddings(next(encoded), next(encoded) if negative is not None else None)
                for _, negative in requests]
