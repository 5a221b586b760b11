"""The Qwen-Image DiT with the exact math of diffusers' `QwenImageTransformer2DModel` (the text-to-image release).

Read top-down: timestep sinusoid -> 3-axis complex RoPE -> norms and modulation -> joint attention ->
dual-stream block -> final layer -> latent packing -> the model. Parameter names are the diffusers keys
(`transformer_blocks.N.attn.to_q`, `transformer_blocks.N.img_mod.1`, `txt_norm`, `norm_out.linear`, ...), which
are also the original release's names, so a diffusers `transformer/` folder loads strictly with no key map.

The forward (every step of it in the reference's order, so fp32 CPU results are bitwise the reference's):
- time: temb = Linear(SiLU(Linear(sinusoid))) with the sinusoid's angles 1000 * (timestep * f): the factor 1000
  is applied inside, after the product with the frequencies. The reference's `timestep` is sigma (its pipeline
  passes (1000 sigma) / 1000); there is no pooled text vector and no guidance input.
- image: 2x2 patches of the (B, 16, H, W) latent (FLUX.1 packing: feature c * 4 + row * 2 + col) -> img_in.
- text: the Qwen2.5-VL states -> RMSNorm (`txt_norm`, weighted) -> txt_in. Padded text rows are masked as keys
  when a mask is given (a bool mask; the pipeline passes none when every row is real).
- block (x 60), one per stream each of: (shift, scale, gate) x 2 = Linear(SiLU(temb)); LN(x) * (1 + scale) +
  shift; q, k, v with biases (`to_*` for image, `add_*_proj` for text), per-head RMSNorm on q and k, RoPE per
  stream (image rows on image q/k, text rows on text q/k), one attention over [text, image], `to_add_out` /
  `to_out.0`, gated residual; then LN + second modulation -> GELU-tanh MLP (4 d) -> gated residual.
- output: LN(img) * (1 + scale) + shift with (scale, shift) = Linear(SiLU(temb)) (that order), proj_out to
  the 64 patch values, unpacked to (B, 16, H, W). That is the flow velocity the sampler uses as it is.
- positions (RoPE): image token (row, col) of an h x w grid gets (0, row - (h - h // 2), col - (w - w // 2)),
  i.e. rows -(h - h//2) ... h//2 - 1, centred; text token i gets (m + i, m + i, m + i) with m = max(h // 2,
  w // 2), over the full (padded) text length. Angles pos * 10000^(-2j / axis_dim) in fp32, then complex64 via
  `torch.polar`, as the reference tabulates them for positions -4096 ... 4095 (positions outside raise here).

Precision: the token streams, time vector, norms, RoPE, modulations and the final layer's outputs are fp32; the
matmuls run in the weight dtype. `keep_fp32` names the parameters kept fp32 under bf16 weights (`cast_weights`).

Speed (benchmarks/dit_forward.py --family qwen-image), with the math unchanged: every Linear is a `PackedLinear`
(models/cpu_linear.py, shared with Wan and FLUX.1): on CPU it multiplies by a weight prepacked once for oneDNN
(bf16) or MKL (fp32) instead of re-blocking the plain weight on every call, and the MLP's first GEMM runs the
tanh-GELU in its epilogue. State-dict names are those of `nn.Linear`; the packed copies cost a second copy of
the weights (`packed_weight_bytes`; `set_weight_prepacking(False)` trades the speed for the memory).

Block protocol (models/denoiser.py): `blocks` = the dual-stream blocks in forward order; `run_block` runs one on
(img, txt); `TokenState.rope` is text-first (the text rows, then the image rows) and each stream takes its own
rows; `TokenState.model.text_mask` is the (B, L) bool key mask or None.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import AttentionFn, AttentionMeta, sdpa_attention
from models.cpu_linear import PackedLinear, PackedWeights
from models.conditioning import Conditioning
from models.denoiser import CacheSignal, RopeTables, TokenState
from models.family import LatentGeometry
from models.dit_ops import RMSNorm, apply_complex_rope, linear, pack_latents, unpack_latents
from models.config_files import diffusers_transformer_folder, read_diffusers_config
from models.loading import load_safetensors_dir, load_strict, meta_device, save_diffusers_folder
from models.qwen_image.config import (
    DIFFUSERS_CLASS,
    NORM_EPS,
    QWEN_IMAGE_LATENT,
    ROPE_MAX_POSITION,
    ROPE_THETA,
    QwenImageDiTConfig,
)

logger = logging.getLogger(__name__)

TIME_CHANNELS = 256
"""Width of the timestep sinusoid."""

TIME_SCALE = 1000.0
"""The factor on (timestep * frequency) inside the sinusoid."""



# ---------------------------------------------------------------------------------------------
# 1. Timestep sinusoid (fp32, cos first, the 1000 applied after the product with the frequencies)
# ---------------------------------------------------------------------------------------------
def timestep_sinusoid(timestep: torch.Tensor, dim: int = TIME_CHANNELS, scale: float = TIME_SCALE) -> torch.Tensor:
    """(B,) the reference's timestep (sigma) -> (B, dim) fp32 [cos | sin] of scale * (timestep * f_i), with
    f_i = exp(-ln(10000) * i / (dim/2)). Same operations in the same order as the reference."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timestep.device)
    freqs = torch.exp(exponent / half).to(timestep.dtype)
    angles = scale * (timestep[:, None].float() * freqs[None, :])
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


# ---------------------------------------------------------------------------------------------
# 2. RoPE: complex rotation of interleaved channel pairs; centred image positions, text after them
# ---------------------------------------------------------------------------------------------
def position_ids(text_len: int, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer ids (text (L, 3), image (h*w, 3)) for `text_len` text tokens and an (h, w) token grid.

    Image (0, row, col) row-major with rows -(h - h//2) ... h//2 - 1 and columns -(w - w//2) ... w//2 - 1;
    text token i is (m + i) on all three axes, m = max(h // 2, w // 2)."""
    h, w = grid
    rows = torch.arange(-(h - h // 2), h // 2)
    cols = torch.arange(-(w - w // 2), w // 2)
    img = torch.zeros(h, w, 3, dtype=torch.long)
    img[..., 1] = rows[:, None]
    img[..., 2] = cols[None, :]
    start = max(h // 2, w // 2)
    txt = torch.arange(start, start + text_len, dtype=torch.long)[:, None].expand(text_len, 3)
    return txt, img.reshape(h * w, 3)


def rope_tables(ids: torch.Tensor, axes_dims: Sequence[int], theta: float = ROPE_THETA) -> RopeTables:
    """(cos, sin), each (S, sum(axes_dims) / 2) fp32: the real and imaginary parts of the complex64 rotation of
    each channel pair for integer ids (S, 3). Axis i: angle pos * theta^(-2j / axes_dims[i]) in fp32 (the
    reference's table entries for those positions, bitwise), then `torch.polar`. Computed on the CPU."""
    ids = ids.cpu()
    low, high = int(ids.min()), int(ids.max())
    if low < -ROPE_MAX_POSITION or high >= ROPE_MAX_POSITION:
        raise ValueError(f"RoPE positions {low} ... {high} leave the model's range -{ROPE_MAX_POSITION} ... "
                         f"{ROPE_MAX_POSITION - 1}: image or text too long")
    parts = []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float32).div(dim))
        angles = torch.outer(ids[:, axis], freqs)
        parts.append(torch.polar(torch.ones_like(angles), angles))
    rot = torch.cat(parts, dim=-1)
    return rot.real.contiguous(), rot.imag.contiguous()


# ---------------------------------------------------------------------------------------------
# 3. Norms, modulation and matmuls
# ---------------------------------------------------------------------------------------------
def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """Non-affine LayerNorm (eps 1e-6) in fp32: every LayerNorm of the model."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=NORM_EPS)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LN(x) * (1 + scale) + shift, fp32; shift and scale (B, 1, d)."""
    return layer_norm(x) * (1 + scale) + shift


def modulations(mod: nn.Sequential, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(shift1, scale1, gate1, shift2, scale2, gate2), each (B, 1, d) fp32, from Linear(SiLU(temb))."""
    return linear(mod[1], F.silu(temb)).unsqueeze(1).chunk(6, dim=-1)


# ---------------------------------------------------------------------------------------------
# 4. Joint attention: per-stream projections, q/k norms and RoPE, one attention over [text, image]
# ---------------------------------------------------------------------------------------------
class JointAttention(nn.Module):
    """The reference's `Attention` with its double-stream processor; every Linear has a bias."""

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.to_q = PackedLinear(dim, dim)
        self.to_k = PackedLinear(dim, dim)
        self.to_v = PackedLinear(dim, dim)
        self.add_q_proj = PackedLinear(dim, dim)
        self.add_k_proj = PackedLinear(dim, dim)
        self.add_v_proj = PackedLinear(dim, dim)
        self.to_out = nn.ModuleList([PackedLinear(dim, dim)])
        self.to_add_out = PackedLinear(dim, dim)
        self.norm_q = RMSNorm(head_dim, NORM_EPS)
        self.norm_k = RMSNorm(head_dim, NORM_EPS)
        self.norm_added_q = RMSNorm(head_dim, NORM_EPS)
        self.norm_added_k = RMSNorm(head_dim, NORM_EPS)

    def _heads(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return linear(layer, x).unflatten(-1, (-1, self.head_dim))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, rope: RopeTables, attn_fn: AttentionFn,
                meta: AttentionMeta) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, N, d), txt (B, L, d) modulated fp32; rope over L + N rows, text first -> (img, txt) outputs."""
        n_txt = txt.shape[1]
        txt_rope = (rope[0][:n_txt], rope[1][:n_txt])
        img_rope = (rope[0][n_txt:], rope[1][n_txt:])
        img_q = apply_complex_rope(self.norm_q(self._heads(self.to_q, img)), img_rope)
        img_k = apply_complex_rope(self.norm_k(self._heads(self.to_k, img)), img_rope)
        img_v = self._heads(self.to_v, img)
        txt_q = apply_complex_rope(self.norm_added_q(self._heads(self.add_q_proj, txt)), txt_rope)
        txt_k = apply_complex_rope(self.norm_added_k(self._heads(self.add_k_proj, txt)), txt_rope)
        txt_v = self._heads(self.add_v_proj, txt)
        out = attn_fn(torch.cat([txt_q, img_q], dim=1), torch.cat([txt_k, img_k], dim=1),
                      torch.cat([txt_v, img_v], dim=1), meta).flatten(2)
        return linear(self.to_out[0], out[:, n_txt:].contiguous()), linear(self.to_add_out, out[:, :n_txt].contiguous())


class GeluProj(nn.Module):
    """Linear then tanh-GELU (the reference's `GELU(approximate="tanh")` module, weights under `.proj`)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = PackedLinear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x, gelu=True).float()  # the GELU runs in the GEMM's epilogue where the weight is packed


class FeedForward(nn.Module):
    """net.0 (Linear + GELU-tanh), net.1 (the reference's dropout, p = 0: identity), net.2 (Linear)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([GeluProj(dim, hidden), nn.Identity(), PackedLinear(hidden, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.net[2], self.net[0](x))


# ---------------------------------------------------------------------------------------------
# 5. Dual-stream block
# ---------------------------------------------------------------------------------------------
class QwenImageBlock(nn.Module):
    """One Qwen-Image transformer block: separate weights per stream, one joint attention.
    layer: index in forward order (AttentionMeta.layer)."""

    def __init__(self, config: QwenImageDiTConfig, layer: int, attn_fn: AttentionFn) -> None:
        super().__init__()
        d = config.dim
        self.layer = layer
        self.attn_fn = attn_fn
        self.img_mod = nn.Sequential(nn.SiLU(), PackedLinear(d, 6 * d))
        self.attn = JointAttention(d, config.head_dim)
        self.img_mlp = FeedForward(d, config.mlp_hidden)
        self.txt_mod = nn.Sequential(nn.SiLU(), PackedLinear(d, 6 * d))
        self.txt_mlp = FeedForward(d, config.mlp_hidden)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor, rope: RopeTables,
                meta: AttentionMeta) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, N, d), txt (B, L, d) fp32; temb (B, d) fp32; rope over L + N rows (text first) -> new (img, txt)."""
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = modulations(self.img_mod, temb)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = modulations(self.txt_mod, temb)
        img_attn, txt_attn = self.attn(modulate(img, img_shift1, img_scale1), modulate(txt, txt_shift1, txt_scale1),
                                       rope, self.attn_fn, meta)
        img = img + img_gate1 * img_attn
        txt = txt + txt_gate1 * txt_attn
        img = img + img_gate2 * self.img_mlp(modulate(img, img_shift2, img_scale2))
        txt = txt + txt_gate2 * self.txt_mlp(modulate(txt, txt_shift2, txt_scale2))
        return img, txt


# ---------------------------------------------------------------------------------------------
# 6. Embedders and final layer
# ---------------------------------------------------------------------------------------------
class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear_1 = PackedLinear(TIME_CHANNELS, dim)
        self.linear_2 = PackedLinear(dim, dim)

    def forward(self, sinusoid: torch.Tensor) -> torch.Tensor:
        return linear(self.linear_2, F.silu(linear(self.linear_1, sinusoid)))


class TimeTextEmbed(nn.Module):
    """The reference's `time_text_embed` (only a timestep embedder in the text-to-image release)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(dim)

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        return self.timestep_embedder(timestep_sinusoid(timestep))


class NormOut(nn.Module):
    """LN(x) * (1 + scale) + shift with (scale, shift) = Linear(SiLU(temb)), chunked in that order."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = PackedLinear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = linear(self.linear, F.silu(temb)).chunk(2, dim=1)
        return layer_norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


# 7. The model
# ---------------------------------------------------------------------------------------------
@dataclass
class QwenImageForwardState:
    """Per-forward values the blocks and the head need (`TokenState.model`).

    temb: (B, d) fp32 time vector; grid: (h, w) token grid; text_mask: (B, L) bool, True for real text rows, or
    None (every row real); dtype: the latents' dtype.
    """

    temb: torch.Tensor
    grid: tuple[int, int]
    text_mask: torch.Tensor | None
    dtype: torch.dtype


_FP32_PARAMS = re.compile(r"^(time_text_embed\.|txt_norm\.|norm_out\.|proj_out\.)"
                          r"|\.norm_(q|k|added_q|added_k)\.weight$")


class QwenImageTransformer(PackedWeights, nn.Module):
    """Qwen-Image DiT. config: network shape; attn_fn: the attention function behind the seam, (B, L, H, D)
    layout. Use `from_pretrained` for checkpoints."""

    def __init__(self, config: QwenImageDiTConfig, attn_fn: AttentionFn = sdpa_attention) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        self.time_text_embed = TimeTextEmbed(d)
        self.txt_norm = RMSNorm(config.joint_attention_dim, NORM_EPS)
        self.img_in = PackedLinear(config.in_channels, d)
        self.txt_in = PackedLinear(config.joint_attention_dim, d)
        self.transformer_blocks = nn.ModuleList(QwenImageBlock(config, i, attn_fn) for i in range(config.num_layers))
        self.norm_out = NormOut(d)
        self.proj_out = PackedLinear(d, config.patch_features)

    @property
    def latent(self) -> LatentGeometry:
        """The latents it denoises: the Qwen-Image VAE's geometry with this config's latent channels (16 for the
        release, fewer in tiny test models)."""
        return dataclasses.replace(QWEN_IMAGE_LATENT, channels=self.config.latent_channels)

    # ---- precision policy ----
    @classmethod
    def keep_fp32(cls, name: str) -> bool:
        """True for parameters kept fp32 under bf16 weights (time MLP, text norm, q/k norms, final layer)."""
        return _FP32_PARAMS.search(name) is not None

    def set_attention(self, attn_fn: AttentionFn) -> None:
        for block in self.blocks:
            block.attn_fn = attn_fn

    # ---- block protocol ----
    @property
    def blocks(self) -> list[QwenImageBlock]:
        return list(self.transformer_blocks)

    def rope(self, text_len: int, grid: tuple[int, int], device: torch.device | str | None = None) -> RopeTables:
        """Text-first tables: the text rows, then the image rows; the last ones are kept."""
        key = (text_len, tuple(grid), torch.device(device) if device is not None else None)
        cached = self.__dict__.get("_rope_cache")
        if cached is None or cached[0] != key:
            txt_ids, img_ids = position_ids(text_len, grid)
            with torch.inference_mode(False):
                cos, sin = rope_tables(torch.cat([txt_ids, img_ids]), self.config.axes_dims_rope)
                tables = (cos.to(device), sin.to(device))
            cached = self._rope_cache = (key, tables)
        return cached[1]

    def prepare(self, latents: torch.Tensor, timestep: torch.Tensor | float, context: torch.Tensor,
                mask: torch.Tensor | None = None) -> TokenState:
        """Embed time, image and text tokens.

        latents: (B, C, H, W) with C = config.latent_channels and even H, W; timestep: (B,) or a scalar, the
        reference's timestep input (sigma; its pipeline passes (1000 sigma) / 1000); context: (B, L,
        joint_attention_dim) text-encoder states; mask: (B, L), nonzero for real text rows (any pattern), or None
        for no masking. A mask is used whenever given, as the reference does.
        """
        cfg = self.config
        c = cfg.latent_channels
        if latents.ndim != 4 or latents.shape[1] != c:
            raise ValueError(f"latents must be (B, {c}, H, W), got {tuple(latents.shape)}")
        batch, _, height, width = latents.shape
        if height % 2 or width % 2:
            raise ValueError(f"latent height and width {(height, width)} must be even (2x2 packing); use pixel sizes "
                             f"that are multiples of 16")
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != cfg.joint_attention_dim:
            raise ValueError(f"context must be (B={batch}, L, {cfg.joint_attention_dim}), got {tuple(context.shape)}")
        if context.shape[1] == 0:
            raise ValueError("the text has no tokens")
        if mask is not None:
            if tuple(mask.shape) != tuple(context.shape[:2]):
                raise ValueError(f"mask must be (B, L) = {tuple(context.shape[:2])}, got {tuple(mask.shape)}")
            mask = mask.to(device=latents.device, dtype=torch.bool)
        timestep = torch.as_tensor(timestep, dtype=torch.float32, device=latents.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        if timestep.shape != (batch,):
            raise ValueError(f"timestep must be a scalar or have shape ({batch},), got {tuple(timestep.shape)}")

        grid = (height // 2, width // 2)
        img = linear(self.img_in, pack_latents(latents))
        txt = linear(self.txt_in, self.txt_norm(context))
        temb = self.time_text_embed(timestep)
        rope = self.rope(context.shape[1], grid, latents.device)
        state = QwenImageForwardState(temb=temb, grid=grid, text_mask=mask, dtype=latents.dtype)
        return TokenState(img=img, txt=txt, rope=rope, text_len=context.shape[1], model=state)

    def run_block(self, block: QwenImageBlock, img: torch.Tensor, txt: torch.Tensor | None,
                  state: TokenState) -> tuple[torch.Tensor, torch.Tensor]:
        if txt is None:
            raise ValueError("Qwen-Image keeps a text stream; txt must not be None")
        meta = AttentionMeta(layer=block.layer, kind="joint", text_len=state.text_len,
                             text_mask=state.model.text_mask)
        return block(img, txt, state.model.temb, state.rope, meta)

    def run_head(self, img: torch.Tensor, state: TokenState) -> torch.Tensor:
        """(B, n, patch_features) fp32 patch values per image token."""
        return linear(self.proj_out, self.norm_out(img, state.model.temb))

    def to_latents(self, patches: torch.Tensor, state: TokenState) -> torch.Tensor:
        """The flow velocity d x / d sigma (the model output as it is: the pipeline steps with it unchanged),
        shaped and typed like the latents."""
        return unpack_latents(patches, state.model.grid).to(state.model.dtype)

    def begin(self, latents: torch.Tensor, t: torch.Tensor, conditioning: Sequence[Conditioning],
              guidance: torch.Tensor | None = None) -> TokenState:
        """t (B,) = 1000 * sigma -> the model's timestep t / 1000, as the diffusers pipeline computes it; one
        conditioning per branch. Texts of different lengths are zero-padded at the end to the longest, and the
        padding (with any rows a branch's own mask excludes) is masked as keys; with no such rows no mask is
        passed, as the pipeline does."""
        if guidance is not None:
            raise ValueError("Qwen-Image has no distilled-guidance input; pass guidance=None (true CFG is a second "
                             "branch)")
        if len(conditioning) != latents.shape[0]:
            raise ValueError(f"{len(conditioning)} conditionings for {latents.shape[0]} branches")
        longest = max(len(c.context) for c in conditioning)
        contexts, masks = [], []
        for c in conditioning:
            n = len(c.context)
            row_mask = torch.ones(n, dtype=torch.bool) if c.mask is None else c.mask.to(torch.bool).cpu()
            if row_mask.shape != (n,):
                raise ValueError(f"a conditioning mask must be ({n},), got {tuple(row_mask.shape)}")
            contexts.append(F.pad(c.context, (0, 0, 0, longest - n)))
            masks.append(F.pad(row_mask, (0, longest - n), value=False))
        mask = torch.stack(masks)
        context = torch.stack(contexts).to(latents.device)
        t = torch.as_tensor(t, dtype=torch.float32, device=latents.device)
        return self.prepare(latents, t / 1000, context, None if bool(mask.all()) else mask)

    CACHE_SIGNALS = ("modulated_input",)

    def cache_signal(self, state: TokenState, name: str) -> CacheSignal:
        """modulated_input: the first block's modulated image tokens, LN(x) * (1 + scale1) + shift1 with the
        image stream's first modulation, (B, n, d) fp32, per token."""
        if name not in self.CACHE_SIGNALS:
            raise ValueError(f"Qwen-Image has no cache signal {name!r}; its signals are "
                             f"{', '.join(self.CACHE_SIGNALS)}")
        if not len(self.transformer_blocks):
            raise ValueError("modulated_input needs a transformer block")
        shift, scale = modulations(self.transformer_blocks[0].img_mod, state.model.temb)[:2]
        return CacheSignal(modulate(state.img, shift, scale), per_token=True)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor | float, context: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """The velocity (B, C, H, W) in the latents' dtype, with the reference's inputs (see `prepare`)."""
        state = self.prepare(latents, timestep, context, mask)
        img, txt = state.img, state.txt
        for block in self.blocks:
            img, txt = self.run_block(block, img, txt, state)
        return self.to_latents(self.run_head(img, state), state)

    # ---- checkpoints ----
    @staticmethod
    def read_config(folder: str | Path) -> QwenImageDiTConfig:
        return read_diffusers_config(folder, DIFFUSERS_CLASS, QwenImageDiTConfig.from_diffusers_json)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                        attn_fn: AttentionFn = sdpa_attention,
                        config: QwenImageDiTConfig | None = None) -> "QwenImageTransformer":
        """Load a diffusers release folder (its `transformer/`) or a `transformer/` folder itself: config.json +
        `diffusion_pytorch_model.safetensors` or its shards and index. Built on the meta device and filled
        strictly: missing, unexpected or mis-shaped keys raise `CheckpointError` naming them and the files.
        `dtype` applies to all but the `keep_fp32` parameters. `config` replaces the one read."""
        folder = diffusers_transformer_folder(path, "Qwen-Image")
        cfg = config or cls.read_config(folder)
        sd, described = load_safetensors_dir(folder)
        with meta_device():
            model = cls(cfg, attn_fn=attn_fn)
        model = load_strict(model, sd, described, dtype=dtype, keep_fp32=cls.keep_fp32, device=device)
        logger.info("loaded Qwen-Image DiT (%d layers, d %d) from %s as %s", cfg.num_layers, cfg.dim, described, dtype)
        return model

    def save_pretrained(self, folder: str | Path, max_shard_bytes: int | None = None) -> Path:
        """Write config.json + `diffusion_pytorch_model*.safetensors` (a diffusers `transformer/` folder)."""
        return save_diffusers_folder(self, self.config.to_diffusers_json(), folder, max_shard_bytes)
