"""The Wan2.1 / Wan2.2 text-to-video DiT with the exact math of `wan/modules/model.py` (docs/wan-model.md).

Read top-down like the paper: timestep sinusoid -> 3D RoPE -> norms -> self-attention ->
cross-attention -> block -> head -> the model. Parameter names are the original checkpoint keys
(`patch_embedding`, `text_embedding.0`, `blocks.N.self_attn.q`, `head.head`, ...), so an original
checkpoint loads with no key map; diffusers folders go through `transformer_keys.diffusers_to_original`.

Precision, as in the release: the residual stream, time embedding, modulation, norms and head run in fp32
whatever the weight dtype; the big matmuls (attention projections, FFN, text embedding, patch
embedding) run in the weight dtype. `WanTransformer.keep_fp32` names the parameters that stay fp32.

Speed (benchmarks/dit_forward.py), with the math unchanged: on CPU every large GEMM multiplies by a
weight prepacked once into the oneDNN (bf16) or MKL (fp32) blocked layout (`PackedLinear` in
models/cpu_linear.py, shared with FLUX: Inductor's weight prepacking done by hand; it costs a second copy
of the weights, see there), the FFN's and text
MLP's first GEMM carries the tanh-GELU in its oneDNN epilogue and bf16 GEMMs take their bias in the
epilogue; RoPE is a real cos/sin table, cached per grid, applied as one complex product with the q/k
RMSNorm scale folded in; RMSNorm takes its scale from one L2-norm pass; the adaLN modulation is the affine
part of the LayerNorm. Measured and dropped on CPU: fusing q/k/v into one GEMM, (B, H, L, D)-contiguous
attention inputs, token-chunked FFN. With autograd recording (training, e.g. `models.wan.tiny.train`), the
GEMMs fall back to F.linear and the residual stream is updated out of place, so the backward runs; the
values equal the inference path's up to rounding (the batched adaLN LayerNorm rounds differently).

Block protocol, for feature caches and context parallelism that must not edit this file:
`state = model.prepare(x, t, context)`, then `h = block(h, state.e0, state.context, state.rope)`
for each of `model.blocks`, then `model.finalize(h, state)`. `begin` / `run_block` / `run_head` /
`to_latents` wrap these in the family-neutral protocol of models/denoiser.py that stages/runner.py
drives. Self- and cross-attention both go through the `attn_fn` seam, with an `AttentionMeta` each.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import AttentionFn, AttentionMeta, auto_attention
from models.conditioning import Conditioning
from models.cpu_linear import PackedLinear, PackedWeights, norm_modulate, residual_add
from models.denoiser import CacheSignal, RopeTables, TokenState
from models.loading import (
    CheckpointError,
    load_safetensors_dir,
    load_strict,
    meta_device,
    save_safetensors_sharded,
)
from models.wan.checkpoint import read_dit_config
from models.wan.config import WAN_LATENT, WanDiTConfig
from models.wan.transformer_keys import diffusers_to_original, original_to_diffusers, strip_original_prefix

logger = logging.getLogger(__name__)

# RopeTables (models.denoiser): (cos, sin), each (L, head_dim // 2) fp32, one angle per token and channel pair.

ROPE_MAX_POSITIONS = 1024
"""Wan's RoPE table has 1024 positions per axis; larger grids do not exist in the reference."""


# ---------------------------------------------------------------------------------------------
# 1. Timestep sinusoid (float64, cos first)
# ---------------------------------------------------------------------------------------------
def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's `sinusoidal_embedding_1d`: t (B,) -> (B, dim) fp32, [cos | sin], computed in float64.

    diffusers computes this in float32, which alone differs by up to 5.6e-5 for t in [0, 999].
    """
    half = dim // 2
    pos = t.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    angles = torch.outer(pos, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


# ---------------------------------------------------------------------------------------------
# 2. 3D RoPE: per-axis frequency ladders, interleaved pairs, float64 angles
# ---------------------------------------------------------------------------------------------
def rope_pairs(head_dim: int) -> tuple[int, int, int]:
    """Channel pairs given to the (t, h, w) axes: (c - 2*(c//3), c//3, c//3) with c = head_dim/2."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _axis_angles(positions: int, pairs: int, device: torch.device | None) -> torch.Tensor:
    """(positions, pairs) float64 angles p * 10000^(-2j / (2*pairs)): each axis has its own ladder."""
    j = torch.arange(pairs, dtype=torch.float64, device=device)
    theta = 1.0 / torch.pow(10000.0, (2 * j) / (2 * pairs))
    return torch.outer(torch.arange(positions, dtype=torch.float64, device=device), theta)


def rope_tables(grid: tuple[int, int, int], head_dim: int, device: torch.device | str | None = None) -> RopeTables:
    """cos/sin tables for every token of a (f, h, w) grid in frame-major order, each (f*h*w, head_dim/2) fp32.

    Token (pf, ph, pw) gets the angles [pf*theta_t, ph*theta_h, pw*theta_w], concatenated. Angles and
    their cos/sin are computed in float64 and cast, as Wan does. A context-parallel rank can slice
    rows [start:end] to get the tables of its own tokens.
    """
    f, h, w = grid
    if max(grid) > ROPE_MAX_POSITIONS:
        raise ValueError(f"token grid {grid} exceeds {ROPE_MAX_POSITIONS} positions per axis, the size of Wan's RoPE "
                         f"table; use a smaller latent")
    device = torch.device(device) if device is not None else None
    pt, ph, pw = rope_pairs(head_dim)
    axes = [(_axis_angles(f, pt, device), (f, 1, 1)), (_axis_angles(h, ph, device), (1, h, 1)),
            (_axis_angles(w, pw, device), (1, 1, w))]
    tables = []
    for fn in (torch.cos, torch.sin):
        parts = [fn(a).float().view(*shape, -1).expand(f, h, w, -1) for a, shape in axes]
        tables.append(torch.cat(parts, dim=-1).reshape(f * h * w, -1))
    return tables[0], tables[1]


def apply_rope(x: torch.Tensor, rope: RopeTables, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) of x (B, L, H, D) by the angles of `rope` (L, D/2).

    Computed in fp32 as one complex product; `scale` (B, L, 1), if given, multiplies every token too
    (it rides along in the small per-token complex factor). Returns fp32.
    """
    cos, sin = rope
    freqs = torch.complex(cos, sin)  # (L, D/2)
    if scale is not None:
        freqs = freqs * scale  # (B, L, D/2)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs.unsqueeze(-2)).flatten(-2)


# ---------------------------------------------------------------------------------------------
# 3. Norms (the fused CPU kernels are in models/cpu_linear.py)
# ---------------------------------------------------------------------------------------------
class WanRMSNorm(nn.Module):
    """RMSNorm over the full width (all heads at once, before the head split), computed in fp32.

    Wan: x / sqrt(mean(x^2) + eps) * weight. Returns fp32; the caller casts to the matmul dtype after
    any further fp32 work. With `rope`, the result is also split into heads and rotated, in one pass.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, rope: RopeTables | None = None, num_heads: int = 1) -> torch.Tensor:
        """x: (B, L, d) -> (B, L, d) fp32, or (B, L, num_heads, d / num_heads) fp32 when `rope` is given."""
        xf = x.float()
        # 1 / rms from the L2 norm: one read pass, where a pow/mean chain writes a full-size temporary.
        inv_rms = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square() / x.shape[-1] + self.eps)
        y = xf.mul_(self.weight) if xf is not x else xf * self.weight  # in place on our own fp32 copy
        if rope is None:
            return y.mul_(inv_rms)
        return apply_rope(y.unflatten(-1, (num_heads, -1)), rope, scale=inv_rms)


# ---------------------------------------------------------------------------------------------
# 4. Attention
# ---------------------------------------------------------------------------------------------
class WanSelfAttention(nn.Module):
    """q/k RMSNorm over all heads, 3D RoPE on q and k, attention through the `attn_fn` seam."""

    def __init__(self, dim: int, num_heads: int, eps: float, attn_fn: AttentionFn, layer: int = 0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = PackedLinear(dim, dim)
        self.k = PackedLinear(dim, dim)
        self.v = PackedLinear(dim, dim)
        self.o = PackedLinear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)
        self.attn_fn = attn_fn
        self.meta = AttentionMeta(layer=layer, kind="self")

    def forward(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        """x: (B, L, d) in the matmul dtype; rope: tables for these L tokens -> (B, L, d) in the matmul dtype."""
        dtype = self.q.weight.dtype
        q = self.norm_q(self.q(x), rope, self.num_heads).to(dtype)
        k = self.norm_k(self.k(x), rope, self.num_heads).to(dtype)
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        out = self.attn_fn(q, k, v, self.meta)
        return self.o(out.flatten(2))


class WanCrossAttention(nn.Module):
    """Attention from video tokens to the text_len text tokens: q/k RMSNorm, no RoPE, no mask.

    (Wan attends to the zero rows past each prompt too: they are keys like the others.)
    """

    def __init__(self, dim: int, num_heads: int, eps: float, attn_fn: AttentionFn, layer: int = 0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = PackedLinear(dim, dim)
        self.k = PackedLinear(dim, dim)
        self.v = PackedLinear(dim, dim)
        self.o = PackedLinear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)
        self.attn_fn = attn_fn
        self.meta = AttentionMeta(layer=layer, kind="cross")

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, L, d), context: (B, text_len, d), both in the matmul dtype -> (B, L, d)."""
        dtype = self.q.weight.dtype
        q = self.norm_q(self.q(x)).to(dtype).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(context)).to(dtype).unflatten(-1, (self.num_heads, -1))
        v = self.v(context).unflatten(-1, (self.num_heads, -1))
        out = self.attn_fn(q, k, v, self.meta)
        return self.o(out.flatten(2))


# ---------------------------------------------------------------------------------------------
# 5. Transformer block
# ---------------------------------------------------------------------------------------------
class WanBlock(nn.Module):
    """`WanAttentionBlock`: modulated self-attention, ungated cross-attention, modulated FFN.

    Modulation order (modulation + e0) is (shift, scale, gate) for attention, then for the FFN.
    """

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float, attn_fn: AttentionFn,
                 layer: int = 0) -> None:
        super().__init__()
        self.eps = eps
        self.self_attn = WanSelfAttention(dim, num_heads, eps, attn_fn, layer)
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True)
        self.cross_attn = WanCrossAttention(dim, num_heads, eps, attn_fn, layer)
        self.ffn = nn.Sequential(PackedLinear(dim, ffn_dim), nn.GELU(approximate="tanh"),
                                 PackedLinear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        """x: (B, L, d) fp32 residual stream; e0: (B, 6, d) fp32; context: (B, text_len, d); rope: (L, head_dim/2).

        Returns a new (B, L, d) fp32 tensor; `x` is not modified (caches may hold it).
        """
        dtype = self.self_attn.q.weight.dtype
        mod = (self.modulation.float() + e0).unsqueeze(2)  # (B, 6, 1, d)
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mod.unbind(1)  # each (B, 1, d)

        # 1. self-attention, gated
        h = norm_modulate(x, shift_a, scale_a, self.eps, dtype)
        x = torch.addcmul(x, self.self_attn(h, rope), gate_a)
        # 2. cross-attention on the affine LayerNorm (norm3), no gate
        h = F.layer_norm(x, x.shape[-1:], self.norm3.weight.float(), self.norm3.bias.float(), self.eps)
        # x is this block's own tensor from here on: `residual_add` updates it in place under inference.
        x = residual_add(x, self.cross_attn(h.to(dtype), context))
        # 3. FFN, gated
        h = norm_modulate(x, shift_f, scale_f, self.eps, dtype)
        return residual_add(x, self.ffn[2](self.ffn[0](h, gelu=True)), gate_f)


# ---------------------------------------------------------------------------------------------
# 6. Head
# ---------------------------------------------------------------------------------------------
class WanHead(nn.Module):
    """Final modulated LayerNorm (from e, the time embedding itself) and projection to patch values."""

    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.head = PackedLinear(dim, out_dim * math.prod(patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x: (B, L, d) fp32; e: (B, d) fp32 -> (B, L, prod(patch) * out_dim) fp32."""
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).unsqueeze(2).unbind(1)  # each (B, 1, d)
        h = norm_modulate(x, shift, scale, self.eps, self.head.weight.dtype)
        return self.head(h).float()


# ---------------------------------------------------------------------------------------------
# 7. The model
# ---------------------------------------------------------------------------------------------
@dataclass
class WanForwardState:
    """Everything the blocks and the head need, computed once per forward by `WanTransformer.prepare`.

    x: (B, L, d) fp32 video tokens, frame-major (index = (i_f*h + i_h)*w + i_w);
    e: (B, d) fp32 time embedding (used by the head); e0: (B, 6, d) fp32 time projection (used by blocks);
    context: (B, text_len, d) embedded text in the matmul dtype; rope: (cos, sin), each (L, head_dim/2) fp32;
    grid: token grid (f, h, w); dtype: dtype of the input latent, returned by `finalize`.
    """

    x: torch.Tensor
    e: torch.Tensor
    e0: torch.Tensor
    context: torch.Tensor
    rope: RopeTables
    grid: tuple[int, int, int]
    dtype: torch.dtype


_FP32_PARAMS = re.compile(r"^(time_embedding|time_projection|head)\.|\.modulation$|\.norm3\.|\.norm_[qk]\.")


class WanTransformer(PackedWeights, nn.Module):
    """Wan2.1 DiT (`WanModel`, T2V); the Wan2.2 A14B experts are two instances of the same class.

    config: network shape; attn_fn: the self-attention function, (B, L, H, D) layout (the seam that
    context parallelism swaps). Use `from_pretrained` for checkpoints; `cast_weights` for bf16.
    `PackedWeights` adds `set_weight_prepacking`, `release_packed_weights` and `packed_weight_bytes`.
    """

    latent = WAN_LATENT
    """The Wan-VAE latents it denoises."""

    def __init__(self, config: WanDiTConfig, attn_fn: AttentionFn = auto_attention) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        # 1. patch embedding
        self.patch_embedding = nn.Conv3d(config.in_dim, d, kernel_size=config.patch_size, stride=config.patch_size)
        # 2. text and time embeddings
        self.text_embedding = nn.Sequential(PackedLinear(config.text_dim, d), nn.GELU(approximate="tanh"),
                                            PackedLinear(d, d))
        self.time_embedding = nn.Sequential(PackedLinear(config.freq_dim, d), nn.SiLU(), PackedLinear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), PackedLinear(d, 6 * d))
        # 3. blocks
        self.blocks = nn.ModuleList(
            WanBlock(d, config.ffn_dim, config.num_heads, config.eps, attn_fn, layer)
            for layer in range(config.num_layers)
        )
        # 4. head
        self.head = WanHead(d, config.out_dim, config.patch_size, config.eps)

    # ---- precision policy ----
    @classmethod
    def keep_fp32(cls, name: str) -> bool:
        """True for parameters that stay fp32 under bf16 weights (time MLPs, modulations, norms, head).

        Usable as the `keep_fp32` callback of `models.loading.load_strict`.
        """
        return _FP32_PARAMS.search(name) is not None

    def set_attention(self, attn_fn: AttentionFn) -> None:
        """Swap the attention function (self- and cross-attention) of every block: the seam that context
        parallelism, attention backends and feature caches use."""
        for block in self.blocks:
            block.self_attn.attn_fn = attn_fn
            block.cross_attn.attn_fn = attn_fn

    # ---- block protocol ----
    def rope(self, grid: tuple[int, int, int], device: torch.device | str | None = None) -> RopeTables:
        """RoPE tables (cos, sin), each (f*h*w, head_dim/2) fp32, for a token grid; shared, do not modify in place."""
        key = (tuple(grid), torch.device(device) if device is not None else None)
        cached = self.__dict__.get("_rope_cache")
        if cached is None or cached[0] != key:
            # The same grid comes back every step: keep the last tables (a plain attribute, not a buffer).
            # Their ~15 tiny float64 ops cost milliseconds each when another process holds a core.
            with torch.inference_mode(False):  # normal tensors, usable later with autograd too
                cached = self._rope_cache = (key, rope_tables(grid, self.config.head_dim, device))
        return cached[1]

    def prepare(self, x: torch.Tensor, t: torch.Tensor | float | int,
                context: torch.Tensor | Sequence[torch.Tensor]) -> WanForwardState:
        """Embed latents, timesteps and text (steps 1-2 of the forward).

        x: (B, in_dim, F, H, W) latents; t: (B,) timesteps in [0, 1000] (int or float; a scalar applies to
        all samples); context: (B, L, text_dim) with L <= text_len (rows past each prompt's real length
        must be zero), or a list of B tensors (L_i, text_dim). Zero-padded to text_len and not masked.
        """
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_dim:
            raise ValueError(f"latents must be (B, {cfg.in_dim}, F, H, W), got {tuple(x.shape)}")
        batch, _, frames, height, width = x.shape
        pt, ph, pw = cfg.patch_size
        if frames % pt or height % ph or width % pw:
            raise ValueError(f"latent (F, H, W) = {(frames, height, width)} must be divisible by the patch size "
                             f"{cfg.patch_size}; crop or pad the latent (pixel sizes must be multiples of 16)")
        grid = (frames // pt, height // ph, width // pw)
        rope = self.rope(grid, x.device)  # checks the grid size first

        # 1. patch embedding: Conv3d with kernel = stride = patch, i.e. one linear map per patch
        weight = self.patch_embedding.weight
        patches = x.to(weight.dtype).reshape(batch, cfg.in_dim, grid[0], pt, grid[1], ph, grid[2], pw)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(batch, math.prod(grid), -1)
        tokens = F.linear(patches, weight.flatten(1), self.patch_embedding.bias).float()

        # 2. time embedding (fp32) and text embedding (matmul dtype)
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}; Wan2.2 T2V's "
                             f"per-token t is constant per sample, so pass one value per sample")
        emb = timestep_sinusoid(t, cfg.freq_dim)
        e = self.time_embedding[2](F.silu(self.time_embedding[0](emb))).float()
        e0 = self.time_projection[1](F.silu(e)).float().unflatten(1, (6, cfg.dim))
        ctx = self._pad_context(context, batch, x.device)
        ctx = self.text_embedding[2](self.text_embedding[0](ctx, gelu=True))
        return WanForwardState(x=tokens, e=e, e0=e0, context=ctx, rope=rope, grid=grid, dtype=x.dtype)

    def _pad_context(self, context: torch.Tensor | Sequence[torch.Tensor], batch: int,
                     device: torch.device) -> torch.Tensor:
        """(B, text_len, text_dim) with zero rows after each prompt, as Wan feeds its text MLP."""
        cfg = self.config
        rows = list(context.unbind(0)) if isinstance(context, torch.Tensor) and context.ndim == 3 else context
        if isinstance(rows, torch.Tensor) or len(rows) != batch:
            shape = tuple(context.shape) if isinstance(context, torch.Tensor) else f"a list of {len(rows)}"
            raise ValueError(f"context must be (B={batch}, L, {cfg.text_dim}) or a list of {batch} (L_i, "
                             f"{cfg.text_dim}) tensors, got {shape}")
        out = torch.zeros(batch, cfg.text_len, cfg.text_dim, dtype=self.text_embedding[0].weight.dtype, device=device)
        for i, row in enumerate(rows):
            if row.ndim != 2 or row.shape[1] != cfg.text_dim:
                raise ValueError(f"context[{i}] must be (L, {cfg.text_dim}), got {tuple(row.shape)}")
            if row.shape[0] > cfg.text_len:
                raise ValueError(f"context[{i}] has {row.shape[0]} tokens, more than text_len={cfg.text_len}; "
                                 f"truncate the prompt embedding to {cfg.text_len} tokens")
            out[i, : row.shape[0]] = row
        return out

    def finalize(self, x: torch.Tensor, state: WanForwardState) -> torch.Tensor:
        """Head and unpatchify (step 4): x (B, L, d) fp32 -> velocity (B, out_dim, F, H, W) in state.dtype."""
        return self.unpatchify(self.head(x, state.e), state.grid).to(state.dtype)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, f*h*w, pt*ph*pw*C) patch values, channel fastest -> (B, C, f*pt, h*ph, w*pw)."""
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], x.shape[1], f * pt, h * ph, w * pw)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float | int,
                context: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Flow velocity for latents x (B, in_dim, F, H, W) at timesteps t (B,): same shape and dtype as x.

        See `prepare` for the accepted t and context forms.
        """
        state = self.prepare(x, t, context)  # 1-2. embeddings
        h = state.x
        for block in self.blocks:  # 3. blocks
            h = block(h, state.e0, state.context, state.rope)
        return self.finalize(h, state)  # 4. head, unpatchify

    # ---- the family-neutral block protocol (models/denoiser.py), what stages/runner.py drives ----
    def begin(self, latents: torch.Tensor, t: torch.Tensor, conditioning: Sequence[Conditioning],
              guidance: torch.Tensor | None = None) -> TokenState:
        """`prepare` on one context per branch; Wan has no joint text stream and no guidance input."""
        if guidance is not None:
            raise ValueError("Wan takes no guidance input: its guidance is classifier-free (two branches)")
        state = self.prepare(latents, t, [c.context for c in conditioning])
        return TokenState(img=state.x, txt=None, rope=state.rope, text_len=0, model=state)

    def run_block(self, block: WanBlock, img: torch.Tensor, txt: None,
                  state: TokenState) -> tuple[torch.Tensor, None]:
        return block(img, state.model.e0, state.model.context, state.rope), None

    def run_head(self, img: torch.Tensor, state: TokenState) -> torch.Tensor:
        return self.head(img, state.model.e)

    def to_latents(self, patches: torch.Tensor, state: TokenState) -> torch.Tensor:
        return self.unpatchify(patches, state.model.grid).to(state.model.dtype)

    CACHE_SIGNALS = ("time_embedding", "time_projection")

    def cache_signal(self, state: TokenState, name: str) -> CacheSignal:
        """time_embedding: e (B, d), the timestep embedding; time_projection: e0 (B, 6, d), the blocks' shared
        modulation (the indicators of TeaCache's Wan modes). Both are per sample, the same on every rank."""
        if name not in self.CACHE_SIGNALS:
            raise ValueError(f"Wan has no cache signal {name!r}; its signals are {', '.join(self.CACHE_SIGNALS)}")
        return CacheSignal(state.model.e if name == "time_embedding" else state.model.e0, per_token=False)

    # ---- checkpoints ----
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                        attn_fn: AttentionFn = auto_attention) -> "WanTransformer":
        """Load an original Wan folder (config.json `_class_name: WanModel` + diffusion_pytorch_model*.safetensors)
        or a diffusers `transformer/` folder (`WanTransformer3DModel`, or a pipeline root holding one).

        Built on the meta device and filled by a strict load: missing, unexpected or mis-shaped keys raise
        `CheckpointError` naming the keys and the file. `dtype` applies to all but the `keep_fp32` parameters.
        """
        folder = Path(path)
        if not (folder / "config.json").is_file() and (folder / "transformer" / "config.json").is_file():
            folder = folder / "transformer"
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"no config.json in {folder}; expected an original Wan DiT folder or a diffusers "
                                  f"transformer/ folder")
        config, layout = read_dit_config(folder)
        sd, source = load_safetensors_dir(folder)
        sd = diffusers_to_original(sd) if layout == "diffusers" else strip_original_prefix(sd)
        with meta_device():
            model = cls(config, attn_fn=attn_fn)
        model = load_strict(model, sd, source, dtype=dtype, keep_fp32=cls.keep_fp32, device=device)
        logger.info("loaded %s DiT (%d layers, dim %d) from %s as %s", layout, config.num_layers, config.dim,
                    source, dtype)
        return model

    def save_pretrained(self, folder: str | Path, layout: str = "original", max_shard_bytes: int | None = None) -> None:
        """Write config.json and diffusion_pytorch_model*.safetensors in the original or the diffusers layout."""
        if layout not in ("original", "diffusers"):
            raise ValueError(f"layout must be 'original' or 'diffusers', got {layout!r}")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach() for k, v in self.state_dict().items()}
        if layout == "original":
            config = self.config.to_original_json()
        else:
            sd = original_to_diffusers(sd)
            config = self.config.to_diffusers_json()
        save_safetensors_sharded(sd, folder, max_shard_bytes=max_shard_bytes)
        (folder / "config.json").write_text(json.dumps(config, indent=2))

