"""One DiT forward: native `WanTransformer` vs diffusers `WanTransformer3DModel`, same weights and inputs.

Runs a few layers at the real Wan2.1-1.3B width (dim 1536, 12 heads, ffn 8960, text 512 x 4096) on
>= 1,500 video tokens, in fp32 and in bf16, in one process. The two models' runs are interleaved
(alternating which goes first) and the medians are reported, because the machine may be shared;
"paired" is the median of the per-repeat ratios, which cancels slow drifts in machine speed.
Achieved GFLOP/s counts the matmul and attention FLOPs analytically; "peak" is a large matmul in
the same dtype, sampled between the repeats of the same run (the best sample is the peak).

bf16 follows each implementation's own precision policy: ours keeps `WanTransformer.keep_fp32`
parameters and the residual stream in fp32; diffusers keeps its `_keep_in_fp32_modules` in fp32 (as
its `from_pretrained(torch_dtype=bf16)` does) and carries the residual stream in bf16.

Ours prepacks its CPU GEMM weights on the first (warm-up) forward (`PackedLinear`); the timed repeats
exclude that, as they exclude diffusers' first-call costs. The JSON records both first forwards
(`first_forward_s`) and the memory the packed copies take (`ours_packed_weight_bytes`, next to
`ours_param_bytes`).

    .venv/bin/python benchmarks/dit_forward.py --layers 2 --frames 5 --height 24 --width 52 --repeats 7
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
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.wan.config import WanDiTConfig  # noqa: E402
from models.random_init import randomize_parameters  # noqa: E402
from models.wan.transformer import WanTransformer  # noqa: E402
from models.wan.transformer_keys import original_to_diffusers  # noqa: E402

logger = logging.getLogger("dit_forward")


def forward_flops(cfg: WanDiTConfig, batch: int, tokens: int) -> float:
    """Matmul + attention FLOPs of one forward (2 per multiply-add); elementwise work is not counted."""
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


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 3) -> float:
    """GFLOP/s of a (size x size) @ (size x 2*size) matmul, the best of `repeats` (a peak, not a median)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, 2 * size).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size * size * 2 * size / best / 1e9


def diffusers_model(ours: WanTransformer, dtype: torch.dtype) -> torch.nn.Module:
    """diffusers `WanTransformer3DModel` with our weights, cast as its `from_pretrained(torch_dtype=...)` would."""
    from diffusers import WanTransformer3DModel

    ref = WanTransformer3DModel.from_config(ours.config.to_diffusers_json()).eval()
    ref.load_state_dict(original_to_diffusers(ours.state_dict()), strict=True)
    keep = ref._keep_in_fp32_modules or []
    with torch.no_grad():
        for name, t in [*ref.named_parameters(), *ref.named_buffers()]:
            if t.is_floating_point() and not any(k in name.split(".") for k in keep):
                t.data = t.data.to(dtype)
    return ref.requires_grad_(False)


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_dtype(cfg: WanDiTConfig, dtype: torch.dtype, args: argparse.Namespace,
              fp32_reference: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """Time both models in `dtype`; `fp32_reference` (our fp32 output, same weights) measures low-precision error."""
    ours = WanTransformer(cfg)
    randomize_parameters(ours, seed=0)
    ref = diffusers_model(ours, dtype)
    ours.cast_weights(dtype)
    ours.eval()

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, cfg.in_dim, args.frames, args.height, args.width, generator=gen).to(dtype)
    context = torch.randn(args.batch, cfg.text_len, cfg.text_dim, generator=gen).to(dtype)
    t = torch.full((args.batch,), 700.0)
    tokens = args.frames * (args.height // 2) * (args.width // 2)

    run_ours = lambda: ours(x, t, context)  # noqa: E731
    run_ref = lambda: ref(x, t, context, return_dict=False)[0]  # noqa: E731
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    peaks: list[float] = []  # sampled between repeats: the machine's speed drifts when it is shared
    first: dict[str, float] = {}
    with torch.inference_mode():
        for _ in range(args.warmup):
            (t_ours, out_ours), (t_ref, out_ref) = timed(run_ours), timed(run_ref)
            first.setdefault("ours", t_ours)
            first.setdefault("diffusers", t_ref)
        for i in range(args.repeats):
            order = [("ours", run_ours), ("diffusers", run_ref)]
            for name, fn in order if i % 2 == 0 else order[::-1]:
                elapsed, out = timed(fn)
                times[name].append(elapsed)
                if name == "ours":
                    out_ours = out
                else:
                    out_ref = out
            peaks.append(matmul_peak(dtype))
    err = (out_ours.float() - out_ref.float()).abs().max().item()
    scale = out_ref.float().abs().max().item()
    flops = forward_flops(cfg, args.batch, tokens)
    peak = max(peaks)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "dtype": str(dtype).replace("torch.", ""),
        "tokens": tokens,
        "gflop_per_forward": flops / 1e9,
        "median_s": med,
        "all_s": times,
        "speedup_vs_diffusers": med["diffusers"] / med["ours"],
        # each repeat runs the two models back to back, so the per-repeat ratio cancels slow drifts
        "paired_speedup_median": statistics.median(d / o for d, o in zip(times["diffusers"], times["ours"])),
        "gflops": {k: flops / v / 1e9 for k, v in med.items()},
        "matmul_peak_gflops": peak,
        "matmul_gflops_samples": peaks,
        "fraction_of_peak": {k: flops / v / 1e9 / peak for k, v in med.items()},
        "max_abs_err": err,
        "out_absmax": scale,
        "first_forward_s": first,  # warm-up: includes our one-off weight packing
        "ours_param_bytes": sum(p.numel() * p.element_size() for p in ours.parameters()),
        "ours_packed_weight_bytes": ours.packed_weight_bytes(),
    }
    if fp32_reference is not None and dtype != torch.float32:
        result["max_abs_err_vs_fp32"] = {name: (out.float() - fp32_reference).abs().max().item()
                                         for name, out in (("ours", out_ours), ("diffusers", out_ref))}
    del ours, ref
    return result, out_ours.float()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--frames", type=int, default=5, help="latent frames F")
    parser.add_argument("--height", type=int, default=24, help="latent height H (tokens: H/2 rows)")
    parser.add_argument("--width", type=int, default=52, help="latent width W (tokens: W/2 columns)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dit_forward.json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.height % 2 or args.width % 2:
        parser.error("--repeats must be >= 1 and --height/--width even (patch 1x2x2)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    cfg = WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=args.layers)
    results = []
    fp32_reference = None
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        logger.info("running %s ...", name)
        r, out = run_dtype(cfg, dtype, args, fp32_reference)
        results.append(r)
        if dtype == torch.float32:
            fp32_reference = out
        # fp32 must agree to the parity tolerance (relative to the output scale); bf16 policies differ.
        if dtype == torch.float32 and r["max_abs_err"] > 1e-4 * max(1.0, r["out_absmax"]):
            raise SystemExit(f"fp32 outputs disagree: max abs err {r['max_abs_err']:.3g} (|out| {r['out_absmax']:.3g})")

    report = {
        "config": {"dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "num_heads": cfg.num_heads, "layers": cfg.num_layers,
                   "text_len": cfg.text_len, "text_dim": cfg.text_dim, "batch": args.batch,
                   "latent": [cfg.in_dim, args.frames, args.height, args.width]},
        "machine": {"threads": args.threads, "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine(),
                    "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                    "note": "shared machine; other jobs may have been running"},
        "command": "benchmarks/dit_forward.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))

    lines = ["| dtype | tokens | ours (s) | diffusers (s) | speedup (paired) | ours GFLOP/s | diffusers GFLOP/s | "
             "matmul peak | ours / peak | max abs err (|out|) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['dtype']} | {r['tokens']} | {r['median_s']['ours']:.3f} | {r['median_s']['diffusers']:.3f} | "
            f"{r['speedup_vs_diffusers']:.2f}x ({r['paired_speedup_median']:.2f}x) | "
            f"{r['gflops']['ours']:.0f} | {r['gflops']['diffusers']:.0f} | "
            f"{r['matmul_peak_gflops']:.0f} | {r['fraction_of_peak']['ours']:.0%} | "
            f"{r['max_abs_err']:.2e} ({r['out_absmax']:.2f}) |")
    for r in results:
        first = r["first_forward_s"]
        lines.append(f"\n{r['dtype']}: our packed weight copies {r['ours_packed_weight_bytes'] / 2**20:.0f} MiB on top "
                     f"of {r['ours_param_bytes'] / 2**20:.0f} MiB of parameters; first forward (ours includes "
                     f"packing) ours {first.get('ours', float('nan')):.3f} s, "
                     f"diffusers {first.get('diffusers', float('nan')):.3f} s")
    for r in results:
        if "max_abs_err_vs_fp32" in r:
            e = r["max_abs_err_vs_fp32"]
            lines.append(f"\n{r['dtype']} max abs err vs our fp32 output: ours {e['ours']:.2e}, "
                         f"diffusers {e['diffusers']:.2e}")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
