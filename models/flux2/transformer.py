"""The FLUX.2 DiT (klein 4B / 9B) with the exact math of diffusers' `Flux2Transformer2DModel` (= BFL's `Flux2`).

Read top-down: timestep sinusoid -> 4-axis RoPE -> embedders, shared modulations and norms -> joint attention
and SwiGLU MLP -> double-stream block -> single-stream block -> final layer -> the model. Parameter names are the
diffusers keys (`x_embedder`, `transformer_blocks.N.attn.to_q`, `single_transformer_blocks.N.attn.to_qkv_mlp_proj`,
`norm_out.linear`, ...), so a diffusers `transformer/` folder loads with no key map; original BFL files go through
`transformer_keys.original_to_diffusers` (splits the fused q/k/v, swaps the final modulation halves).

What differs from FLUX.1 (models/flux/transformer.py, whose sinusoid, RoPE tables and joint attention are reused):
- no Linear has a bias; there is no pooled text vector, and klein has no guidance embedder: the conditioning
  vector is the time embedding alone;
- the modulations are computed once per forward from that vector and shared by every block: one 6-way table for
  the image stream of all double blocks, one for their text stream, one 3-way table for all single blocks;
- the MLPs are SwiGLU: linear_in makes 2 x mlp_hidden features, silu(first half) * second half, linear_out;
- a single block's fused projection is [q | k | v | SwiGLU input (2 x mlp_hidden)] and its output projection
  takes [attention | SwiGLU output];
- the latent enters already patchified (128 channels at H/16, W/16): one token per latent position, row-major;
- positions have 4 axes (time, row, column, text index), RoPE base 2000: text token l is (0, 0, 0, l), image
  token (row, col) is (0, row, col, 0).

Conventions: the model gets t = 1000 * sigma (diffusers' pipeline passes sigma and its model multiplies by 1000);
text tokens come first in every joint sequence, then image tokens. All 512 text positions of the release,
padding included, enter unmasked, as the reference feeds them.

Precision: the residual streams, the time vector, the modulations, norms, RoPE and the final layer's outputs run
in fp32 whatever the weight dtype; the large matmuls run in the weight dtype. `Flux2Transformer.keep_fp32` names
the parameters that stay fp32 under bf16 weights (the time/guidance embedders, the q/k norm scales and the final
layer; the shared modulation tables, 15 d^2 parameters, are matmul weights). Every step is in the reference's
operation order, so fp32 CPU results equal diffusers' bit for bit (tests/models/flux2/test_transformer.py).

Block protocol (models/denoiser.py): `begin` -> `TokenState` (image tokens, text tokens, RoPE over the joint
sequence with the text rows first, the shared modulations in `model`); `blocks` = the double-stream blocks, then
the single-stream ones, both run by `run_block` on (img, txt) -> (img, txt); `run_head`; `to_latents`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import AttentionFn, auto_attention
from models.conditioning import Conditioning
from models.cpu_linear import PackedLinear, PackedWeights
from models.denoiser import CacheSignal, RopeTables, TokenState
from models.dit_ops import RMSNorm, adaln_modulate, linear
from models.flux.transformer import joint_attention, rope_tables, timestep_sinusoid
from models.flux2.checkpoint import DEFAULT_ORIGINAL_FILE, ORIGINAL_DIT_FILES, resolve_dit
from models.flux2.config import FLUX2_LATENT, NORM_EPS, TIME_CHANNELS, Flux2DiTConfig, match_preset
from models.flux2.transformer_keys import diffusers_to_original, original_to_diffusers, strip_original_prefix
from models.loading import (
    check_keys,
    load_safetensors_dir,
    load_safetensors_file,
    load_strict,
    meta_device,
    save_diffusers_folder,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# 1-2. Timestep sinusoid and RoPE: FLUX.1's `timestep_sinusoid` (256 channels, [cos | sin], of 1000 * sigma)
# and `rope_tables` (interleaved pairs, float64 frequencies, cast to fp32), here over 4 position axes
# ---------------------------------------------------------------------------------------------
def position_ids(text_len: int, grid: tuple[int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """(text_len + h*w, 4) fp32 ids of the joint sequence: text l -> (0, 0, 0, l), then image (0, row, col, 0)
    row-major (diffusers' `_prepare_text_ids` / `_prepare_latent_ids`)."""
    h, w = grid
    txt = torch.zeros(text_len, 4, device=device)
    txt[:, 3] = torch.arange(text_len, device=device)
    img = torch.zeros(h, w, 4, device=device)
    img[..., 1] = torch.arange(h, device=device)[:, None]
    img[..., 2] = torch.arange(w, device=device)[None, :]
    return torch.cat([txt, img.reshape(h * w, 4)], dim=0)


# ---------------------------------------------------------------------------------------------
# 3. Embedders, shared modulations, norms
# ---------------------------------------------------------------------------------------------
class TimestepEmbedding(nn.Module):
    """Lin -> SiLU -> Lin, no biases (diffusers `TimestepEmbedding(sample_proj_bias=False)`); returns fp32."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear_1 = PackedLinear(TIME_CHANNELS, dim, bias=False)
        self.linear_2 = PackedLinear(dim, dim, bias=False)

    def forward(self, sinusoid: torch.Tensor) -> torch.Tensor:
        return linear(self.linear_2, F.silu(linear(self.linear_1, sinusoid)))


class TimeGuidanceEmbed(nn.Module):
    """The conditioning vector: the time embedding, plus the guidance embedding where the model has one."""

    def __init__(self, dim: int, guidance_embed: bool) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(dim)
        if guidance_embed:
            self.guidance_embedder = TimestepEmbedding(dim)

    def forward(self, t: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """t: (B,) 1000 * sigma; guidance: (B,) the guidance value (scaled by 1000 here) or None -> (B, d) fp32."""
        temb = self.timestep_embedder(timestep_sinusoid(t))
        if guidance is not None:
            temb = temb + self.guidance_embedder(timestep_sinusoid(guidance * 1000))
        return temb


class Modulation(nn.Module):
    """Lin(SiLU(temb)) -> `sets` (shift, scale, gate) triples; one table shared by every block of a kind."""

    def __init__(self, dim: int, sets: int) -> None:
        super().__init__()
        self.sets = sets
        self.linear = PackedLinear(dim, 3 * sets * dim, bias=False)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, d) fp32 -> 3 * sets chunks, each (B, 1, d) fp32, ordered (shift, scale, gate) per set."""
        return linear(self.linear, F.silu(temb)).unsqueeze(1).chunk(3 * self.sets, dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LN(x) * (1 + scale) + shift in fp32 (non-affine LayerNorm, eps 1e-6), the reference's operation order."""
    return adaln_modulate(x, shift, scale, NORM_EPS)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :n/2]) * x[..., n/2:] (the reference's `Flux2SwiGLU`)."""
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


class FeedForward(nn.Module):
    """linear_in (d -> 2 * mlp_hidden) -> SwiGLU -> linear_out (mlp_hidden -> d), no biases; returns fp32."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear_in = PackedLinear(dim, 2 * hidden, bias=False)
        self.linear_out = PackedLinear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.linear_out, swiglu(self.linear_in(x)))


# ---------------------------------------------------------------------------------------------
# 4. Joint attention of a double block: per-stream projections and q/k norms, one attention over [text, image]
# ---------------------------------------------------------------------------------------------
class JointAttention(nn.Module):
    """The reference's `Flux2Attention`: image weights `to_*`, text weights `add_*_proj`, no biases."""

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.to_q = PackedLinear(dim, dim, bias=False)
        self.to_k = PackedLinear(dim, dim, bias=False)
        self.to_v = PackedLinear(dim, dim, bias=False)
        self.add_q_proj = PackedLinear(dim, dim, bias=False)
        self.add_k_proj = PackedLinear(dim, dim, bias=False)
        self.add_v_proj = PackedLinear(dim, dim, bias=False)
        self.norm_q = RMSNorm(head_dim, NORM_EPS)
        self.norm_k = RMSNorm(head_dim, NORM_EPS)
        self.norm_added_q = RMSNorm(head_dim, NORM_EPS)
        self.norm_added_k = RMSNorm(head_dim, NORM_EPS)
        self.to_out = nn.ModuleList([PackedLinear(dim, dim, bias=False)])
        self.to_add_out = PackedLinear(dim, dim, bias=False)

    def _heads(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return layer(x).unflatten(-1, (-1, self.head_dim))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, rope: RopeTables, attn_fn: AttentionFn,
                layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, N, d), txt (B, L, d) modulated; rope over L + N rows, text first -> (img, txt) outputs fp32."""
        text_len = txt.shape[1]
        img_q, img_k = self.norm_q(self._heads(self.to_q, img)), self.norm_k(self._heads(self.to_k, img))
        txt_q = self.norm_added_q(self._heads(self.add_q_proj, txt))
        txt_k = self.norm_added_k(self._heads(self.add_k_proj, txt))
        out = joint_attention([txt_q, img_q], [txt_k, img_k], [self._heads(self.add_v_proj, txt),
                                                               self._heads(self.to_v, img)],
                              rope, attn_fn, layer, text_len)
        return linear(self.to_out[0], out[:, text_len:]), linear(self.to_add_out, out[:, :text_len])


# ---------------------------------------------------------------------------------------------
# 5. Double-stream block: separate weights per stream, one joint attention, shared modulations
# ---------------------------------------------------------------------------------------------
class DoubleStreamBlock(nn.Module):
    """The reference's `Flux2TransformerBlock` (its LayerNorms have no weights, so they are functions here).
    layer: index in forward order (AttentionMeta.layer)."""

    def __init__(self, config: Flux2DiTConfig, layer: int, attn_fn: AttentionFn) -> None:
        super().__init__()
        d = config.hidden_size
        self.layer = layer
        self.attn_fn = attn_fn
        self.attn = JointAttention(d, config.head_dim)
        self.ff = FeedForward(d, config.mlp_hidden)
        self.ff_context = FeedForward(d, config.mlp_hidden)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, mod_img: tuple[torch.Tensor, ...],
                mod_txt: tuple[torch.Tensor, ...], rope: RopeTables) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, N, d), txt (B, L, d) fp32; the shared 6-way modulations of each stream; rope over L + N rows
        (text first) -> new (img, txt) fp32 (the inputs are left alone)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = mod_img
        c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = mod_txt
        img_attn, txt_attn = self.attn(modulate(img, shift1, scale1), modulate(txt, c_shift1, c_scale1), rope,
                                       self.attn_fn, self.layer)
        img = img + gate1 * img_attn
        img = img + gate2 * self.ff(modulate(img, shift2, scale2))
        txt = txt + c_gate1 * txt_attn
        txt = txt + c_gate2 * self.ff_context(modulate(txt, c_shift2, c_scale2))
        return img, txt


# ---------------------------------------------------------------------------------------------
# 6. Single-stream block: one sequence, attention and SwiGLU MLP in parallel from one fused projection
# ---------------------------------------------------------------------------------------------
class ParallelSelfAttention(nn.Module):
    """The reference's `Flux2ParallelSelfAttention`: to_qkv_mlp_proj rows [q | k | v | SwiGLU input],
    to_out columns [attention | SwiGLU output]."""

    def __init__(self, dim: int, head_dim: int, mlp_hidden: int) -> None:
        super().__init__()
        self.dim = dim
        self.head_dim = head_dim
        self.to_qkv_mlp_proj = PackedLinear(dim, 3 * dim + 2 * mlp_hidden, bias=False)
        self.norm_q = RMSNorm(head_dim, NORM_EPS)
        self.norm_k = RMSNorm(head_dim, NORM_EPS)
        self.to_out = PackedLinear(dim + mlp_hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, rope: RopeTables, attn_fn: AttentionFn, layer: int,
                text_len: int) -> torch.Tensor:
        """x (B, L + N, d) modulated, text rows first -> (B, L + N, d) fp32."""
        qkv, mlp = self.to_qkv_mlp_proj(x).split([3 * self.dim, self.to_qkv_mlp_proj.out_features - 3 * self.dim],
                                                 dim=-1)
        q, k, v = (part.unflatten(-1, (-1, self.head_dim)) for part in qkv.chunk(3, dim=-1))
        attn = joint_attention([self.norm_q(q)], [self.norm_k(k)], [v], rope, attn_fn, layer, text_len)
        return linear(self.to_out, torch.cat([attn, swiglu(mlp).to(attn.dtype)], dim=-1))


class SingleStreamBlock(nn.Module):
    """The reference's `Flux2SingleTransformerBlock` on cat(text, image). Takes and returns the two streams,
    like the double block, so block loops treat both kinds alike."""

    def __init__(self, config: Flux2DiTConfig, layer: int, attn_fn: AttentionFn) -> None:
        super().__init__()
        self.layer = layer
        self.attn_fn = attn_fn
        self.attn = ParallelSelfAttention(config.hidden_size, config.head_dim, config.mlp_hidden)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, mod: tuple[torch.Tensor, ...],
                rope: RopeTables) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, N, d), txt (B, L, d) fp32; the shared (shift, scale, gate); rope over L + N rows -> new (img, txt)."""
        shift, scale, gate = mod
        text_len = txt.shape[1]
        x = torch.cat([txt, img], dim=1)
        x = x + gate * self.attn(modulate(x, shift, scale), rope, self.attn_fn, self.layer, text_len)
        return x[:, text_len:], x[:, :text_len]


# ---------------------------------------------------------------------------------------------
# 7. Final layer
# ---------------------------------------------------------------------------------------------
class NormOut(nn.Module):
    """LN(x) * (1 + scale) + shift with (scale, shift) = Lin(SiLU(temb)), chunked in that order (diffusers'
    `AdaLayerNormContinuous`; BFL's `final_layer.adaLN_modulation` holds the halves the other way round)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = PackedLinear(dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = linear(self.linear, F.silu(temb)).chunk(2, dim=1)
        return modulate(x, shift[:, None, :], scale[:, None, :])


# ---------------------------------------------------------------------------------------------
# 8. The model
# ---------------------------------------------------------------------------------------------
@dataclass
class Flux2ForwardState:
    """Per-forward values the blocks and the head need (`TokenState.model`).

    temb: (B, d) fp32 conditioning vector; mod_img / mod_txt: the double blocks' shared 6-way modulations of each
    stream, mod_single: the single blocks' 3-way one, each chunk (B, 1, d) fp32; grid: (h, w) token grid =
    (H/16, W/16) in pixels; dtype: the latents' dtype.
    """

    temb: torch.Tensor
    mod_img: tuple[torch.Tensor, ...]
    mod_txt: tuple[torch.Tensor, ...]
    mod_single: tuple[torch.Tensor, ...]
    grid: tuple[int, int]
    dtype: torch.dtype


Block = DoubleStreamBlock | SingleStreamBlock

_FP32_PARAMS = re.compile(r"^(time_guidance_embed|norm_out|proj_out)\.|\.norm_(q|k|added_q|added_k)\.weight$")


class Flux2Transformer(PackedWeights, nn.Module):
    """FLUX.2 DiT (klein: no guidance embedding). config: network shape; attn_fn: the attention function behind
    the seam, (B, L, H, D) layout. Use `from_pretrained` for checkpoints."""

    latent = FLUX2_LATENT
    """The normalised, patchified FLUX.2 VAE latents it denoises."""

    def __init__(self, config: Flux2DiTConfig, attn_fn: AttentionFn = auto_attention) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        # 1. time (+ guidance) embedding and the shared modulations
        self.time_guidance_embed = TimeGuidanceEmbed(d, config.guidance_embed)
        self.double_stream_modulation_img = Modulation(d, 2)
        self.double_stream_modulation_txt = Modulation(d, 2)
        self.single_stream_modulation = Modulation(d, 1)
        # 2. input projections
        self.x_embedder = PackedLinear(config.in_channels, d, bias=False)
        self.context_embedder = PackedLinear(config.context_dim, d, bias=False)
        # 3. blocks
        self.transformer_blocks = nn.ModuleList(
            DoubleStreamBlock(config, layer, attn_fn) for layer in range(config.num_double_blocks))
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(config, config.num_double_blocks + layer, attn_fn)
            for layer in range(config.num_single_blocks))
        # 4. output
        self.norm_out = NormOut(d)
        self.proj_out = PackedLinear(d, config.in_channels, bias=False)

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
        return [*self.transformer_blocks, *self.single_transformer_blocks]

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

    def prepare(self, latents: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor,
                guidance: torch.Tensor | float | None = None) -> TokenState:
        """Embed time (+ guidance), image and text tokens, compute the shared modulations and the RoPE tables.

        latents: (B, in_channels, H/16, W/16), the patchified normalised VAE latents; t: (B,) or scalar, 1000 *
        sigma; context: (B, L, context_dim) text states (padded rows included, unmasked, as the reference feeds
        them); guidance: (B,) or scalar distilled guidance, only for a DiT with a guidance embedding.
        """
        cfg = self.config
        if latents.ndim != 4 or latents.shape[1] != cfg.in_channels:
            raise ValueError(f"latents must be (B, {cfg.in_channels}, H/16, W/16), got {tuple(latents.shape)}")
        batch, _, height, width = latents.shape
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != cfg.context_dim:
            raise ValueError(f"context must be (B={batch}, L, {cfg.context_dim}), got {tuple(context.shape)}")
        if cfg.guidance_embed and guidance is None:
            raise ValueError("this FLUX.2 DiT has a guidance embedding: pass guidance, e.g. 4.0")
        if not cfg.guidance_embed and guidance is not None:
            raise ValueError("this FLUX.2 DiT has no guidance embedding (klein): pass guidance=None")
        t = self._per_sample("t", t, batch, latents.device)
        g = None if guidance is None else self._per_sample("guidance", guidance, batch, latents.device)

        temb = self.time_guidance_embed(t, g)
        state = Flux2ForwardState(
            temb=temb, mod_img=self.double_stream_modulation_img(temb), mod_txt=self.double_stream_modulation_txt(temb),
            mod_single=self.single_stream_modulation(temb), grid=(height, width), dtype=latents.dtype)
        img = linear(self.x_embedder, latents.flatten(2).transpose(1, 2))  # (B, h*w, C) row-major tokens
        txt = linear(self.context_embedder, context)
        rope = self.rope(context.shape[1], (height, width), latents.device)
        return TokenState(img=img, txt=txt, rope=rope, text_len=context.shape[1], model=state)

    @staticmethod
    def _per_sample(name: str, value: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
        value = torch.as_tensor(value, device=device, dtype=torch.float32)
        if value.ndim == 0:
            value = value.expand(batch)
        if value.shape != (batch,):
            raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {tuple(value.shape)}")
        return value

    def begin(self, latents: torch.Tensor, t: torch.Tensor, conditioning: Sequence[Conditioning],
              guidance: torch.Tensor | None = None) -> TokenState:
        """`prepare` on the branches' text contexts, stacked (every branch the same, padded length)."""
        lengths = {len(c.context) for c in conditioning}
        if len(lengths) > 1:
            raise ValueError(f"FLUX.2 takes every prompt padded to the same length; got text lengths {sorted(lengths)}")
        context = torch.stack([c.context for c in conditioning]).to(latents.device)
        return self.prepare(latents, t, context, guidance)

    def run_block(self, block: Block, img: torch.Tensor, txt: torch.Tensor | None,
                  state: TokenState) -> tuple[torch.Tensor, torch.Tensor]:
        if txt is None:
            raise ValueError("FLUX.2 keeps a text stream; txt must not be None")
        model: Flux2ForwardState = state.model
        if isinstance(block, DoubleStreamBlock):
            return block(img, txt, model.mod_img, model.mod_txt, state.rope)
        return block(img, txt, model.mod_single, state.rope)

    def run_head(self, img: torch.Tensor, state: TokenState) -> torch.Tensor:
        """(B, n, in_channels) fp32 velocity values per image token."""
        return linear(self.proj_out, self.norm_out(img, state.model.temb))

    def to_latents(self, patches: torch.Tensor, state: TokenState) -> torch.Tensor:
        """Per-token values of the whole image sequence (B, h*w, C) -> the velocity (B, C, h, w), typed like the
        latents."""
        h, w = state.model.grid
        return patches.transpose(1, 2).reshape(patches.shape[0], -1, h, w).to(state.model.dtype)

    CACHE_SIGNALS = ("modulated_input",)

    def cache_signal(self, state: TokenState, name: str) -> CacheSignal:
        """modulated_input: the image tokens as the first double block's attention sees them, LN(x) * (1 + scale)
        + shift with the shared image modulation (B, n, d) fp32 (the FLUX TeaCache indicator); per token (this
        rank's shard under context parallelism)."""
        if name not in self.CACHE_SIGNALS:
            raise ValueError(f"FLUX.2 has no cache signal {name!r}; its signals are {', '.join(self.CACHE_SIGNALS)}")
        if not len(self.transformer_blocks):
            raise ValueError("modulated_input needs a double-stream block")
        shift, scale = state.model.mod_img[:2]
        return CacheSignal(modulate(state.img, shift, scale), per_token=True)

    def forward(self, latents: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor,
                guidance: torch.Tensor | float | None = None) -> torch.Tensor:
        """Flow velocity for `latents` at t = 1000 * sigma, shaped like the latents (see `prepare`)."""
        state = self.prepare(latents, t, context, guidance)
        img, txt = state.img, state.txt
        for block in self.blocks:
            img, txt = self.run_block(block, img, txt, state)
        return self.to_latents(self.run_head(img, state), state)

    # ---- checkpoints ----
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                        attn_fn: AttentionFn = auto_attention,
                        config: Flux2DiTConfig | None = None) -> "Flux2Transformer":
        """Load a diffusers release folder (its `transformer/`), a diffusers `transformer/` folder, a folder with one
        original BFL transformer file at the top, or an original `.safetensors` file itself (any name).

        The config is read from the diffusers config.json or inferred from the original file's tensor shapes
        (`config` replaces it). Built on the meta device and filled by a strict load: missing, unexpected or
        mis-shaped keys raise `CheckpointError` naming the keys (in the file's own layout) and the file. `dtype`
        applies to all but the `keep_fp32` parameters.
        """
        source = resolve_dit(path, config)
        with meta_device():
            model = cls(source.config, attn_fn=attn_fn)
        if source.layout == "original":
            described = str(source.path)
            sd = strip_original_prefix(load_safetensors_file(source.path))
            # checked in the original names first, so an error names the file's own keys
            check_keys(diffusers_to_original(model.state_dict()), sd, described, f"{cls.__name__} (original layout)")
            sd = original_to_diffusers(sd)
        else:
            sd, described = load_safetensors_dir(source.path)
        model = load_strict(model, sd, described, dtype=dtype, keep_fp32=cls.keep_fp32, device=device)
        cfg = source.config
        logger.info("loaded %s FLUX.2 DiT (%d double + %d single blocks, d %d) from %s as %s", source.layout,
                    cfg.num_double_blocks, cfg.num_single_blocks, cfg.hidden_size, described, dtype)
        return model

    def save_pretrained(self, folder: str | Path, layout: str = "original", max_shard_bytes: int | None = None,
                        filename: str | None = None) -> Path:
        """Write the weights in a release layout; returns what `from_pretrained` takes.

        "original": one file in `folder` with BFL names (`filename`, by default the released name of the matching
        preset, e.g. `flux-2-klein-4b.safetensors`). "diffusers": `folder/config.json` +
        `diffusion_pytorch_model*.safetensors` (sharded past `max_shard_bytes`), a release's `transformer/` folder.
        """
        if layout not in ("original", "diffusers"):
            raise ValueError(f"layout must be 'original' or 'diffusers', got {layout!r}")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if layout == "diffusers":
            return save_diffusers_folder(self, self.config.to_diffusers_json(), folder, max_shard_bytes)
        from safetensors.torch import save_file

        name = filename or ORIGINAL_DIT_FILES.get(match_preset(self.config).name, DEFAULT_ORIGINAL_FILE)
        sd = diffusers_to_original({k: v.detach() for k, v in self.state_dict().items()})
        path = folder / name
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        return path
