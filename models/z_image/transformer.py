"""The Z-Image(-Turbo) DiT with the exact math of diffusers' `ZImageTransformer2DModel` (basic mode, no SigLIP).

Read top-down: timestep sinusoid -> 3-axis complex RoPE -> RMSNorm -> attention -> block -> final layer ->
patching -> the model. Parameter names are the diffusers keys (`layers.N.attention.to_q`, `noise_refiner.N...`,
`all_x_embedder.2-1`, `x_pad_token`, ...), so a diffusers `transformer/` folder loads strictly with no key map.

The forward (one sample; a batch repeats it per row):
- time: adaln = MLP(sinusoid(1000 * t)), min(d, 256) wide; the model's t is 1 - sigma (see `begin`).
- image: 2x2 patches with channel-last features (pH, pW, C), padded to a multiple of 32 tokens by repeating
  the last patch, embedded, then the pad rows replaced by the learned `x_pad_token`; the modulated noise
  refiner runs on these image tokens alone. Pad tokens are attended like any other token.
- caption: the valid text-encoder rows, padded the same way, RMSNorm + Linear, pad rows -> `cap_pad_token`;
  the unmodulated context refiner runs on them alone (it depends on neither t nor the latents).
- main layers on the unified sequence of both, the final layer, then the real image tokens are unpatched.
- block: a = Attn(RMSNorm1(x) * (1 + s_msa)); x += tanh(g_msa) * RMSNorm2(a);
  x += tanh(g_mlp) * RMSNorm4(SwiGLU(RMSNorm3(x) * (1 + s_mlp))). No shift; the modulation Linear gets the
  time vector without a SiLU. A context-refiner block drops the scales and gates.
- positions (RoPE ids): caption slot i (pad slots included) -> (1 + i, 0, 0); image token (row, col) ->
  (L_pad + 1, row, col) with L_pad the padded caption length; image pad tokens -> (0, 0, 0). Tables are
  float64 angles cast to fp32, then complex64 (`torch.polar`), as the reference computes them.

Sequence order. The reference concatenates [image, caption]; this module hands the attention seam the
text-first joint sequence [caption, image] that `models.attention` and context parallelism expect. The keys
are the same set (where the reference pads a batch's shorter unified sequences at the end and masks them, this
module masks filler rows after the shorter captions), so the result is the same up to the summation order of
the softmax over keys (measured in tests/models/z_image/test_transformer.py).

Precision: the token streams, time vector, norms, RoPE, modulations and final layer outputs are fp32; the
matmuls run in the weight dtype. `keep_fp32` names the parameters kept fp32 under bf16 weights (`cast_weights`).

Speed (benchmarks/dit_forward.py --family z-image), with the math unchanged: every Linear is a `PackedLinear`
(models/cpu_linear.py, shared with Wan and FLUX.1), which on CPU multiplies by a weight prepacked once for
oneDNN (bf16) or MKL (fp32) instead of re-blocking the plain weight on every call; state-dict names are those of
`nn.Linear`. The packed copies cost a second copy of the weights (`packed_weight_bytes`;
`set_weight_prepacking(False)` trades the speed for the memory).

Block protocol (models/denoiser.py): `begin` embeds and runs the context refiner (caption tokens only,
unmodulated: a function of the prompt alone, so it is part of the cheap, replicated prologue; under context
parallelism every rank runs it on the whole caption, with the model's own local attention, not the seam).
`blocks` = noise refiners, then main layers, in forward order; `run_block` dispatches on `block.kind`
("noise": modulated self-attention over the image stream only, kind "self", so context parallelism shards it
like Wan's self-attention; "main": joint attention over [caption, image], text replicated, image sharded).
`TokenState.rope` is text-first (caption rows, then image rows); each kind takes its rows. Its tables are
(rows, width) when every caption of the batch pads to the same length, else (rows, B, width) per sample
(`batch_rope_tables`): rows stay dim 0, so context parallelism slices and shards them unchanged.

Padding and context parallelism: the image stream the blocks see is the padded one (a multiple of 32
tokens, the pads being learned `x_pad_token` rows the reference attends like real tokens), so its length is
the "real" sequence length for the runner; the runner's own zero padding to a multiple of the sp degree (none
for degrees dividing 32) is dropped by the parallel attention, and `unpatch` keeps the first h * w tokens.
"""

from __future__ import annotations

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
from models.dit_ops import RMSNorm, apply_complex_rope, linear
from models.config_files import diffusers_transformer_folder, read_diffusers_config
from models.loading import load_safetensors_dir, load_strict, meta_device, save_diffusers_folder
from models.z_image.config import (
    DIFFUSERS_CLASS,
    SEQ_MULTIPLE,
    TIME_MID,
    Z_IMAGE_LATENT,
    ZImageDiTConfig,
)

logger = logging.getLogger(__name__)

TIME_CHANNELS = 256
"""Width of the timestep sinusoid."""

QK_NORM_EPS = 1e-5
"""eps of the per-head query/key RMSNorms (fixed in the reference, independent of norm_eps)."""

FINAL_NORM_EPS = 1e-6



# ---------------------------------------------------------------------------------------------
# 1. Timestep sinusoid (fp32, cos first)
# ---------------------------------------------------------------------------------------------
def timestep_sinusoid(t: torch.Tensor, dim: int = TIME_CHANNELS) -> torch.Tensor:
    """(B,) already scaled (1000 * t) -> (B, dim) fp32 [cos | sin], frequencies exp(-ln(10000) * i / (dim/2)).

    Same operations in the same order as the reference, so bitwise equal in fp32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


# ---------------------------------------------------------------------------------------------
# 2. RoPE: complex rotation of interleaved channel pairs, per-axis tables indexed by integer ids
# ---------------------------------------------------------------------------------------------
def padded_len(n: int) -> int:
    return n + (-n) % SEQ_MULTIPLE


def position_ids(caption_len: int, grid: tuple[int, int], device: torch.device | str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer ids (caption (L_pad, 3), image (N_pad, 3)) for a caption of `caption_len` valid tokens and an
    (h, w) token grid. Every caption slot, pad or not, is (1 + i, 0, 0); image tokens (L_pad + 1, row, col)
    row-major; image pad tokens (0, 0, 0)."""
    cap_pad = padded_len(caption_len)
    cap = torch.zeros(cap_pad, 3, dtype=torch.long, device=device)
    cap[:, 0] = torch.arange(1, cap_pad + 1, device=device)
    h, w = grid
    img = torch.zeros(padded_len(h * w), 3, dtype=torch.long, device=device)
    real = img[: h * w].view(h, w, 3)
    real[..., 0] = cap_pad + 1
    real[..., 1] = torch.arange(h, device=device)[:, None]
    real[..., 2] = torch.arange(w, device=device)[None, :]
    return cap, img


def rope_tables(ids: torch.Tensor, axes_dims: Sequence[int], axes_lens: Sequence[int], theta: float) -> RopeTables:
    """(cos, sin), each (S, sum(axes_dims) / 2) fp32: the real and imaginary parts of the complex64 rotation
    of each channel pair. Axis i has angles pos * theta^(-2j / axes_dims[i]) for pos < axes_lens[i]."""
    for axis, (length, col) in enumerate(zip(axes_lens, ids.unbind(-1))):
        if len(col) and int(col.max()) >= length:
            raise ValueError(f"RoPE position {int(col.max())} on axis {axis} exceeds the model's table of {length} "
                             f"(axes_lens {tuple(axes_lens)}): caption or image too long for this checkpoint")
    parts = []
    for axis, (dim, length) in enumerate(zip(axes_dims, axes_lens)):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angles = torch.outer(torch.arange(length, dtype=torch.float64), freqs).float()
        table = torch.polar(torch.ones_like(angles), angles).to(ids.device)  # complex64, like the reference
        parts.append(table[ids[:, axis]])
    rot = torch.cat(parts, dim=-1)
    return rot.real.contiguous(), rot.imag.contiguous()


def batch_rope_tables(caption_lens: Sequence[int], grid: tuple[int, int], axes_dims: Sequence[int],
                      axes_lens: Sequence[int], theta: float, device: torch.device | str | None = None) -> RopeTables:
    """Tables of a batch whose captions pad to different lengths: (cos, sin), each (L + N_pad, B, width / 2),
    sample-major on dim 1 so that slicing rows (dim 0) works as for shared tables. Sample b's caption rows are
    its own ids for its padded length, then filler rows (masked in attention) up to the longest L; its image
    rows start at its own padded length + 1, as the reference positions each sample."""
    longest = max(padded_len(n) for n in caption_lens)
    per_sample = []
    for n in caption_lens:
        cap_ids, img_ids = position_ids(n, grid, device)
        filler = torch.zeros(longest - len(cap_ids), 3, dtype=torch.long, device=device)
        per_sample.append(rope_tables(torch.cat([cap_ids, filler, img_ids]), axes_dims, axes_lens, theta))
    return torch.stack([c for c, _ in per_sample], dim=1), torch.stack([s for _, s in per_sample], dim=1)


def rotate(x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
    """x (B, L, H, D) rotated by shared (L, D/2) tables (`apply_complex_rope`) or per-sample (L, B, D/2) ones
    (`batch_rope_tables`), with the same complex product."""
    if rope[0].ndim == 2:
        return apply_complex_rope(x, rope)
    cos, sin = rope
    rot = torch.complex(cos, sin).transpose(0, 1)[:, :, None, :]
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rot).flatten(3).type_as(x)


# ---------------------------------------------------------------------------------------------
# 3. Attention (q, k, v, out without bias; per-head RMSNorm on q and k; RoPE)
# ---------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        head_dim = dim // n_heads
        self.to_q = PackedLinear(dim, dim, bias=False)
        self.to_k = PackedLinear(dim, dim, bias=False)
        self.to_v = PackedLinear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([PackedLinear(dim, dim, bias=False)])
        self.norm_q = RMSNorm(head_dim, QK_NORM_EPS)
        self.norm_k = RMSNorm(head_dim, QK_NORM_EPS)

    def forward(self, x: torch.Tensor, rope: RopeTables, attn_fn: AttentionFn, meta: AttentionMeta) -> torch.Tensor:
        q, k, v = (linear(proj, x).unflatten(-1, (self.n_heads, -1)) for proj in (self.to_q, self.to_k, self.to_v))
        q = rotate(self.norm_q(q), rope)
        k = rotate(self.norm_k(k), rope)
        out = attn_fn(q, k, v, meta)
        return linear(self.to_out[0], out.flatten(2))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = PackedLinear(dim, hidden, bias=False)
        self.w2 = PackedLinear(hidden, dim, bias=False)
        self.w3 = PackedLinear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.w2, F.silu(linear(self.w1, x)) * linear(self.w3, x))


# ---------------------------------------------------------------------------------------------
# 4. Block: sandwich RMSNorms, tanh gates, scale without shift
# ---------------------------------------------------------------------------------------------
class ZImageBlock(nn.Module):
    """One Z-Image transformer block. kind: "noise" (noise refiner, modulated, image tokens), "context"
    (context refiner, unmodulated, caption tokens) or "main" (modulated, the unified sequence).
    layer: index in the protocol's `blocks` (AttentionMeta.layer); -1 for a context-refiner block, which is
    not one of them (it runs in `begin`)."""

    def __init__(self, config: ZImageDiTConfig, kind: str, layer: int, attn_fn: AttentionFn) -> None:
        super().__init__()
        if kind not in ("noise", "context", "main"):
            raise ValueError(f"block kind {kind!r}")
        d, eps = config.dim, config.norm_eps
        self.kind = kind
        self.layer = layer
        self.attn_fn = attn_fn
        self.attention = Attention(d, config.n_heads)
        self.feed_forward = FeedForward(d, config.ffn_hidden)
        self.attention_norm1 = RMSNorm(d, eps)
        self.ffn_norm1 = RMSNorm(d, eps)
        self.attention_norm2 = RMSNorm(d, eps)
        self.ffn_norm2 = RMSNorm(d, eps)
        self.modulation = kind != "context"
        if self.modulation:
            self.adaLN_modulation = nn.Sequential(PackedLinear(config.adaln_dim, 4 * d))

    def modulations(self, adaln: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(1 + scale_msa, tanh gate_msa, 1 + scale_mlp, tanh gate_mlp), each (B, 1, d) fp32."""
        scale_msa, gate_msa, scale_mlp, gate_mlp = linear(self.adaLN_modulation[0], adaln).unsqueeze(1).chunk(4, dim=2)
        return 1.0 + scale_msa, gate_msa.tanh(), 1.0 + scale_mlp, gate_mlp.tanh()

    def forward(self, x: torch.Tensor, rope: RopeTables, adaln: torch.Tensor | None, meta: AttentionMeta
                ) -> torch.Tensor:
        """x (B, L, d) fp32 -> (B, L, d) fp32 (a new tensor); rope covers the L rows; adaln (B, adaln_dim)."""
        if self.modulation:
            if adaln is None:
                raise ValueError(f"a {self.kind} block needs the time vector")
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.modulations(adaln)
            attn = self.attention(self.attention_norm1(x) * scale_msa, rope, self.attn_fn, meta)
            x = x + gate_msa * self.attention_norm2(attn)
            return x + gate_mlp * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * scale_mlp))
        attn = self.attention(self.attention_norm1(x), rope, self.attn_fn, meta)
        x = x + self.attention_norm2(attn)
        return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))


# ---------------------------------------------------------------------------------------------
# 5. Embedders and final layer
# ---------------------------------------------------------------------------------------------
class TimestepEmbedder(nn.Module):
    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(PackedLinear(TIME_CHANNELS, TIME_MID), nn.SiLU(), PackedLinear(TIME_MID, out_dim))

    def forward(self, t_scaled: torch.Tensor) -> torch.Tensor:
        return linear(self.mlp[2], F.silu(linear(self.mlp[0], timestep_sinusoid(t_scaled))))


class FinalLayer(nn.Module):
    """LayerNorm (no affine, eps 1e-6) * (1 + Linear(SiLU(adaln))), then Linear to patch values."""

    def __init__(self, dim: int, out_features: int, adaln_dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=FINAL_NORM_EPS)
        self.linear = PackedLinear(dim, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), PackedLinear(adaln_dim, dim))

    def forward(self, x: torch.Tensor, adaln: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + linear(self.adaLN_modulation[1], F.silu(adaln))
        return linear(self.linear, self.norm_final(x.float()) * scale.unsqueeze(1))


# ---------------------------------------------------------------------------------------------
# 6. Patching: channel-last 2x2 patches, padding to a multiple of 32
# ---------------------------------------------------------------------------------------------
def patchify(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), p*p*C): tokens row-major, features ordered (pH, pW, C)."""
    b, c, height, width = latents.shape
    x = latents.reshape(b, c, height // patch, patch, width // patch, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (height // patch) * (width // patch), patch * patch * c)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Inverse of `patchify` on the h*w real tokens: (B, h*w, p*p*C) -> (B, C, h*p, w*p)."""
    h, w = grid
    b, _, features = tokens.shape
    c = features // (patch * patch)
    x = tokens.reshape(b, h, w, patch, patch, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, h * patch, w * patch)


def pad_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, n, F) -> (B, padded_len(n), F), repeating the last row (the reference's padding before embedding)."""
    missing = padded_len(x.shape[1]) - x.shape[1]
    return torch.cat([x, x[:, -1:].expand(-1, missing, -1)], dim=1) if missing else x


def with_pad_token(x: torch.Tensor, real: int, token: torch.Tensor) -> torch.Tensor:
    """Rows from `real` on replaced by the learned pad token (1, d)."""
    if real == x.shape[1]:
        return x
    return torch.cat([x[:, :real], token.float().expand(x.shape[0], x.shape[1] - real, -1)], dim=1)


# ---------------------------------------------------------------------------------------------
# 7. The model
# ---------------------------------------------------------------------------------------------
@dataclass
class ZImageForwardState:
    """Per-forward values the blocks and the head need (`TokenState.model`).

    adaln: (B, adaln_dim) fp32 time vector; grid: (h, w) token grid; image_len: real image tokens (h * w;
    the stream holds padded_len of them); caption_lens: valid caption tokens per sample (the stream holds
    `TokenState.text_len` rows, the longest padded length); dtype: the latents' dtype; text_mask: (B, text_len)
    bool, False on the filler rows of captions that pad to less than the longest (None when all pad alike).
    """

    adaln: torch.Tensor
    grid: tuple[int, int]
    image_len: int
    caption_lens: tuple[int, ...]
    dtype: torch.dtype
    text_mask: torch.Tensor | None = None


_FP32_PARAMS = re.compile(r"^(t_embedder\.|cap_embedder\.0\.|x_pad_token$|cap_pad_token$|all_final_layer\.)"
                          r"|norm[^.]*\.weight$")


class ZImageTransformer(PackedWeights, nn.Module):
    """Z-Image(-Turbo) DiT. config: network shape; attn_fn: the attention function behind the seam,
    (B, L, H, D) layout. Use `from_pretrained` for checkpoints."""

    latent = Z_IMAGE_LATENT

    def __init__(self, config: ZImageDiTConfig, attn_fn: AttentionFn = sdpa_attention) -> None:
        super().__init__()
        self.config = config
        d, key = config.dim, config.embedder_key
        self.all_x_embedder = nn.ModuleDict({key: PackedLinear(config.patch_features, d)})
        self.all_final_layer = nn.ModuleDict({key: FinalLayer(d, config.patch_features, config.adaln_dim)})
        r = config.n_refiner_layers
        self.noise_refiner = nn.ModuleList(ZImageBlock(config, "noise", i, attn_fn) for i in range(r))
        # attn_fn stays this refiner's own: it runs in `begin` on the whole caption of every rank, off the seam
        self.context_refiner = nn.ModuleList(ZImageBlock(config, "context", -1, attn_fn) for _ in range(r))
        self.t_embedder = TimestepEmbedder(config.adaln_dim)
        self.cap_embedder = nn.Sequential(RMSNorm(config.cap_feat_dim, config.norm_eps),
                                          PackedLinear(config.cap_feat_dim, d))
        self.x_pad_token = nn.Parameter(torch.zeros(1, d))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, d))
        self.layers = nn.ModuleList(ZImageBlock(config, "main", r + i, attn_fn) for i in range(config.n_layers))

    # ---- precision policy ----
    @classmethod
    def keep_fp32(cls, name: str) -> bool:
        """True for parameters kept fp32 under bf16 weights (time MLP, caption norm, every norm, pad tokens,
        final layer)."""
        return _FP32_PARAMS.search(name) is not None

    def set_attention(self, attn_fn: AttentionFn) -> None:
        """The seam of the protocol's blocks (the context refiner keeps its local attention, see `begin`)."""
        for block in self.blocks:
            block.attn_fn = attn_fn

    # ---- block protocol ----
    @property
    def blocks(self) -> list[ZImageBlock]:
        """Noise refiners, then main layers: forward order (the context refiner runs in `begin`)."""
        return [*self.noise_refiner, *self.layers]

    def rope(self, caption_len: int | Sequence[int], grid: tuple[int, int],
             device: torch.device | str | None = None) -> RopeTables:
        """Text-first tables: the L_pad caption rows, then the padded image rows, shared (S, width / 2) when every
        caption of the batch pads to the same length, else per sample (`batch_rope_tables`); the last are kept."""
        lens = (caption_len,) if isinstance(caption_len, int) else tuple(int(n) for n in caption_len)
        pads = tuple(padded_len(n) for n in lens)
        shared = len(set(pads)) == 1
        key = (pads[:1] if shared else pads, tuple(grid), torch.device(device) if device is not None else None)
        cached = self.__dict__.get("_rope_cache")
        if cached is None or cached[0] != key:
            cfg = self.config
            with torch.inference_mode(False):
                if shared:
                    cap_ids, img_ids = position_ids(lens[0], grid, device)
                    tables = rope_tables(torch.cat([cap_ids, img_ids]), cfg.axes_dims, cfg.axes_lens, cfg.rope_theta)
                else:
                    tables = batch_rope_tables(lens, grid, cfg.axes_dims, cfg.axes_lens, cfg.rope_theta, device)
            cached = self._rope_cache = (key, tables)
        return cached[1]

    def prepare(self, latents: torch.Tensor, t_model: torch.Tensor | float,
                captions: torch.Tensor | Sequence[torch.Tensor]) -> TokenState:
        """Embed time, image and caption tokens and run the context refiner on the caption (the noise refiner
        is the first of `blocks`).

        latents: (B, in_channels, H, W), H and W multiples of the patch size; t_model: (B,) or a scalar, the
        model's own time (1 - sigma; the diffusers pipeline passes (1000 - 1000 sigma) / 1000);
        captions: (B, L, cap_feat_dim), the L valid text-encoder rows of every sample, or B tensors (L_b,
        cap_feat_dim) of different lengths. Each caption is padded to a multiple of 32 with the learned pad token;
        a caption that pads to less than the longest gets filler rows after its own, masked in every attention
        (the reference pads and masks its unified sequences the same way), and its own positions.
        """
        cfg = self.config
        p = cfg.patch_size
        if latents.ndim != 4 or latents.shape[1] != cfg.in_channels:
            raise ValueError(f"latents must be (B, {cfg.in_channels}, H, W), got {tuple(latents.shape)}")
        batch, _, height, width = latents.shape
        if height % p or width % p:
            raise ValueError(f"latent height and width {(height, width)} must be multiples of the patch size {p}")
        caps = list(captions)
        if len(caps) != batch or any(c.ndim != 2 or c.shape[1] != cfg.cap_feat_dim for c in caps):
            shapes = tuple(captions.shape) if isinstance(captions, torch.Tensor) else [tuple(c.shape) for c in caps]
            raise ValueError(f"captions must be (B={batch}, L, {cfg.cap_feat_dim}) or {batch} tensors "
                             f"(L_b, {cfg.cap_feat_dim}), got {shapes}")
        if any(len(c) == 0 for c in caps):
            raise ValueError("a caption has no tokens; Z-Image needs at least one (the empty prompt still has "
                             "its chat-template tokens)")
        t_model = torch.as_tensor(t_model, dtype=torch.float32, device=latents.device)
        if t_model.ndim == 0:
            t_model = t_model.expand(batch)
        if t_model.shape != (batch,):
            raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t_model.shape)}")

        grid = (height // p, width // p)
        image_len, lens = grid[0] * grid[1], tuple(len(c) for c in caps)
        adaln = self.t_embedder(t_model * cfg.t_scale)
        embed = self.all_x_embedder[cfg.embedder_key]
        img = with_pad_token(linear(embed, pad_rows(patchify(latents, p))), image_len, self.x_pad_token)
        txt, text_mask = self._embed_captions(caps)
        rope = self.rope(lens, grid, latents.device)
        n_txt = txt.shape[1]
        txt_rope = (rope[0][:n_txt], rope[1][:n_txt])
        for block in self.context_refiner:  # caption-only self-attention, unmodulated
            txt = block(txt, txt_rope, None, AttentionMeta(layer=block.layer, kind="self", text_mask=text_mask))
        state = ZImageForwardState(adaln=adaln, grid=grid, image_len=image_len, caption_lens=lens,
                                   dtype=latents.dtype, text_mask=text_mask)
        return TokenState(img=img, txt=txt, rope=rope, text_len=txt.shape[1], model=state)

    def _embed_captions(self, caps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L, d) fp32 caption tokens (L: the longest padded length) and the (B, L) filler mask or None.

        As the reference: every caption padded by repeating its last row, all rows embedded as one matrix,
        then each caption's pad rows replaced by `cap_pad_token`."""
        padded = [pad_rows(c[None])[0] for c in caps]
        rows = linear(self.cap_embedder[1], self.cap_embedder[0](torch.cat(padded)))
        parts = [with_pad_token(x[None], len(c), self.cap_pad_token)
                 for x, c in zip(rows.split([len(x) for x in padded]), caps)]
        longest = max(x.shape[1] for x in parts)
        if all(x.shape[1] == longest for x in parts):
            return torch.cat(parts), None
        mask = torch.zeros(len(parts), longest, dtype=torch.bool, device=rows.device)
        for b, x in enumerate(parts):
            mask[b, : x.shape[1]] = True
        parts = [torch.cat([x, x.new_zeros(1, longest - x.shape[1], x.shape[2])], dim=1) for x in parts]
        return torch.cat(parts), mask

    def run_block(self, block: ZImageBlock, img: torch.Tensor, txt: torch.Tensor | None,
                  state: TokenState) -> tuple[torch.Tensor, torch.Tensor | None]:
        """noise: image tokens with the image rows of the RoPE (self-attention); main: cat(caption, image) with
        all rows (joint attention, text first)."""
        if txt is None:
            raise ValueError("Z-Image keeps a caption stream; txt must not be None")
        n_txt = state.text_len
        adaln = state.model.adaln
        if block.kind == "noise":
            rope = tuple(r[n_txt:] for r in state.rope)
            return block(img, rope, adaln, AttentionMeta(layer=block.layer, kind="self")), txt
        if block.kind != "main":
            raise ValueError(f"a {block.kind} block is not one of `blocks` (the context refiner runs in begin)")
        x = block(torch.cat([txt, img], dim=1), state.rope, adaln,
                  AttentionMeta(layer=block.layer, kind="joint", text_len=n_txt, text_mask=state.model.text_mask))
        return x[:, n_txt:], x[:, :n_txt]

    def run_head(self, img: torch.Tensor, state: TokenState) -> torch.Tensor:
        """(B, n, patch_features) fp32 model output per image token (pad tokens included)."""
        return self.all_final_layer[self.config.embedder_key](img, state.model.adaln)

    def unpatch(self, patches: torch.Tensor, state: TokenState) -> torch.Tensor:
        """The model output on the real image tokens as latents (B, C, H, W) fp32 (the reference's sign)."""
        return unpatchify(patches[:, : state.model.image_len], state.model.grid, self.config.patch_size)

    def to_latents(self, patches: torch.Tensor, state: TokenState) -> torch.Tensor:
        """The flow velocity d x / d sigma: the model output negated (the diffusers pipeline negates it)."""
        return (-self.unpatch(patches, state)).to(state.model.dtype)

    def begin(self, latents: torch.Tensor, t: torch.Tensor, conditioning: Sequence[Conditioning],
              guidance: torch.Tensor | None = None) -> TokenState:
        """t (B,) = 1000 * sigma -> the model's time (1000 - t) / 1000, as the diffusers pipeline computes it;
        one conditioning per branch (its valid rows: `mask` selects them when given); the branches' captions may
        differ in length (a CFG pair: prompt and negative prompt, see `prepare`)."""
        if guidance is not None:
            raise ValueError("Z-Image has no distilled-guidance input; pass guidance=None (CFG is a second branch)")
        if len(conditioning) != latents.shape[0]:
            raise ValueError(f"{len(conditioning)} conditionings for {latents.shape[0]} branches")
        contexts = [c.context[c.mask.to(torch.bool)] if c.mask is not None else c.context for c in conditioning]
        t = torch.as_tensor(t, dtype=torch.float32, device=latents.device)
        t_model = (1000 - t) / 1000
        return self.prepare(latents, t_model, [c.to(latents.device) for c in contexts])

    CACHE_SIGNALS = ("modulated_input",)

    def cache_signal(self, state: TokenState, name: str) -> CacheSignal:
        """modulated_input: the first noise-refiner block's modulated image tokens, RMSNorm1(x) * (1 + s_msa),
        (B, n, d) fp32, per token."""
        if name not in self.CACHE_SIGNALS:
            raise ValueError(f"Z-Image has no cache signal {name!r}; its signals are {', '.join(self.CACHE_SIGNALS)}")
        if not len(self.noise_refiner):
            raise ValueError("modulated_input needs a noise-refiner block")
        first = self.noise_refiner[0]
        scale_msa = first.modulations(state.model.adaln)[0]
        return CacheSignal(first.attention_norm1(state.img) * scale_msa, per_token=True)

    def forward(self, latents: torch.Tensor, t_model: torch.Tensor | float,
                captions: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """The raw model output (B, C, H, W) fp32 with diffusers' conventions: t_model = 1 - sigma, not negated
        (see `prepare`). The sampler's velocity is its negation (`begin`/`to_latents`)."""
        state = self.prepare(latents, t_model, captions)
        img, txt = state.img, state.txt
        for block in self.blocks:
            img, txt = self.run_block(block, img, txt, state)
        return self.unpatch(self.run_head(img, state), state)

    # ---- checkpoints ----
    @staticmethod
    def read_config(folder: str | Path) -> ZImageDiTConfig:
        return read_diffusers_config(folder, DIFFUSERS_CLASS, ZImageDiTConfig.from_diffusers_json)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                        attn_fn: AttentionFn = sdpa_attention,
                        config: ZImageDiTConfig | None = None) -> "ZImageTransformer":
        """Load a diffusers release folder (its `transformer/`) or a `transformer/` folder itself: config.json +
        `diffusion_pytorch_model.safetensors` or its shards and index. Built on the meta device and filled
        strictly: missing, unexpected or mis-shaped keys raise `CheckpointError` naming them and the files.
        `dtype` applies to all but the `keep_fp32` parameters. `config` replaces the one read."""
        folder = diffusers_transformer_folder(path, "Z-Image")
        cfg = config or cls.read_config(folder)
        sd, described = load_safetensors_dir(folder)
        with meta_device():
            model = cls(cfg, attn_fn=attn_fn)
        model = load_strict(model, sd, described, dtype=dtype, keep_fp32=cls.keep_fp32, device=device)
        logger.info("loaded Z-Image DiT (%d layers + %d/%d refiners, d %d) from %s as %s", cfg.n_layers,
                    cfg.n_refiner_layers, cfg.n_refiner_layers, cfg.dim, described, dtype)
        return model

    def save_pretrained(self, folder: str | Path, max_shard_bytes: int | None = None) -> Path:
        """Write config.json + `diffusion_pytorch_model*.safetensors` (a diffusers `transformer/` folder)."""
        return save_diffusers_folder(self, self.config.to_diffusers_json(), folder, max_shard_bytes)
