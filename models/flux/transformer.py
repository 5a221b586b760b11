"""The FLUX.1-dev / FLUX.1-schnell DiT with the exact math of BFL's `Flux` (= diffusers `FluxTransformer2DModel`).

Read top-down: timestep sinusoid -> 3-axis RoPE -> modulation -> joint attention -> double-stream block ->
single-stream block -> final layer -> latent packing -> the model. Parameter names are the original BFL keys
(`img_in`, `double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, `final_layer.adaLN_modulation.1`, ...),
so `flux1-dev.safetensors` loads with no key map; diffusers folders go through
`transformer_keys.diffusers_to_original` (fuses q/k/v, swaps the final modulation halves).

Conventions (both references agree): the model gets t = 1000 * sigma (BFL multiplies sigma by 1000 in its
sinusoid; diffusers' pipeline passes sigma and its model multiplies by 1000), and dev's guidance input is the
guidance value itself (e.g. 3.5), multiplied by 1000 before its sinusoid. Text tokens come first in every
joint sequence, then image tokens; text positions are (0, 0, 0), image token (row, col) has (0, row, col).

Precision: the residual streams (image and text tokens), the conditioning vector, the modulations, norms,
RoPE and the final layer run in fp32 whatever the weight dtype; the large matmuls (qkv, projections, MLPs,
modulation linears, embedders of latents and text) run in the weight dtype. `FluxTransformer.keep_fp32`
names the parameters that stay fp32 under bf16 weights (the small time/guidance/pooled embedders, the qk-norm
scales and the final layer). RoPE frequencies are float64 then cast, as diffusers does on CPU. t and guidance
enter the sinusoid in fp32: with bf16 activations both references round 1000 * sigma to bf16 first (e.g.
123.456 -> 123.5); the fp32 value is the one they compute in fp32, the setting the parity tests pin.

Speed (benchmarks/dit_forward.py --family flux), with the math unchanged: on CPU every GEMM of at least 32 rows
multiplies by a weight prepacked once (`PackedLinear` in models/cpu_linear.py, shared with Wan; a second copy
of the weights), the MLPs' first GEMM carries the tanh-GELU in its epilogue, the single block runs its two
fused layers as GEMMs over their row / column blocks (`PackedLinear.part`: the GELU in linear1's MLP
epilogue, linear2 without concatenating its input), the joint q/k/v are written straight into one head-major
buffer (no concatenation, the layout CPU SDPA reads fastest), the adaLN modulation is the affine part of the
LayerNorm, RoPE is one complex product with its tables cached per (text_len, grid), and without autograd the
residual streams are updated in place once a block has made its own copy (the block's inputs are never
written). With autograd recording, all of this falls back to the plain out-of-place ops.

Block protocol, for block-loop runners, feature caches and context parallelism that must not edit this file:
`state = model.prepare(latents, t, context, pooled, guidance)`, then
`img, txt = block(img, txt, state.vec, state.rope)` for each of `model.blocks` (the double-stream blocks,
then the single-stream ones: both kinds take and return the two streams), starting from
`img, txt = state.img, state.txt`, then `model.finalize(img, state)`. `state.rope` covers the joint sequence,
text rows first (`state.text_len` of them); a context-parallel rank slices the image rows and swaps `attn_fn`.
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
from models.dit_ops import pack_latents, unpack_latents
from models.flux.checkpoint import ORIGINAL_DIT_FILES, resolve_dit
from models.flux.config import FLUX_LATENT, FluxDiTConfig
from models.flux.transformer_keys import diffusers_to_original, original_to_diffusers, strip_original_prefix
from models.loading import (
    CheckpointError,
    load_safetensors_dir,
    load_safetensors_file,
    load_strict,
    meta_device,
    save_safetensors_sharded,
)

logger = logging.getLogger(__name__)

# RopeTables (models.denoiser): (cos, sin), each (S, head_dim // 2) fp32, one angle per token and channel pair.

TIME_CHANNELS = 256
"""Width of the timestep / guidance sinusoid (BFL `timestep_embedding(t, 256)`)."""

NORM_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# 1. Timestep sinusoid (fp32, cos first)
# ---------------------------------------------------------------------------------------------
def timestep_sinusoid(t: torch.Tensor, dim: int = TIME_CHANNELS) -> torch.Tensor:
    """(B,) already scaled by 1000 -> (B, dim) fp32 [cos | sin] with frequencies exp(-ln(10000) * i / (dim/2)).

    Computed in fp32 in the references' operation order (frequencies first, then t * f), so it is bitwise theirs.
    """
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


# ---------------------------------------------------------------------------------------------
# 2. RoPE over 3 position axes: interleaved pairs, float64 frequencies
# ---------------------------------------------------------------------------------------------
def position_ids(text_len: int, grid: tuple[int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """(text_len + h*w, 3) fp32 ids of the joint sequence: text (0, 0, 0), then image (0, row, col) row-major."""
    h, w = grid
    img = torch.zeros(h, w, 3, device=device)
    img[..., 1] = torch.arange(h, device=device)[:, None]
    img[..., 2] = torch.arange(w, device=device)[None, :]
    return torch.cat([torch.zeros(text_len, 3, device=device), img.reshape(h * w, 3)], dim=0)


def rope_tables(ids: torch.Tensor, axes_dims: tuple[int, ...], theta: int) -> RopeTables:
    """cos/sin tables (S, sum(axes_dims)/2) fp32 for position ids (S, n_axes).

    Axis i rotates its axes_dims[i]/2 channel pairs by pos * theta^(-2j/axes_dims[i]); the axes are concatenated.
    Angles in float64 (fp32 positions times float64 frequencies), cos/sin cast to fp32, as diffusers on CPU.
    """
    pos = ids.float()
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim))
        angles = torch.outer(pos[:, axis], freqs)
        cos.append(angles.cos().float())
        sin.append(angles.sin().float())
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def apply_rope(x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) of x (B, S, H, D) by the angles of `rope` (S, D/2), in fp32.

    One complex product (x[2j] + i x[2j+1]) * (cos + i sin): the same multiplies and adds as the rotation
    written out (bit-identical), in one pass instead of six.
    """
    cos, sin = rope
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * torch.complex(cos, sin)[:, None, :]).flatten(-2)


# ---------------------------------------------------------------------------------------------
# 3. Embedders, modulation and norms
# ---------------------------------------------------------------------------------------------
class MLPEmbedder(nn.Module):
    """Lin -> SiLU -> Lin (BFL `MLPEmbedder`: time_in, guidance_in, vector_in); returns fp32."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_layer = PackedLinear(in_dim, hidden)
        self.out_layer = PackedLinear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x))).float()


class Modulation(nn.Module):
    """n (shift, scale, gate) triples from the conditioning vector: Lin(SiLU(vec)) -> n*3 chunks of (B, 1, d) fp32."""

    def __init__(self, dim: int, triples: int) -> None:
        super().__init__()
        self.chunks = 3 * triples
        self.lin = PackedLinear(dim, self.chunks * dim)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec)).float()[:, None, :].chunk(self.chunks, dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """LN(x) * (1 + scale) + shift computed in fp32 (non-affine LayerNorm, eps 1e-6), cast to the matmul `dtype`.

    The modulation runs as the affine part of the LayerNorm (`norm_modulate`): one pass over x instead of three.
    """
    return norm_modulate(x.float(), shift, scale, NORM_EPS, dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learned scale (BFL names it `.scale`), computed in fp32, eps 1e-6."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 1 / rms from the L2 norm (one read pass; F.rms_norm on CPU writes a new tensor per step), then the
        # fp32 copy of a bf16 x is scaled in place: 3.9x faster for a (1, 1536, 24, 128) q, same values to 1 ulp
        xf = x.float()
        inv_rms = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1])
                              .add_(NORM_EPS))
        if xf is x or torch.is_grad_enabled():
            return xf * inv_rms * self.scale.float()
        return xf.mul_(inv_rms).mul_(self.scale)


class QKNorm(nn.Module):
    """Per-head RMSNorm of q and k over head_dim (BFL `QKNorm`)."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)


# ---------------------------------------------------------------------------------------------
# 4. Joint attention: text tokens first, RoPE on q and k, one attention over the joint sequence
# ---------------------------------------------------------------------------------------------
def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, S, 3*d) fused projection, rows q|k|v each head-major -> q, k, v (B, S, H, D)."""
    return qkv.unflatten(-1, (3, num_heads, -1)).unbind(2)


def joint_attention(qs: list[torch.Tensor], ks: list[torch.Tensor], vs: list[torch.Tensor], rope: RopeTables,
                    attn_fn: AttentionFn, layer: int, text_len: int) -> torch.Tensor:
    """Attention over the concatenation of the streams' tokens, text rows first -> (B, S, H*D) in v's dtype.

    qs, ks: each stream's normed q and k (fp32, (B, S_i, H, D)), vs its v, in sequence order: the double block
    passes [text, image], the single block its one joint stream. RoPE rotates q and k, then `attn_fn` runs.
    """
    dtype = vs[0].dtype
    meta = AttentionMeta(layer=layer, kind="joint", text_len=text_len)
    out = attn_fn(joined_heads(qs, dtype, rope), joined_heads(ks, dtype, rope), joined_heads(vs, dtype), meta)
    return out.flatten(2)


def joined_heads(parts: list[torch.Tensor], dtype: torch.dtype, rope: RopeTables | None = None) -> torch.Tensor:
    """torch.cat(parts, 1) in `dtype`, each part rotated by its rows of `rope` first -> (B, S, H, D).

    Written straight into one buffer (no separate concatenation pass), stored head-major, (B, H, S, D) in
    memory: the layout CPU SDPA reads fastest (about 8% faster at FLUX's shapes than token-major).
    """
    batch, _, heads, head_dim = parts[0].shape
    total = sum(part.shape[1] for part in parts)
    out = torch.empty(batch, heads, total, head_dim, dtype=dtype, device=parts[0].device).transpose(1, 2)
    start = 0
    for part in parts:
        stop = start + part.shape[1]
        out[:, start:stop] = part if rope is None else apply_rope(part, (rope[0][start:stop], rope[1][start:stop]))
        start = stop
    return out


class SelfAttention(nn.Module):
    """One stream's attention weights in a double block (BFL `SelfAttention`: qkv, norm, proj)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = PackedLinear(dim, 3 * dim)
        self.norm = QKNorm(dim // num_heads)
        self.proj = PackedLinear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Modulated tokens (B, S, d) -> normed q, k (fp32) and v (weight dtype), each (B, S, H, D)."""
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        return self.norm.query_norm(q), self.norm.key_norm(k), v


def _mlp(hidden: int, dim: int) -> nn.Sequential:
    return nn.Sequential(PackedLinear(dim, hidden), nn.GELU(approximate="tanh"), PackedLinear(hidden, dim))


def _run_mlp(mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Lin -> GELU(tanh) -> Lin in the weight dtype; on CPU the GELU runs in the first GEMM's epilogue."""
    return mlp[2](mlp[0](x, gelu=True))


# ---------------------------------------------------------------------------------------------
# 5. Double-stream block: separate weights per stream, one joint attention
# ---------------------------------------------------------------------------------------------
class DoubleStreamBlock(nn.Module):
    """BFL `DoubleStreamBlock` (diffusers `FluxTransformerBlock`)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, attn_fn: AttentionFn, layer: int = 0) -> None:
        super().__init__()
        self.attn_fn = attn_fn
        self.layer = layer
        self.img_mod = Modulation(dim, 2)
        self.img_attn = SelfAttention(dim, num_heads)
        self.img_mlp = _mlp(mlp_hidden, dim)
        self.txt_mod = Modulation(dim, 2)
        self.txt_attn = SelfAttention(dim, num_heads)
        self.txt_mlp = _mlp(mlp_hidden, dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
                rope: RopeTables) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, N, d), txt (B, L, d) fp32; vec (B, d) fp32; rope over L + N rows -> new (img, txt) fp32."""
        dtype = self.img_attn.qkv.weight.dtype
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)
        # 1. joint attention over cat(text, image)
        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(img, img_shift1, img_scale1, dtype))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(txt, txt_shift1, txt_scale1, dtype))
        text_len = txt.shape[1]
        attn = joint_attention([txt_q, img_q], [txt_k, img_k], [txt_v, img_v], rope, self.attn_fn, self.layer,
                               text_len)
        txt_attn, img_attn = attn[:, :text_len], attn[:, text_len:]
        # 2. gated residuals: attention, then the MLP, per stream. The first sum makes the block's own
        # fp32 tensors (the inputs stay untouched); `residual_add` then updates those in place.
        img = torch.addcmul(img, self.img_attn.proj(img_attn), img_gate1)
        img = residual_add(img, _run_mlp(self.img_mlp, modulate(img, img_shift2, img_scale2, dtype)), img_gate2)
        txt = torch.addcmul(txt, self.txt_attn.proj(txt_attn), txt_gate1)
        txt = residual_add(txt, _run_mlp(self.txt_mlp, modulate(txt, txt_shift2, txt_scale2, dtype)), txt_gate2)
        return img, txt


# ---------------------------------------------------------------------------------------------
# 6. Single-stream block: one sequence, attention and MLP in parallel from one fused projection
# ---------------------------------------------------------------------------------------------
class SingleStreamBlock(nn.Module):
    """BFL `SingleStreamBlock` (diffusers `FluxSingleTransformerBlock`) on cat(text, image).

    linear1 holds q, k, v and the MLP input (rows [d, d, d, mlp_hidden]); linear2 maps cat(attention, MLP) back.
    Takes and returns the two streams, like the double block, so block loops treat both kinds alike.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, attn_fn: AttentionFn, layer: int = 0) -> None:
        super().__init__()
        self.attn_fn = attn_fn
        self.layer = layer
        self.num_heads = num_heads
        self.dim = dim
        self.mlp_hidden = mlp_hidden
        self.linear1 = PackedLinear(dim, 3 * dim + mlp_hidden)
        self.linear2 = PackedLinear(dim + mlp_hidden, dim)
        self.norm = QKNorm(dim // num_heads)
        self.modulation = Modulation(dim, 1)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
                rope: RopeTables) -> tuple[torch.Tensor, torch.Tensor]:
        """Same arguments and results as `DoubleStreamBlock.forward`; works on cat(txt, img) inside."""
        text_len = txt.shape[1]
        x = torch.cat([txt, img], dim=1)
        shift, scale, gate = self.modulation(vec)
        h = modulate(x, shift, scale, self.linear1.weight.dtype)
        qkv_rows, attn_cols = slice(0, 3 * self.dim), slice(0, self.dim)
        # linear1 -> (qkv, mlp) and gelu(mlp), as two GEMMs over linear1's row blocks (the GELU in the epilogue)
        q, k, v = split_heads(self.linear1.part(h, qkv_rows), self.num_heads)
        mlp = self.linear1.part(h, slice(qkv_rows.stop, None), gelu=True)
        attn = joint_attention([self.norm.query_norm(q)], [self.norm.key_norm(k)], [v], rope, self.attn_fn,
                               self.layer, text_len)
        # linear2(cat(attn, mlp)) as two GEMMs over linear2's column blocks, the second adding the first
        out = self.linear2.part(attn, cols=attn_cols)
        out = self.linear2.part(mlp, cols=slice(attn_cols.stop, None), bias=False, accumulate=out)
        x = residual_add(x, out, gate)  # x is the block's own concatenation: in place under inference
        return x[:, text_len:], x[:, :text_len]


# ---------------------------------------------------------------------------------------------
# 7. Final layer
# ---------------------------------------------------------------------------------------------
class LastLayer(nn.Module):
    """Modulated LayerNorm and projection to packed patch values; the modulation is ordered (shift, scale)."""

    def __init__(self, dim: int, out_channels: int) -> None:
        super().__init__()
        self.linear = PackedLinear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), PackedLinear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation[1](F.silu(vec)).float()[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(x, shift, scale, self.linear.weight.dtype)).float()


# 8. The model
# ---------------------------------------------------------------------------------------------
@dataclass
class FluxForwardState:
    """What the blocks and the final layer need, computed once per forward by `FluxTransformer.prepare`.

    img: (B, N, d) fp32 image tokens (row-major on the grid); txt: (B, L, d) fp32 text tokens;
    vec: (B, d) fp32 conditioning (time + guidance + pooled text); rope: tables over the joint sequence, text
    rows first; text_len: L; grid: packed token grid (h, w) = (H/16, W/16) in pixels; dtype: the latents' dtype.
    """

    img: torch.Tensor
    txt: torch.Tensor
    vec: torch.Tensor
    rope: RopeTables
    text_len: int
    grid: tuple[int, int]
    dtype: torch.dtype


Block = DoubleStreamBlock | SingleStreamBlock

_FP32_PARAMS = re.compile(r"^(time_in|guidance_in|vector_in|final_layer)\.|\.(query|key)_norm\.scale$")


class FluxTransformer(PackedWeights, nn.Module):
    """FLUX.1-dev (with the guidance embedding) or FLUX.1-schnell (without).

    config: network shape; attn_fn: the attention function, (B, L, H, D) layout (the seam that context
    parallelism swaps). Use `from_pretrained` for checkpoints.
    """

    latent = FLUX_LATENT
    """The FLUX.1 VAE latents it denoises."""

    def __init__(self, config: FluxDiTConfig, attn_fn: AttentionFn = auto_attention) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        # 1. embedders
        self.img_in = PackedLinear(config.in_channels, d)
        self.time_in = MLPEmbedder(TIME_CHANNELS, d)
        self.vector_in = MLPEmbedder(config.pooled_dim, d)
        if config.guidance_embed:
            self.guidance_in = MLPEmbedder(TIME_CHANNELS, d)
        self.txt_in = PackedLinear(config.context_dim, d)
        # 2. blocks
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(d, config.num_heads, config.mlp_hidden, attn_fn, layer)
            for layer in range(config.num_double_blocks)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(d, config.num_heads, config.mlp_hidden, attn_fn, config.num_double_blocks + layer)
            for layer in range(config.num_single_blocks)
        )
        # 3. final layer
        self.final_layer = LastLayer(d, config.in_channels)

    # ---- precision policy ----
    @classmethod
    def keep_fp32(cls, name: str) -> bool:
        """True for parameters that stay fp32 under bf16 weights (the `load_strict` keep_fp32 callback)."""
        return _FP32_PARAMS.search(name) is not None

    def set_attention(self, attn_fn: AttentionFn) -> None:
        """Swap the attention function of every block (the context-parallel seam)."""
        for block in self.blocks:
            block.attn_fn = attn_fn

    # ---- block protocol ----
    @property
    def blocks(self) -> list[Block]:
        """Every block in forward order: the double-stream blocks, then the single-stream ones."""
        return [*self.double_blocks, *self.single_blocks]

    def rope(self, text_len: int, grid: tuple[int, int], device: torch.device | str | None = None) -> RopeTables:
        """RoPE tables over the joint sequence (text rows first) for `text_len` and a token grid; shared, read-only.

        The same sizes come back every step: the last tables are kept (a plain attribute, not a buffer).
        """
        key = (text_len, tuple(grid), torch.device(device) if device is not None else None)
        cached = self.__dict__.get("_rope_cache")
        if cached is None or cached[0] != key:
            with torch.inference_mode(False):  # normal tensors, usable later with autograd too
                tables = rope_tables(position_ids(text_len, grid, device), self.config.axes_dims_rope,
                                     self.config.theta)
            cached = self._rope_cache = (key, tables)
        return cached[1]

    def prepare(self, latents: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor, pooled: torch.Tensor,
                guidance: torch.Tensor | float | None = None) -> FluxForwardState:
        """Pack and embed the latents, embed time (+ guidance) and text, build the RoPE tables.

        latents: (B, latent_channels, H/8, W/8) with even sizes; t: (B,) or scalar, 1000 * sigma in [0, 1000];
        context: (B, L, context_dim) T5 states (padded rows included, unmasked, as both references feed them);
        pooled: (B, pooled_dim) CLIP pooled output; guidance: (B,) or scalar distilled guidance (dev only).
        """
        cfg = self.config
        if latents.ndim != 4 or latents.shape[1] != cfg.latent_channels:
            raise ValueError(f"latents must be (B, {cfg.latent_channels}, H/8, W/8), got {tuple(latents.shape)}")
        batch, _, height, width = latents.shape
        if height % 2 or width % 2:
            raise ValueError(f"latent height and width {(height, width)} must be even (2x2 packing); use pixel sizes "
                             f"that are multiples of 16")
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != cfg.context_dim:
            raise ValueError(f"context must be (B={batch}, L, {cfg.context_dim}), got {tuple(context.shape)}")
        if pooled.shape != (batch, cfg.pooled_dim):
            raise ValueError(f"pooled must be (B={batch}, {cfg.pooled_dim}), got {tuple(pooled.shape)}")
        t = self._per_sample("t", t, batch, latents.device)
        if cfg.guidance_embed and guidance is None:
            raise ValueError("this FLUX.1 model has a guidance embedding (dev): pass guidance, e.g. 3.5")
        if not cfg.guidance_embed and guidance is not None:
            raise ValueError("this FLUX.1 model has no guidance embedding (schnell): pass guidance=None")

        grid = (height // 2, width // 2)
        img = self.img_in(pack_latents(latents)).float()
        vec = self.time_in(timestep_sinusoid(t))
        if cfg.guidance_embed:
            vec = vec + self.guidance_in(timestep_sinusoid(self._per_sample("guidance", guidance, batch,
                                                                            latents.device) * 1000))
        vec = vec + self.vector_in(pooled)
        txt = self.txt_in(context).float()
        rope = self.rope(context.shape[1], grid, latents.device)
        return FluxForwardState(img=img, txt=txt, vec=vec, rope=rope, text_len=context.shape[1], grid=grid,
                                dtype=latents.dtype)

    @staticmethod
    def _per_sample(name: str, value: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
        value = torch.as_tensor(value, device=device, dtype=torch.float32)
        if value.ndim == 0:
            value = value.expand(batch)
        if value.shape != (batch,):
            raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {tuple(value.shape)}")
        return value

    def finalize(self, img: torch.Tensor, state: FluxForwardState) -> torch.Tensor:
        """Final layer and unpacking: image tokens (B, N, d) fp32 -> velocity (B, C, H/8, W/8) in state.dtype."""
        return unpack_latents(self.final_layer(img, state.vec), state.grid).to(state.dtype)

    def forward(self, latents: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor, pooled: torch.Tensor,
                guidance: torch.Tensor | float | None = None) -> torch.Tensor:
        """Flow velocity for `latents` at t = 1000 * sigma, shaped like the latents (see `prepare`)."""
        state = self.prepare(latents, t, context, pooled, guidance)
        img, txt = state.img, state.txt
        for block in self.blocks:
            img, txt = block(img, txt, state.vec, state.rope)
        return self.finalize(img, state)

    # ---- the family-neutral block protocol (models/denoiser.py), what stages/runner.py drives ----
    def begin(self, latents: torch.Tensor, t: torch.Tensor, conditioning: Sequence[Conditioning],
              guidance: torch.Tensor | None = None) -> TokenState:
        """`prepare` on the branches' T5 contexts and CLIP pooled vectors, stacked."""
        if any(c.pooled is None for c in conditioning):
            raise ValueError("FLUX.1 needs the pooled CLIP vector of every prompt (Conditioning.pooled)")
        context = torch.stack([c.context for c in conditioning]).to(latents.device)
        pooled = torch.stack([c.pooled for c in conditioning]).to(latents.device)  # type: ignore[misc]
        state = self.prepare(latents, t, context, pooled, guidance)
        return TokenState(img=state.img, txt=state.txt, rope=state.rope, text_len=state.text_len, model=state)

    def run_block(self, block: Block, img: torch.Tensor, txt: torch.Tensor | None,
                  state: TokenState) -> tuple[torch.Tensor, torch.Tensor]:
        return block(img, txt, state.model.vec, state.rope)

    def run_head(self, img: torch.Tensor, state: TokenState) -> torch.Tensor:
        return self.final_layer(img, state.model.vec)

    def to_latents(self, patches: torch.Tensor, state: TokenState) -> torch.Tensor:
        return unpack_latents(patches, state.model.grid).to(state.model.dtype)

    CACHE_SIGNALS = ("modulated_input",)

    def cache_signal(self, state: TokenState, name: str) -> CacheSignal:
        """modulated_input: the first double block's adaLN-modulated image tokens (B, n, d) fp32, TeaCache's
        FLUX indicator; per token (this rank's shard under context parallelism)."""
        if name not in self.CACHE_SIGNALS:
            raise ValueError(f"FLUX has no cache signal {name!r}; its signals are {', '.join(self.CACHE_SIGNALS)}")
        first = self.double_blocks[0] if len(self.double_blocks) else None
        if first is None:
            raise ValueError("modulated_input needs a double-stream block")
        shift, scale = first.img_mod(state.model.vec)[:2]
        return CacheSignal(modulate(state.img, shift, scale, torch.float32), per_token=True)

    # ---- checkpoints ----
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                        attn_fn: AttentionFn = auto_attention,
                        config: FluxDiTConfig | None = None) -> "FluxTransformer":
        """Load the original single file (`flux1-dev.safetensors` / `flux1-schnell.safetensors` in a release folder,
        or the file itself), a diffusers release folder (its `transformer/`) or a diffusers `transformer/` folder.

        The config is read from the diffusers config.json or inferred from the original file's tensor shapes
        (`config` replaces it). Built on the meta device and filled by a strict load: missing, unexpected or
        mis-shaped keys raise `CheckpointError` naming the keys and the file. `dtype` applies to all but the
        `keep_fp32` parameters.
        """
        source = resolve_dit(path, config)
        if source.layout == "original":
            sd, described = strip_original_prefix(load_safetensors_file(source.path)), str(source.path)
        else:
            raw, described = load_safetensors_dir(source.path)
            try:
                sd = diffusers_to_original(raw, consume=True)  # fused parts are freed as they are consumed
            except ValueError as exc:
                raise CheckpointError(f"{described}: {exc}") from exc
        with meta_device():
            model = cls(source.config, attn_fn=attn_fn)
        model = load_strict(model, sd, described, dtype=dtype, keep_fp32=cls.keep_fp32, device=device)
        cfg = source.config
        logger.info("loaded %s FLUX.1 DiT (%d double + %d single blocks, d %d, guidance %s) from %s as %s",
                    source.layout, cfg.num_double_blocks, cfg.num_single_blocks, cfg.hidden_size, cfg.guidance_embed,
                    described, dtype)
        return model

    def save_pretrained(self, folder: str | Path, layout: str = "original", max_shard_bytes: int | None = None) -> Path:
        """Write the weights in a release layout; returns what `from_pretrained` takes.

        "original": `folder/flux1-dev.safetensors` (or `flux1-schnell.safetensors` without a guidance embedding),
        BFL names. "diffusers": `folder/config.json` + `diffusion_pytorch_model*.safetensors` (sharded past
        `max_shard_bytes`), the layout of a release's `transformer/` folder.
        """
        if layout not in ("original", "diffusers"):
            raise ValueError(f"layout must be 'original' or 'diffusers', got {layout!r}")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach() for k, v in self.state_dict().items()}
        if layout == "original":
            from safetensors.torch import save_file

            path = folder / ORIGINAL_DIT_FILES[0 if self.config.guidance_embed else 1]
            save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
            return path
        # the split q/k/v are views of one tensor; safetensors wants each key in its own storage
        sd = {k: v.clone() for k, v in original_to_diffusers(sd).items()}
        save_safetensors_sharded(sd, folder, max_shard_bytes=max_shard_bytes)
        (folder / "config.json").write_text(json.dumps(self.config.to_diffusers_json(), indent=2))
        return folder
