"""One DiT forward: our model vs diffusers' with the same weights and inputs, for each DiT family.

`--family wan` (the default): native `WanTransformer` vs diffusers `WanTransformer3DModel`, a few layers at the
real Wan2.1-1.3B width (dim 1536, 12 heads, ffn 8960, text 512 x 4096) on >= 1,500 video tokens.
`--family flux`: native `FluxTransformer` vs diffusers `FluxTransformer2DModel` (dev, with the guidance
embedding), a few double- and single-stream blocks at the real FLUX.1 width (3072, 24 heads of 128, MLP 12288,
T5 context 4096, CLIP pooled 768) on a 64x64 latent (512x512 px: 1,024 image tokens) plus 512 text tokens.
`--family qwen-image`: native `QwenImageTransformer` vs `QwenImageTransformer2DModel`, a few dual-stream blocks at
the real width (3072, 24 heads, text 3584) on 1,024 image tokens plus `--text-len` text tokens.
`--family flux2`: native `Flux2Transformer` vs `Flux2Transformer2DModel` (klein), a few double- and single-stream
blocks at the real klein-4B width (3072, 24 heads, SwiGLU 9216, text 7680) on 1,024 image tokens plus the text.
`--family z-image`: native `ZImageTransformer` vs `ZImageTransformer2DModel`, the two refiners of each kind and a
few main blocks at the real width (3840, 30 heads, SwiGLU 10240, text 2560) on 1,024 image tokens plus the caption.

Both run in fp32 and in bf16, in one process. The two models' runs are interleaved (alternating which goes
first) and the medians are reported, because the machine may be shared; "paired" is the median of the
per-repeat ratios, which cancels slow drifts in machine speed. Achieved GFLOP/s counts the matmul and
attention FLOPs analytically (elementwise work is not counted).

"Peak" is the best GEMM rate measured in the same run and dtype: between the repeats, every GEMM of
`wan_gemms` / `flux_gemms` (the model's largest GEMMs at this run's token counts, plus one square
2048 x 2048 x 4096) is timed as a plain `torch.mm`, through `PackedLinear` (the prepacked GEMM our models use:
oneDNN in bf16, MKL in fp32) and through `PackedLinear` with the GELU epilogue (oneDNN in fp32 too, as our
MLP up-projections run it); the best sample of any of them is the peak. Our forward can still come close to it, but not above it by more
than the noise (the attention runs in SDPA, the rest is elementwise).

bf16 follows each implementation's own precision policy: ours keeps its `keep_fp32` parameters and the residual
stream in fp32; diffusers keeps its `_keep_in_fp32_modules` in fp32 (as its `from_pretrained(torch_dtype=bf16)`
does; FLUX has none) and carries the residual stream in bf16. For FLUX, diffusers is called the way its
pipeline calls it in the denoising loop: latents already packed and the position ids built once, outside the
timed call (our model packs the latents and builds or reuses its RoPE tables inside it).

Ours prepacks its CPU GEMM weights on the first (warm-up) forward (`PackedLinear`); the timed repeats exclude
that, as they exclude diffusers' first-call costs. The JSON records both first forwards (`first_forward_s`)
and the memory the packed copies take (`ours_packed_weight_bytes`, next to `ours_param_bytes`); a PNG next to
the JSON plots the times and the GFLOP/s against the peak.

    .venv/bin/python benchmarks/dit_forward.py --layers 2 --frames 5 --height 24 --width 52 --repeats 7
    .venv/bin/python benchmarks/dit_forward.py --family flux --double 2 --single 2 --height 64 --width 64 \\
        --text-len 512 --repeats 5
    .venv/bin/python benchmarks/dit_forward.py --family qwen-image --layers 2 --text-len 256 --repeats 5
    .venv/bin/python benchmarks/dit_forward.py --family z-image --layers 2 --text-len 256 --repeats 5
    .venv/bin/python benchmarks/dit_forward.py --family flux2 --double 2 --single 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.cpu_linear import PackedLinear  # noqa: E402
from models.flux.config import FluxDiTConfig  # noqa: E402
from models.flux2.config import Flux2DiTConfig  # noqa: E402
from models.qwen_image.config import QwenImageDiTConfig  # noqa: E402
from models.random_init import randomize_parameters  # noqa: E402
from models.wan.config import WanDiTConfig  # noqa: E402
from models.z_image.config import ZImageDiTConfig  # noqa: E402

logger = logging.getLogger("dit_forward")

RESULTS = Path(__file__).resolve().parent / "results"
Gemm = tuple[int, int, int]
"""(rows m, inner k, columns n) of one GEMM (m x k) @ (k x n)."""

SQUARE_GEMM: Gemm = (2048, 2048, 4096)
TIME_CHANNELS = 256  # FLUX's timestep / guidance sinusoid width (models.flux.transformer.TIME_CHANNELS)


# ---------------------------------------------------------------------------------------------
# FLOP counts and the GEMMs the models run
# ---------------------------------------------------------------------------------------------
def forward_flops(cfg: WanDiTConfig, batch: int, tokens: int) -> float:
    """Wan: matmul + attention FLOPs of one forward (2 per multiply-add); elementwise work is not counted."""
    d, f, n, text = cfg.dim, cfg.ffn_dim, tokens, cfg.text_len
    patch = 2 * n * cfg.in_dim * (cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]) * d
    text_mlp = 2 * text * (cfg.text_dim * d + d * d)
    time_mlp = 2 * (cfg.freq_dim * d + d * d + 6 * d * d)
    block = (
        2 * n * d * 3 * d  # self q, k, v
        + 4 * n * n * d  # self-attention QK^T and PV
        + 2 * n * d * d  # self o
        + 2 * n * d * d * 2  # cross q, o
        + 2 * text * d * 2 * d  # cross k, v
        + 4 * n * text * d  # cross-attention QK^T and PV
        + 4 * n * d * f  # FFN
    )
    head = 2 * n * d * cfg.out_dim * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    return float(batch * (patch + text_mlp + time_mlp + cfg.num_layers * block + head))


def flux_forward_flops(cfg: FluxDiTConfig, batch: int, tokens: int, text_len: int) -> float:
    """FLUX.1: matmul + attention FLOPs of one forward (2 per multiply-add); elementwise work is not counted."""
    d, m, n, s = cfg.hidden_size, cfg.mlp_hidden, tokens, tokens + text_len
    embed = 2 * n * cfg.in_channels * d + 2 * text_len * cfg.context_dim * d
    vec = 2 * (TIME_CHANNELS * d + d * d) * (2 if cfg.guidance_embed else 1) + 2 * (cfg.pooled_dim * d + d * d)
    attention = 4 * s * s * d  # QK^T and PV over the joint sequence
    double = 2 * s * d * 3 * d + attention + 2 * s * d * d + 4 * s * d * m + 2 * (2 * d * 6 * d)
    single = 2 * s * d * (3 * d + m) + attention + 2 * s * (d + m) * d + 2 * d * 3 * d
    final = 2 * d * 2 * d + 2 * n * d * cfg.in_channels
    return float(batch * (embed + vec + cfg.num_double_blocks * double + cfg.num_single_blocks * single + final))


def qwen_image_forward_flops(cfg: QwenImageDiTConfig, batch: int, tokens: int, text_len: int) -> float:
    """Qwen-Image: matmul + attention FLOPs of one forward; both streams of every block have their own weights."""
    d, n, s = cfg.dim, tokens, tokens + text_len
    embed = 2 * n * cfg.in_channels * d + 2 * text_len * cfg.joint_attention_dim * d + 2 * (TIME_CHANNELS * d + d * d)
    block = 2 * 2 * d * 6 * d + 2 * s * d * 3 * d + 4 * s * s * d + 2 * s * d * d + 2 * s * d * 4 * d * 2
    final = 2 * d * 2 * d + 2 * n * d * cfg.in_channels
    return float(batch * (embed + cfg.num_layers * block + final))


def flux2_forward_flops(cfg: Flux2DiTConfig, batch: int, tokens: int, text_len: int) -> float:
    """FLUX.2: matmul + attention FLOPs of one forward; the modulations are computed once and shared."""
    d, m, n, s = cfg.hidden_size, cfg.mlp_hidden, tokens, tokens + text_len
    embed = 2 * n * cfg.in_channels * d + 2 * text_len * cfg.context_dim * d
    vec = 2 * (TIME_CHANNELS * d + d * d) * (2 if cfg.guidance_embed else 1) + 2 * d * (6 + 6 + 3) * d
    attention = 4 * s * s * d
    double = 2 * s * d * 3 * d + attention + 2 * s * d * d + 2 * s * d * 2 * m + 2 * s * m * d
    single = 2 * s * d * (3 * d + 2 * m) + attention + 2 * s * (d + m) * d
    final = 2 * d * 2 * d + 2 * n * d * cfg.in_channels
    return float(batch * (embed + vec + cfg.num_double_blocks * double + cfg.num_single_blocks * single + final))


def z_image_forward_flops(cfg: ZImageDiTConfig, batch: int, tokens: int, text_len: int) -> float:
    """Z-Image: matmul + attention FLOPs of one forward. Image and caption are each padded to a multiple of 32
    (the pad rows are computed and attended like real ones); the refiners see one stream, the main blocks both."""
    d, h = cfg.dim, cfg.ffn_hidden
    adaln = min(d, TIME_CHANNELS)  # the time embedding's width (256 at the release's width)
    n, c = -(-tokens // 32) * 32, -(-text_len // 32) * 32
    patch = cfg.in_channels * cfg.patch_size ** 2 * cfg.f_patch_size

    def block(rows: int, modulated: bool) -> int:
        return (2 * rows * d * 3 * d + 4 * rows * rows * d + 2 * rows * d * d + 2 * rows * d * h * 3
                + (2 * adaln * 4 * d if modulated else 0))

    embed = 2 * n * patch * d + 2 * c * cfg.cap_feat_dim * d + 2 * (TIME_CHANNELS * 1024 + 1024 * adaln)
    refiners = cfg.n_refiner_layers * (block(n, True) + block(c, False))
    final = 2 * adaln * d + 2 * n * d * patch
    return float(batch * (embed + refiners + cfg.n_layers * block(n + c, True) + final))


def wan_gemms(cfg: WanDiTConfig, batch: int, tokens: int) -> list[Gemm]:
    """Wan's largest GEMMs: FFN up and down, the attention projections, the 512-row text MLP."""
    n = batch * tokens
    return [(n, cfg.dim, cfg.ffn_dim), (n, cfg.ffn_dim, cfg.dim), (n, cfg.dim, cfg.dim),
            (batch * cfg.text_len, cfg.text_dim, cfg.dim)]


def flux_gemms(cfg: FluxDiTConfig, batch: int, tokens: int, text_len: int) -> list[Gemm]:
    """FLUX's largest GEMMs: the single blocks' linear1 and linear2, the image MLP's up and down, image qkv."""
    d, m, s = cfg.hidden_size, cfg.mlp_hidden, batch * (tokens + text_len)
    n = batch * tokens
    return [(s, d, 3 * d + m), (s, d + m, d), (n, d, m), (n, m, d), (n, d, 3 * d)]


def flux2_gemms(cfg: Flux2DiTConfig, batch: int, tokens: int, text_len: int) -> list[Gemm]:
    """FLUX.2's largest GEMMs: the single blocks' fused qkv + SwiGLU up and their output, the image MLP."""
    d, m, s = cfg.hidden_size, cfg.mlp_hidden, batch * (tokens + text_len)
    n = batch * tokens
    return [(s, d, 3 * d + 2 * m), (s, d + m, d), (n, d, 2 * m), (n, m, d)]


def qwen_image_gemms(cfg: QwenImageDiTConfig, batch: int, tokens: int, text_len: int) -> list[Gemm]:
    """Qwen-Image's largest GEMMs: the image MLP's up and down, the image q/k/v, the text MLP's up."""
    d, n = cfg.dim, batch * tokens
    return [(n, d, 4 * d), (n, 4 * d, d), (n, d, d), (batch * text_len, d, 4 * d)]


def z_image_gemms(cfg: ZImageDiTConfig, batch: int, tokens: int, text_len: int) -> list[Gemm]:
    """Z-Image's largest GEMMs, over the joint [image, caption] rows: SwiGLU up (w1, w3) and down, q/k/v."""
    d, s = cfg.dim, batch * (-(-tokens // 32) * 32 + -(-text_len // 32) * 32)
    return [(s, d, cfg.ffn_hidden), (s, cfg.ffn_hidden, d), (s, d, d)]


# ---------------------------------------------------------------------------------------------
# The peak: the best of plain and prepacked GEMMs at the model's shapes
# ---------------------------------------------------------------------------------------------
@dataclass
class GemmPeak:
    """Plain `torch.mm` and `PackedLinear` GEMMs of the given shapes in one dtype; `sample` times each once."""

    dtype: torch.dtype
    shapes: list[Gemm]
    samples: dict[str, list[float]] = field(default_factory=dict)  # name -> GFLOP/s per sample

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(3)
        self._calls: dict[str, tuple[Callable[[], torch.Tensor], float]] = {}
        for m, k, n in dict.fromkeys([*self.shapes, SQUARE_GEMM]):  # unique, in order
            a = torch.randn(m, k, generator=gen).to(self.dtype)
            b = torch.randn(k, n, generator=gen).to(self.dtype)
            layer = PackedLinear(k, n).to(self.dtype).requires_grad_(False)
            flops = 2.0 * m * k * n
            self._calls[f"mm {m}x{k}x{n}"] = (lambda a=a, b=b: torch.mm(a, b), flops)
            self._calls[f"packed {m}x{k}x{n}"] = (lambda a=a, layer=layer: layer(a), flops)
            # GELU in the epilogue: more work than the GEMM alone, but in fp32 this is the oneDNN kernel
            # (the plain packed one is MKL's), which our FFN / MLP up-projections run and which can be faster
            self._calls[f"packed+gelu {m}x{k}x{n}"] = (lambda a=a, layer=layer: layer(a, gelu=True), flops)
        with torch.inference_mode():
            for fn, _ in self._calls.values():
                fn()  # warm-up; packs the PackedLinear weights

    def sample(self) -> float:
        """Time every GEMM once; returns the best GFLOP/s of this sample."""
        best = 0.0
        with torch.inference_mode():
            for name, (fn, flops) in self._calls.items():
                start = time.perf_counter()
                fn()
                rate = flops / (time.perf_counter() - start) / 1e9
                self.samples.setdefault(name, []).append(rate)
                best = max(best, rate)
        return best

    @property
    def best_by_gemm(self) -> dict[str, float]:
        return {name: max(v) for name, v in self.samples.items()}


# ---------------------------------------------------------------------------------------------
# The two families: build both models on the same weights, and their calls
# ---------------------------------------------------------------------------------------------
@dataclass
class Subject:
    """One family's pair of models in one dtype, ready to time."""

    run_ours: Callable[[], torch.Tensor]
    run_ref: Callable[[], torch.Tensor]
    ref_output: Callable[[torch.Tensor], torch.Tensor]  # diffusers' raw output -> our output's layout
    ours: torch.nn.Module
    tokens: int
    flops: float
    gemms: list[Gemm]


def cast_like_from_pretrained(ref: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast as diffusers' `from_pretrained(torch_dtype=...)` would: all but `_keep_in_fp32_modules`."""
    keep = ref._keep_in_fp32_modules or []
    with torch.no_grad():
        for name, t in [*ref.named_parameters(), *ref.named_buffers()]:
            if t.is_floating_point() and not any(k in name.split(".") for k in keep):
                t.data = t.data.to(dtype)
    return ref.eval().requires_grad_(False)


def wan_subject(args: argparse.Namespace, dtype: torch.dtype) -> Subject:
    from diffusers import WanTransformer3DModel

    from models.wan.transformer import WanTransformer
    from models.wan.transformer_keys import original_to_diffusers

    cfg = wan_config(args)
    ours = randomize_parameters(WanTransformer(cfg), seed=0)
    ref = WanTransformer3DModel.from_config(cfg.to_diffusers_json())
    ref.load_state_dict(original_to_diffusers(ours.state_dict()), strict=True)
    ref = cast_like_from_pretrained(ref, dtype)
    ours.cast_weights(dtype).eval().requires_grad_(False)

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, cfg.in_dim, args.frames, args.height, args.width, generator=gen).to(dtype)
    context = torch.randn(args.batch, cfg.text_len, cfg.text_dim, generator=gen).to(dtype)
    t = torch.full((args.batch,), 700.0)
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    return Subject(run_ours=lambda: ours(x, t, context), run_ref=lambda: ref(x, t, context, return_dict=False)[0],
                   ref_output=lambda out: out, ours=ours, tokens=tokens,
                   flops=forward_flops(cfg, args.batch, tokens), gemms=wan_gemms(cfg, args.batch, tokens))


def flux_subject(args: argparse.Namespace, dtype: torch.dtype) -> Subject:
    from diffusers import FluxTransformer2DModel
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    from models.flux.transformer import FluxTransformer, pack_latents, unpack_latents
    from models.flux.transformer_keys import original_to_diffusers

    cfg = flux_config(args)
    ours = randomize_parameters(FluxTransformer(cfg), seed=0)
    ref = FluxTransformer2DModel.from_config(cfg.to_diffusers_json())
    ref.load_state_dict(original_to_diffusers(ours.state_dict()), strict=True)
    ref = cast_like_from_pretrained(ref, dtype)
    ours.cast_weights(dtype).eval().requires_grad_(False)

    gen = torch.Generator().manual_seed(1)
    b, h, w = args.batch, args.height, args.width
    latents = torch.randn(b, cfg.latent_channels, h, w, generator=gen).to(dtype)
    context = torch.randn(b, args.text_len, cfg.context_dim, generator=gen).to(dtype)
    pooled = torch.randn(b, cfg.pooled_dim, generator=gen).to(dtype)
    t = torch.full((b,), 750.0)  # 1000 * sigma; exact in bf16 too, so both models see the same t
    guidance = torch.full((b,), 3.5) if cfg.guidance_embed else None
    # what FluxPipeline hands its transformer each step (packed latents, ids made once per generation)
    packed = pack_latents(latents)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, dtype)
    txt_ids = torch.zeros(args.text_len, 3, dtype=dtype)

    def run_ref() -> torch.Tensor:
        return ref(hidden_states=packed, encoder_hidden_states=context, pooled_projections=pooled,
                   timestep=(t / 1000).to(dtype), img_ids=img_ids, txt_ids=txt_ids,
                   guidance=None if guidance is None else guidance.to(dtype), return_dict=False)[0]

    tokens = (h // 2) * (w // 2)
    return Subject(run_ours=lambda: ours(latents, t, context, pooled, guidance), run_ref=run_ref,
                   ref_output=lambda out: unpack_latents(out, (h // 2, w // 2)), ours=ours, tokens=tokens,
                   flops=flux_forward_flops(cfg, b, tokens, args.text_len),
                   gemms=flux_gemms(cfg, b, tokens, args.text_len))


def qwen_image_subject(args: argparse.Namespace, dtype: torch.dtype) -> Subject:
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    from models.qwen_image.transformer import QwenImageTransformer

    cfg = qwen_image_config(args)
    ours = randomize_parameters(QwenImageTransformer(cfg), seed=0)
    ref = QwenImageTransformer2DModel.from_config(cfg.to_diffusers_json())
    ref.load_state_dict(ours.state_dict(), strict=True)  # the release's key names are diffusers'
    ref = cast_like_from_pretrained(ref, dtype)
    ours.cast_weights(dtype).eval().requires_grad_(False)

    gen = torch.Generator().manual_seed(1)
    b, h, w = args.batch, args.height, args.width
    latents = torch.randn(b, cfg.out_channels, h, w, generator=gen).to(dtype)
    context = torch.randn(b, args.text_len, cfg.joint_attention_dim, generator=gen).to(dtype)
    sigma = torch.full((b,), 0.75)  # exact in bf16 too
    packed = QwenImagePipeline._pack_latents(latents, b, cfg.out_channels, h, w)  # as the pipeline hands it over
    img_shapes = [[(1, h // 2, w // 2)]] * b

    def run_ref() -> torch.Tensor:
        return ref(hidden_states=packed, encoder_hidden_states=context, encoder_hidden_states_mask=None,
                   timestep=sigma.to(dtype), img_shapes=img_shapes, return_dict=False)[0]

    def ref_output(out: torch.Tensor) -> torch.Tensor:
        return QwenImagePipeline._unpack_latents(out, h * 8, w * 8, 8).squeeze(2)

    tokens = (h // 2) * (w // 2)
    return Subject(run_ours=lambda: ours(latents, sigma, context), run_ref=run_ref, ref_output=ref_output, ours=ours,
                   tokens=tokens, flops=qwen_image_forward_flops(cfg, b, tokens, args.text_len),
                   gemms=qwen_image_gemms(cfg, b, tokens, args.text_len))


def z_image_subject(args: argparse.Namespace, dtype: torch.dtype) -> Subject:
    from diffusers import ZImageTransformer2DModel

    from models.z_image.transformer import ZImageTransformer

    cfg = z_image_config(args)
    ours = randomize_parameters(ZImageTransformer(cfg), seed=0)
    ref = ZImageTransformer2DModel.from_config(cfg.to_diffusers_json())
    ref.load_state_dict(ours.state_dict(), strict=True)  # the release's key names are diffusers'
    ref = cast_like_from_pretrained(ref, dtype)
    ours.cast_weights(dtype).eval().requires_grad_(False)

    gen = torch.Generator().manual_seed(1)
    b, h, w = args.batch, args.height, args.width
    latents = torch.randn(b, cfg.in_channels, h, w, generator=gen).to(dtype)
    captions = torch.randn(b, args.text_len, cfg.cap_feat_dim, generator=gen).to(dtype)
    t_model = torch.full((b,), 0.25)  # 1 - sigma, exact in bf16 too

    def run_ref() -> torch.Tensor:
        return torch.stack(ref([x[:, None] for x in latents], t_model.to(dtype), list(captions),
                               return_dict=False)[0])

    tokens = (h // cfg.patch_size) * (w // cfg.patch_size)
    return Subject(run_ours=lambda: ours(latents, t_model, captions), run_ref=run_ref,
                   ref_output=lambda out: out.squeeze(2), ours=ours, tokens=tokens,
                   flops=z_image_forward_flops(cfg, b, tokens, args.text_len),
                   gemms=z_image_gemms(cfg, b, tokens, args.text_len))


def flux2_subject(args: argparse.Namespace, dtype: torch.dtype) -> Subject:
    from diffusers import Flux2Transformer2DModel
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

    from models.flux2.transformer import Flux2Transformer

    cfg = flux2_config(args)
    ours = randomize_parameters(Flux2Transformer(cfg), seed=0)
    ref = Flux2Transformer2DModel.from_config(cfg.to_diffusers_json())
    ref.load_state_dict(ours.state_dict(), strict=True)  # our parameter names are diffusers'
    ref = cast_like_from_pretrained(ref, dtype)
    ours.cast_weights(dtype).eval().requires_grad_(False)

    gen = torch.Generator().manual_seed(1)
    b, h, w = args.batch, args.height // 2, args.width // 2  # the 128-channel latent is at H/16: one token each
    latents = torch.randn(b, cfg.in_channels, h, w, generator=gen).to(dtype)
    context = torch.randn(b, args.text_len, cfg.context_dim, generator=gen).to(dtype)
    t = torch.full((b,), 750.0)
    img_ids = Flux2KleinPipeline._prepare_latent_ids(latents)  # made once per generation by the pipeline
    txt_ids = Flux2KleinPipeline._prepare_text_ids(context)
    packed = Flux2KleinPipeline._pack_latents(latents)

    def run_ref() -> torch.Tensor:
        return ref(hidden_states=packed, encoder_hidden_states=context, timestep=(t / 1000).to(dtype),
                   img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False)[0]

    tokens = h * w
    return Subject(run_ours=lambda: ours(latents, t, context), run_ref=run_ref,
                   ref_output=lambda out: Flux2KleinPipeline._unpack_latents_with_ids(out, img_ids), ours=ours,
                   tokens=tokens, flops=flux2_forward_flops(cfg, b, tokens, args.text_len),
                   gemms=flux2_gemms(cfg, b, tokens, args.text_len))


def flux2_config(args: argparse.Namespace) -> Flux2DiTConfig:
    heads = args.heads or 24
    head_dim = (args.dim or 3072) // heads
    if head_dim % 8:
        raise SystemExit(f"flux2: head_dim {head_dim} must split into 4 even RoPE axes")
    return Flux2DiTConfig(hidden_size=heads * head_dim, num_heads=heads, num_double_blocks=args.double,
                          num_single_blocks=args.single, mlp_ratio=(args.ffn_dim or 3 * heads * head_dim) /
                          (heads * head_dim), context_dim=args.context_dim or 7680,
                          axes_dims_rope=(head_dim // 4,) * 4)


def qwen_image_config(args: argparse.Namespace) -> QwenImageDiTConfig:
    heads = args.heads or 24
    head_dim = (args.dim or 3072) // heads
    side = head_dim // 6 * 2
    rope = (16, 56, 56) if head_dim == 128 else (head_dim - 2 * side, side, side)
    return QwenImageDiTConfig(num_layers=args.layers, num_attention_heads=heads, attention_head_dim=head_dim,
                              joint_attention_dim=args.context_dim or 3584, axes_dims_rope=rope)


def z_image_config(args: argparse.Namespace) -> ZImageDiTConfig:
    heads = args.heads or 30
    head_dim = (args.dim or 3840) // heads
    side = head_dim // 8 * 3
    axes = (32, 48, 48) if head_dim == 128 else (head_dim - 2 * side, side, side)
    return ZImageDiTConfig(dim=heads * head_dim, n_heads=heads, n_kv_heads=heads, n_layers=args.layers,
                           cap_feat_dim=args.context_dim or 2560, axes_dims=axes)


SUBJECTS: dict[str, Callable[[argparse.Namespace, torch.dtype], Subject]] = {
    "wan": wan_subject, "flux": flux_subject, "flux2": flux2_subject, "qwen-image": qwen_image_subject,
    "z-image": z_image_subject}


def wan_config(args: argparse.Namespace) -> WanDiTConfig:
    return WanDiTConfig(dim=args.dim or 1536, ffn_dim=args.ffn_dim or 8960, num_heads=args.heads or 12,
                        num_layers=args.layers)


def flux_config(args: argparse.Namespace) -> FluxDiTConfig:
    heads = args.heads or 24
    dim = args.dim or 3072
    head_dim = dim // heads
    side = head_dim // 6 * 2  # narrower test widths: even RoPE channels per axis, summing to head_dim
    rope = (16, 56, 56) if head_dim == 128 else (head_dim - 2 * side, side, side)
    return FluxDiTConfig(hidden_size=dim, num_heads=heads, num_double_blocks=args.double,
                         num_single_blocks=args.single, mlp_ratio=(args.ffn_dim or 4 * dim) / dim,
                         context_dim=args.context_dim or 4096, pooled_dim=args.pooled_dim or 768,
                         axes_dims_rope=rope, guidance_embed=True)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def matmul_units() -> list[str]:
    """The CPU's bf16 matrix/vector extensions (AMX, AVX-512 BF16, ...): they set the GEMM peak, and with it
    how much of a forward is GEMM and how much elementwise work (so results differ between machine kinds)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].splitlines()[0].split()
    except (OSError, IndexError):
        return []
    return [f for f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2") if f in flags]


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_dtype(args: argparse.Namespace, dtype: torch.dtype,
              fp32_reference: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """Time both models in `dtype`; `fp32_reference` (our fp32 output, same weights) measures low-precision error."""
    subject = SUBJECTS[args.family](args, dtype)
    peak = GemmPeak(dtype, subject.gemms)
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    peaks: list[float] = []  # sampled between repeats: the machine's speed drifts when it is shared
    first: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for name, fn in (("ours", subject.run_ours), ("diffusers", subject.run_ref)):
                elapsed, outputs[name] = timed(fn)
                first.setdefault(name, elapsed)
        for i in range(args.repeats):
            order = [("ours", subject.run_ours), ("diffusers", subject.run_ref)]
            for name, fn in order if i % 2 == 0 else order[::-1]:
                elapsed, outputs[name] = timed(fn)
                times[name].append(elapsed)
            peaks.append(peak.sample())
    out_ours, out_ref = outputs["ours"].float(), subject.ref_output(outputs["diffusers"]).float()
    err = (out_ours - out_ref).abs().max().item()
    scale = out_ref.abs().max().item()
    flops = subject.flops
    best = max(peaks)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "dtype": str(dtype).replace("torch.", ""),
        "tokens": subject.tokens,
        "gflop_per_forward": flops / 1e9,
        "median_s": med,
        "all_s": times,
        "speedup_vs_diffusers": med["diffusers"] / med["ours"],
        # each repeat runs the two models back to back, so the per-repeat ratio cancels slow drifts
        "paired_speedup_median": statistics.median(d / o for d, o in zip(times["diffusers"], times["ours"])),
        "gflops": {k: flops / v / 1e9 for k, v in med.items()},
        "matmul_peak_gflops": best,
        "matmul_gflops_samples": peaks,  # the best GEMM of each sample
        "peak_by_gemm_gflops": peak.best_by_gemm,
        "fraction_of_peak": {k: flops / v / 1e9 / best for k, v in med.items()},
        "max_abs_err": err,
        "out_absmax": scale,
        "first_forward_s": first,  # warm-up: includes our one-off weight packing
        "ours_param_bytes": sum(p.numel() * p.element_size() for p in subject.ours.parameters()),
        "ours_packed_weight_bytes": subject.ours.packed_weight_bytes(),
    }
    if fp32_reference is not None and dtype != torch.float32:
        result["max_abs_err_vs_fp32"] = {name: (out - fp32_reference).abs().max().item()
                                         for name, out in (("ours", out_ours), ("diffusers", out_ref))}
    return result, out_ours


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def plot(report: dict, path: Path) -> None:
    """Per dtype: the forward times of both models (median bar, every repeat as a dot), and GFLOP/s vs the peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    for j, (name, colour) in enumerate((("ours", "tab:blue"), ("diffusers", "tab:orange"))):
        xs = [i + (j - 0.5) * width for i in range(len(results))]
        left.bar(xs, [r["median_s"][name] for r in results], width, color=colour, label=name)
        for x, r in zip(xs, results):
            left.scatter([x] * len(r["all_s"][name]), r["all_s"][name], color="black", s=8, zorder=3)
        right.bar(xs, [r["gflops"][name] for r in results], width, color=colour, label=name)
    for i, r in enumerate(results):
        right.hlines(r["matmul_peak_gflops"], i - width, i + width, color="black", linestyle="--",
                     label="GEMM peak (same run)" if i == 0 else None)
        left.annotate(f"{r['paired_speedup_median']:.2f}x", (i, max(r["median_s"].values())), ha="center",
                      va="bottom")
    for ax, label in ((left, "forward (s), median and repeats"), (right, "GFLOP/s")):
        ax.set_xticks(range(len(results)), [r["dtype"] for r in results])
        ax.set_ylabel(label)
        ax.legend(loc="upper right", fontsize=8)
    cfg = report["config"]
    fig.suptitle(f"{report['family']} DiT forward, {results[0]['tokens']} image tokens, {cfg['blocks']}, "
                 f"{report['machine']['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def config_record(args: argparse.Namespace) -> dict:
    batch = args.batch
    if args.family == "wan":
        cfg = wan_config(args)
        return {"dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "num_heads": cfg.num_heads, "layers": cfg.num_layers,
                "text_len": cfg.text_len, "text_dim": cfg.text_dim, "batch": batch,
                "latent": [cfg.in_dim, args.frames, args.height, args.width], "blocks": f"{cfg.num_layers} blocks"}
    if args.family == "qwen-image":
        cfg = qwen_image_config(args)
        return {"dim": cfg.dim, "num_heads": cfg.num_attention_heads, "layers": cfg.num_layers,
                "text_len": args.text_len, "context_dim": cfg.joint_attention_dim, "batch": batch,
                "latent": [cfg.out_channels, args.height, args.width], "pixels": [8 * args.height, 8 * args.width],
                "blocks": f"{cfg.num_layers} dual-stream blocks"}
    if args.family == "flux2":
        cfg = flux2_config(args)
        return {"hidden_size": cfg.hidden_size, "num_heads": cfg.num_heads, "mlp_hidden": cfg.mlp_hidden,
                "double_blocks": cfg.num_double_blocks, "single_blocks": cfg.num_single_blocks,
                "text_len": args.text_len, "context_dim": cfg.context_dim, "batch": batch,
                "latent": [cfg.in_channels, args.height // 2, args.width // 2],
                "pixels": [8 * args.height, 8 * args.width],
                "blocks": f"{cfg.num_double_blocks} double + {cfg.num_single_blocks} single blocks"}
    if args.family == "z-image":
        cfg = z_image_config(args)
        return {"dim": cfg.dim, "num_heads": cfg.n_heads, "ffn_hidden": cfg.ffn_hidden, "layers": cfg.n_layers,
                "refiner_layers": cfg.n_refiner_layers, "text_len": args.text_len, "context_dim": cfg.cap_feat_dim,
                "batch": batch, "latent": [cfg.in_channels, args.height, args.width],
                "pixels": [8 * args.height, 8 * args.width],
                "blocks": f"{cfg.n_refiner_layers}+{cfg.n_refiner_layers} refiner + {cfg.n_layers} main blocks"}
    cfg = flux_config(args)
    return {"hidden_size": cfg.hidden_size, "num_heads": cfg.num_heads, "head_dim": cfg.head_dim,
            "mlp_hidden": cfg.mlp_hidden, "double_blocks": cfg.num_double_blocks,
            "single_blocks": cfg.num_single_blocks, "text_len": args.text_len, "context_dim": cfg.context_dim,
            "pooled_dim": cfg.pooled_dim, "guidance_embed": cfg.guidance_embed, "batch": batch,
            "latent": [cfg.latent_channels, args.height, args.width], "pixels": [8 * args.height, 8 * args.width],
            "blocks": f"{cfg.num_double_blocks} double + {cfg.num_single_blocks} single blocks"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=tuple(SUBJECTS), default="wan")
    parser.add_argument("--layers", type=int, default=2, help="wan, qwen-image, z-image: (main) blocks")
    parser.add_argument("--double", type=int, default=2, help="flux, flux2: double-stream blocks")
    parser.add_argument("--single", type=int, default=2, help="flux, flux2: single-stream blocks")
    parser.add_argument("--frames", type=int, default=5, help="wan: latent frames F")
    parser.add_argument("--height", type=int, default=None,
                        help="latent height (tokens: height/2 rows); default wan 24, the image families 64 "
                             "(512 px)")
    parser.add_argument("--width", type=int, default=None,
                        help="latent width (tokens: width/2 columns); default wan 52, the image families 64 "
                             "(512 px)")
    parser.add_argument("--text-len", type=int, default=512,
                        help="image families: text tokens (FLUX.1's T5 512; wan always uses 512)")
    parser.add_argument("--dim", type=int, default=None, help="model width; default the release's")
    parser.add_argument("--heads", type=int, default=None, help="attention heads; default the release's")
    parser.add_argument("--ffn-dim", type=int, default=None, help="FFN / MLP width; default the release's")
    parser.add_argument("--context-dim", type=int, default=None,
                        help="image families: text width; default the release's (4096 / 3584 / 2560)")
    parser.add_argument("--pooled-dim", type=int, default=None, help="flux: CLIP pooled width; default 768")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path; default results/dit_forward.json (wan), results/dit_forward_<family>.json")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG next to the JSON")
    args = parser.parse_args(argv)
    defaults = (24, 52, "dit_forward.json") if args.family == "wan" else (
        64, 64, f"dit_forward_{args.family.replace('-', '_')}.json")
    args.height = args.height if args.height is not None else defaults[0]
    args.width = args.width if args.width is not None else defaults[1]
    args.out = args.out if args.out is not None else RESULTS / defaults[2]
    if args.repeats < 1 or args.warmup < 1:
        parser.error("--repeats and --warmup must be >= 1")
    if args.height % 2 or args.width % 2 or args.height < 2 or args.width < 2:
        parser.error(f"--height/--width must be even and >= 2 (2x2 patches), got {args.height}x{args.width}")
    if args.family != "wan" and (args.text_len < 1 or args.double < 0 or args.single < 0):
        parser.error("--text-len must be >= 1 and --double/--single >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = []
    fp32_reference = None
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        logger.info("running %s %s ...", args.family, name)
        r, out = run_dtype(args, dtype, fp32_reference)
        results.append(r)
        if dtype == torch.float32:
            fp32_reference = out
        # fp32 must agree to the parity tolerance (relative to the output scale); bf16 policies differ.
        if dtype == torch.float32 and r["max_abs_err"] > 1e-4 * max(1.0, r["out_absmax"]):
            raise SystemExit(f"fp32 outputs disagree: max abs err {r['max_abs_err']:.3g} (|out| {r['out_absmax']:.3g})")

    report = {
        "family": args.family,
        "config": config_record(args),
        "machine": {"threads": args.threads, "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine(), "matmul_units": matmul_units(),
                    "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                    "note": "shared machine; other jobs may have been running"},
        "command": "benchmarks/dit_forward.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    if not args.no_plot:
        plot(report, args.out.with_suffix(".png"))

    lines = ["| dtype | tokens | ours (s) | diffusers (s) | speedup (paired) | ours GFLOP/s | diffusers GFLOP/s | "
             "GEMM peak | ours / peak | diffusers / peak | max abs err (|out|) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['dtype']} | {r['tokens']} | {r['median_s']['ours']:.3f} | {r['median_s']['diffusers']:.3f} | "
            f"{r['speedup_vs_diffusers']:.2f}x ({r['paired_speedup_median']:.2f}x) | "
            f"{r['gflops']['ours']:.0f} | {r['gflops']['diffusers']:.0f} | "
            f"{r['matmul_peak_gflops']:.0f} | {r['fraction_of_peak']['ours']:.0%} | "
            f"{r['fraction_of_peak']['diffusers']:.0%} | {r['max_abs_err']:.2e} ({r['out_absmax']:.2f}) |")
    for r in results:
        first = r["first_forward_s"]
        best_gemm = max(r["peak_by_gemm_gflops"], key=r["peak_by_gemm_gflops"].get)
        lines.append(f"\n{r['dtype']}: peak from `{best_gemm}`; our packed weight copies "
                     f"{r['ours_packed_weight_bytes'] / 2**20:.0f} MiB on top of {r['ours_param_bytes'] / 2**20:.0f} "
                     f"MiB of parameters; first forward (ours includes packing) ours "
                     f"{first.get('ours', float('nan')):.3f} s, diffusers {first.get('diffusers', float('nan')):.3f} s")
    for r in results:
        if "max_abs_err_vs_fp32" in r:
            e = r["max_abs_err_vs_fp32"]
            lines.append(f"\n{r['dtype']} max abs err vs our fp32 output: ours {e['ours']:.2e}, "
                         f"diffusers {e['diffusers']:.2e}")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
