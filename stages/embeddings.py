"""The text conditioning that flows from the text-encode stage to the denoise stage.

Kept apart from both stages so a DiT process can import it without loading transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptEmbeddings:
    """One request's text conditioning; tensors are CPU float32, cut to their real length.

    positive: (L_pos, text_dim); negative: (L_neg, text_dim), or None when guidance is off.
    """

    positive: torch.Tensor
    negative: torch.Tensor | None
