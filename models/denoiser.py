"""The block protocol every family's DiT exposes, so one runner drives them all (stages/runner.py).

A forward is `begin` (patch, time and text embedding: token-local and cheap), then each of `blocks` through
`run_block`, then `run_head` (final layer, token-local) and `to_latents` (unpatchify). The runner, context parallelism and feature caches
see only `TokenState`: the image/video tokens (what context parallelism shards), the text tokens of a
joint stream (replicated), and the RoPE rows of the joint sequence (text rows first). Whatever else a
family's forward needs rides along in `TokenState.model`, untouched by the runner.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol, Sequence

import torch
from torch import nn

from models.attention import AttentionFn
from models.conditioning import Conditioning
from models.family import LatentGeometry

RopeTables = tuple[torch.Tensor, torch.Tensor]
"""(cos, sin) per token of a sequence, each (L, rope width) fp32; the one RoPE table type of every family."""


@dataclass
class TokenState:
    """One forward's token streams between `begin` and `end`.

    img: (B, N, d) image or video tokens; txt: (B, L, d) text tokens of a joint stream (FLUX), None where
    text enters through cross-attention only (Wan); rope: per-token tables, each (text_len + N, ...), text
    rows first; text_len: rows of `rope` that belong to text (0 without a joint stream); model: the
    family's own forward state (time embeddings, grid, ...).
    """

    img: torch.Tensor
    txt: torch.Tensor | None
    rope: RopeTables
    text_len: int
    model: Any

    def with_tokens(self, img: torch.Tensor, rope: RopeTables) -> "TokenState":
        """The same state over other image tokens and their RoPE rows (a context-parallel shard)."""
        return replace(self, img=img, rope=rope)


@dataclass(frozen=True)
class CacheSignal:
    """A per-step tensor a feature cache compares between steps (e.g. TeaCache's timestep-modulated input).

    values: (B, ...) one row per branch; per_token: dim 1 runs over this rank's image tokens (a shard under
    context parallelism, padded at its end), else the tensor is the same on every rank.
    """

    values: torch.Tensor
    per_token: bool


class BlockDenoiser(Protocol):
    """What a family's DiT module offers the runner (WanTransformer, FluxTransformer, ...).

    latent: the geometry of the latents it denoises (its family's VAE), for the seeded noise.
    """

    latent: LatentGeometry

    @property
    def blocks(self) -> Sequence[nn.Module]: ...

    def begin(self, latents: torch.Tensor, t: torch.Tensor, conditioning: Sequence[Conditioning],
              guidance: torch.Tensor | None) -> TokenState:
        """latents (B, C, ...) of one request's branches, t (B,) = 1000 * sigma, one conditioning per
        branch, guidance (B,) the distilled guidance scale (None unless the family takes one)."""

    def run_block(self, block: nn.Module, img: torch.Tensor, txt: torch.Tensor | None,
                  state: TokenState) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One block on (img, txt) with `state.rope`; returns new tensors (the inputs are left alone)."""

    def run_head(self, img: torch.Tensor, state: TokenState) -> torch.Tensor:
        """The final layer on image tokens (token-local, so it runs on a shard): (B, n, patch values) fp32."""

    def to_latents(self, patches: torch.Tensor, state: TokenState) -> torch.Tensor:
        """Patch values of the whole image-token sequence -> the velocity, shaped and typed like the latents."""

    def set_attention(self, attn_fn: AttentionFn) -> None: ...

    def cache_signal(self, state: TokenState, name: str) -> CacheSignal:
        """One of the family's named per-step signals for feature caches (`ModelDescription.teacache` names
        which one each TeaCache mode reads); ValueError naming the family's signals for another name."""
