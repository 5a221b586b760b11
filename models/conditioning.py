"""The text conditioning of one prompt, as named tensors: what a family's text encoder gives its denoiser.

It travels from the text-encode pool to the DiT pool through the object store as plain CPU tensors, so it
is kept apart from both stages and imports nothing but torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """One prompt's conditioning, CPU float32 (mask: bool).

    context: (L, text_dim) sequence embeddings (cut to the real length by families that pad themselves,
    e.g. Wan; full length by families that feed padded rows, e.g. FLUX's T5 with 512 tokens);
    pooled: (pooled_dim,) a pooled text vector (FLUX's CLIP), or None;
    mask: (L,) True for real tokens, for families whose attention masks padded text (Qwen-Image), or None.
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Conditioning":
        """The same conditioning on `device` (floating tensors cast to `dtype` when given)."""
        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            return x.to(device, dtype) if dtype is not None and x.is_floating_point() else x.to(device)
        return Conditioning(move(self.context), move(self.pooled), move(self.mask))

    def to_numpy(self) -> dict[str, object]:
        """Named numpy arrays (None kept): the picklable form for actors that should not need torch types."""
        return {name: None if value is None else value.numpy()
                for name, value in (("context", self.context), ("pooled", self.pooled), ("mask", self.mask))}

    @classmethod
    def from_numpy(cls, arrays: dict[str, object]) -> "Conditioning":
        """Inverse of `to_numpy`."""
        def tensor(name: str) -> torch.Tensor | None:
            value = arrays.get(name)
            return None if value is None else torch.tensor(value)  # a copy: object-store arrays are read-only
        context = tensor("context")
        if context is None:
            raise ValueError("conditioning needs a 'context' array")
        return cls(context, tensor("pooled"), tensor("mask"))
