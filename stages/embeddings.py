"""The text conditioning that flows from the text-encode stage to the denoise stage.

Kept apart from both stages so a DiT process can import it without loading transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.conditioning import Conditioning


@dataclass
class PromptEmbeddings:
    """One request's conditioning: the prompt's, and the negative prompt's or None when unguided.

    A bare tensor is taken as the conditioning's `context` (Wan's only tensor).
    """

    positive: Conditioning
    negative: Conditioning | None

    def __post_init__(self) -> None:
        if isinstance(self.positive, torch.Tensor):
            self.positive = Conditioning(self.positive)
        if isinstance(self.negative, torch.Tensor):
            self.negative = Conditioning(self.negative)

    @property
    def branches(self) -> list[Conditioning]:
        """[positive] or [positive, negative]: the CFG batch order."""
        return [self.positive] if self.negative is None else [self.positive, self.negative]
