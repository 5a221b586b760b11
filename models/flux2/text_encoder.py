"""FLUX.2-klein's text encoder: the shared Qwen3 prompt encoder with the settings of the klein pipeline.

No second encoder is written here: `Flux2TextEncoder` is `models.qwen3_text.Qwen3PromptEncoder` loaded with
what diffusers' Flux2KleinPipeline (and BFL's klein text embedder) do around Qwen3-4B:
- the chat template rendered with thinking off (the open assistant turn gets an empty think block);
- every prompt padded / truncated to 512 tokens;
- the context is hidden states 9, 18 and 27 (outputs of decoder layers 9, 18 and 27, before the final norm)
  side by side, 3 x 2560 = 7680 features per row, the DiT's context width;
- all 512 rows, padding included, go to the DiT, which attends to them unmasked (the mask only reaches Qwen3).
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.qwen3_text import Qwen3PromptEncoder

__all__ = ["FLUX2_HIDDEN_LAYERS", "FLUX2_TEXT_LEN", "Flux2TextEncoder"]

FLUX2_HIDDEN_LAYERS = (9, 18, 27)
"""The Qwen3 hidden states klein reads (index 0 is the token embedding); the encoder needs >= 28 layers."""
FLUX2_TEXT_LEN = 512
"""Tokens per prompt, padding included, that reach the DiT."""
ENCODER_DIR, TOKENIZER_DIR = "text_encoder", "tokenizer"


class Flux2TextEncoder(Qwen3PromptEncoder):
    """Qwen3 with klein's settings; `conditioning(prompts)` gives each prompt's (512, 3 * width) context."""

    @classmethod
    def from_pretrained(cls, root: str | Path, *, dtype: torch.dtype = torch.float32,  # type: ignore[override]
                        device: torch.device | str = "cpu", max_length: int = FLUX2_TEXT_LEN) -> "Flux2TextEncoder":
        """Load `root/text_encoder` (Qwen3ForCausalLM or Qwen3Model folder) and `root/tokenizer`."""
        return super().from_pretrained(root, dtype=dtype, device=device, encoder_dir=ENCODER_DIR,
                                       tokenizer_dir=TOKENIZER_DIR, max_length=max_length,
                                       hidden_layers=FLUX2_HIDDEN_LAYERS, enable_thinking=False, keep_padding=True)
