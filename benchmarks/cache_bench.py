"""Feature caches on the embedded default model: DiT-time speed-up against quality, in one run.

For a fixed prompt subset of `tiny_accuracy.py`'s set (seed 1000 + prompt index) every request runs once
with full compute and once per cache setting of the grid, at 50 steps with the model's guidance (two CFG
branches), the settings between two full runs of the same prompt whose mean is that prompt's baseline (so
machine drift hits both alike), after one untimed warm-up generation.
Reported per setting:
- DiT-time speed-up: the sum of the prompts' baseline denoising time over the setting's
  (`timings["denoise"]`), with the median of the per-prompt ratios (paired), and the end-to-end speed-up (`timings["total"]`: text encode + denoise + decode; model loading excluded);
- PSNR and SSIM per frame of the decoded uint8 video against the full-compute video of the same seed
  (`stages/quality.py` says how), averaged over frames and prompts;
- the prompt-following accuracy of the shapes detector (colour, shape and direction all right), with
  full compute's in the same run;
- the forwards / attention calls reused and the peak extra memory the cache held.
LPIPS is not reported: it needs pretrained network weights that these machines cannot download.

TeaCache and MagCache run twice: with the model's shipped calibration (made by `smartdiff calibrate` on other
prompts of the same set) and with the coefficients / ratio curves published for Wan2.1-T2V-1.3B, at the same
thresholds; `calibrated_vs_wan13b` in the JSON compares their PSNR at equal work (forwards reused). The
"target 30 dB" settings ask for a quality target instead of a threshold (resolved from the calibration).
Writes JSON, a speed-quality plot with the Pareto front and a contact sheet (frames of full compute next to
each setting's) to benchmarks/results/.

    .venv/bin/python benchmarks/cache_bench.py
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_accuracy import detector_row, prompt_set, score  # noqa: E402

from models.wan.family import WAN_MAGCACHE_RATIOS, WAN_TEACACHE_COEFFICIENTS  # noqa: E402
from stages.quality import video_quality  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WAN13B_TEACACHE = list(WAN_TEACACHE_COEFFICIENTS["wan2.1-t2v-1.3b"]["default"])
WAN13B_MAGCACHE = [list(curve) for curve in WAN_MAGCACHE_RATIOS["wan2.1-t2v-1.3b"]]
GRID: dict[str, dict[str, Any]] = {
    "fbcache 0.05": {"kind": "fbcache", "threshold": 0.05},
    "fbcache 0.1": {"kind": "fbcache", "threshold": 0.1},
    "fbcache 0.2": {"kind": "fbcache", "threshold": 0.2},
    "dbcache F1B1 W4 0.12": {"kind": "dbcache", "threshold": 0.12, "first_blocks": 1, "last_blocks": 1,
                             "warmup_steps": 4},
    "dbcache F1B1 W4 0.12 TS": {"kind": "dbcache", "threshold": 0.12, "first_blocks": 1, "last_blocks": 1,
                                "warmup_steps": 4, "taylorseer": True},
    "dbcache F1B0 W4 MC6 0.24": {"kind": "dbcache", "threshold": 0.24, "first_blocks": 1, "last_blocks": 0,
                                 "warmup_steps": 4, "max_continuous_cached_steps": 6},
    "teacache 0.05": {"kind": "teacache", "threshold": 0.05},
    "teacache 0.1": {"kind": "teacache", "threshold": 0.1},
    "teacache 0.2": {"kind": "teacache", "threshold": 0.2},
    "teacache wan1.3b 0.05": {"kind": "teacache", "threshold": 0.05, "coefficients": WAN13B_TEACACHE},
    "teacache wan1.3b 0.1": {"kind": "teacache", "threshold": 0.1, "coefficients": WAN13B_TEACACHE},
    "teacache wan1.3b 0.2": {"kind": "teacache", "threshold": 0.2, "coefficients": WAN13B_TEACACHE},
    "magcache 0.06": {"kind": "magcache", "threshold": 0.06},
    "magcache 0.12": {"kind": "magcache", "threshold": 0.12},
    "magcache 0.24": {"kind": "magcache", "threshold": 0.24},
    "magcache K4 0.24": {"kind": "magcache", "threshold": 0.24, "max_skip_steps": 4},
    "magcache wan1.3b 0.06": {"kind": "magcache", "threshold": 0.06, "ratios": WAN13B_MAGCACHE},
    "magcache wan1.3b 0.12": {"kind": "magcache", "threshold": 0.12, "ratios": WAN13B_MAGCACHE},
    "magcache wan1.3b 0.24": {"kind": "magcache", "threshold": 0.24, "ratios": WAN13B_MAGCACHE},
    "magcache K4 0.12": {"kind": "magcache", "threshold": 0.12, "max_skip_steps": 4},
    "magcache K4 0.5": {"kind": "magcache", "threshold": 0.5, "max_skip_steps": 4},
    "magcache K4 wan1.3b 0.24": {"kind": "magcache", "threshold": 0.24, "max_skip_steps": 4, "ratios": WAN13B_MAGCACHE},
    "easycache 0.05": {"kind": "easycache", "threshold": 0.05},
    "easycache 0.1": {"kind": "easycache", "threshold": 0.1},
    "easycache 0.2": {"kind": "easycache", "threshold": 0.2},
    "easycache target 30 dB": {"kind": "easycache", "target_psnr": 30},
    "magcache target 30 dB": {"kind": "magcache", "target_psnr": 30},
    "meancache B25": {"kind": "meancache", "fresh_steps": 25},
    "meancache B17": {"kind": "meancache", "fresh_steps": 17},
    "meancache B10": {"kind": "meancache", "fresh_steps": 10},
    "blockdance b1g2": {"kind": "blockdance", "boundary_block": 1, "group_size": 2},
    "blockdance b2g3": {"kind": "blockdance", "boundary_block": 2, "group_size": 3},
    "pab s2c3": {"kind": "pab", "self_range": 2, "cross_range": 3},
    "pab s3c5": {"kind": "pab", "self_range": 3, "cross_range": 5},
    "taylorseer N3O1": {"kind": "taylorseer", "interval": 3, "max_order": 1},
    "taylorseer N5O1": {"kind": "taylorseer", "interval": 5, "max_order": 1},
}
KIND_COLOURS = {"fbcache": "tab:blue", "dbcache": "tab:purple", "teacache": "tab:orange", "magcache": "tab:brown",
                "easycache": "tab:green", "meancache": "tab:olive", "blockdance": "tab:cyan", "pab": "tab:red",
                "taylorseer": "tab:pink"}

logger = logging.getLogger("cache_bench")


def fitted_vs_published(results: list[dict[str, Any]]) -> dict[str, Any]:
    """TeaCache and MagCache with the model's calibration against the Wan2.1-1.3B coefficients / curves, at equal
    work: for each published-value setting, the calibrated settings' PSNR interpolated (linearly in the forwards
    reused, within the range they cover) at the forwards the published one reused. Work and PSNR are
    deterministic, so the comparison is free of the machine's timing noise. Settings compare within the same
    other knobs (e.g. MagCache's max_skip_steps)."""
    def group(r: dict[str, Any]) -> tuple:
        return tuple(sorted((k, v) for k, v in r["cache"].items() if k not in ("threshold", "coefficients", "ratios")))

    out: dict[str, Any] = {}
    for kind, published_key in (("teacache", "coefficients"), ("magcache", "ratios")):
        rows = []
        for p in (r for r in results if r["cache"]["kind"] == kind and published_key in r["cache"]):
            curve = sorted((r["forwards_reused"], r["psnr_db"]) for r in results
                           if group(r) == group(p) and set(r["cache"]) == set(p["cache"]) - {published_key})
            inside = curve and curve[0][0] <= p["forwards_reused"] <= curve[-1][0]
            calibrated = float(np.interp(p["forwards_reused"], *zip(*curve))) if inside else None
            rows.append({"setting": p["setting"], "forwards_reused": p["forwards_reused"], "published_psnr_db": p["psnr_db"],
                         "calibrated_psnr_db_at_equal_work": calibrated,
                         "delta_db": None if calibrated is None else calibrated - p["psnr_db"]})
        compared = [r["delta_db"] for r in rows if r["delta_db"] is not None]
        out[kind] = {"rows": rows, "mean_delta_db": float(np.mean(compared)) if compared else None,
                     "calibrated_better_everywhere": bool(compared) and all(d > 0 for d in compared)}
    return out


def pareto(points: list[tuple[float, float, str]]) -> list[str]:
    """Names of the (speed-up, PSNR) points no other point beats on both."""
    return [n for s, q, n in points if not any(s2 >= s and q2 >= q and (s2, q2) != (s, q) for s2, q2, _ in points)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from stages.pipeline import Pipeline

    torch.set_num_threads(args.threads)
    pipeline = Pipeline.from_pretrained(args.model)
    specs = prompt_set(args.prompts)
    grid = {name: spec for name, spec in GRID.items() if not args.only or any(k in name for k in args.only)}
    full: dict[str, list[float]] = {"denoise": [], "total": []}
    per: dict[str, dict[str, list[Any]]] = {n: {"denoise": [], "total": [], "psnr": [], "ssim": [], "rows": [],
                                                "cache": []} for n in grid}
    full_rows, sheet = [], {}
    pipeline.generate({"prompt": specs[0].prompt, "seed": 0, "num_inference_steps": 2})  # warm-up (weight packing)
    for i, spec in enumerate(specs):
        params = {"prompt": spec.prompt, "seed": 1000 + i, "num_inference_steps": args.steps}
        reference = pipeline.generate(params)
        full["denoise"].append(reference.timings["denoise"])
        full["total"].append(reference.timings["total"])
        full_rows.append(detector_row(spec, 1000 + i, reference.frames))
        if i == 0:
            sheet["full compute"] = reference.frames
        settings = []
        for name, cache in grid.items():
            result = pipeline.generate(params | {"cache": cache})
            settings.append((name, result))
        again = pipeline.generate(params)  # full compute again: the prompt's baseline is the mean of both runs
        for key in ("denoise", "total"):
            full[key][-1] = (full[key][-1] + again.timings[key]) / 2
        for name, result in settings:
            quality = video_quality(result.frames, reference.frames)
            entry = per[name]
            entry["denoise"].append(result.timings["denoise"])
            entry["total"].append(result.timings["total"])
            entry["psnr"].append(quality[0])
            entry["ssim"].append(quality[1])
            entry["rows"].append(detector_row(spec, 1000 + i, result.frames))
            entry["cache"].append(result.cache)
            if i == 0:
                sheet[name] = result.frames
        logger.info("prompt %d/%d done", i + 1, len(specs))
    full_accuracy = score(full_rows)["accuracy"]["all"]
    results = []
    for name, entry in per.items():
        counts = entry["cache"]
        results.append({
            "setting": name, "cache": grid[name],
            "dit_speedup": sum(full["denoise"]) / sum(entry["denoise"]),
            "dit_speedup_paired": float(np.median([f / c for f, c in zip(full["denoise"], entry["denoise"])])),
            "e2e_speedup": sum(full["total"]) / sum(entry["total"]),
            "psnr_db": float(np.mean(entry["psnr"])), "psnr_min_db": float(np.min(entry["psnr"])),
            "ssim": float(np.mean(entry["ssim"])),
            "accuracy_all": score(entry["rows"])["accuracy"]["all"],
            "forwards_reused": sum(c["forwards_reused"] for c in counts) / len(counts),
            "attention_reused_fraction": (sum(c["attention_reused"] for c in counts)
                                          / max(1, sum(c["attention_reused"] + c["attention_computed"]
                                                       for c in counts))),
            "peak_extra_bytes": max(c["peak_extra_bytes"] for c in counts),
        })
    front = pareto([(r["dit_speedup"], r["psnr_db"], r["setting"]) for r in results])
    for r in results:
        r["pareto"] = r["setting"] in front
    return {"results": results, "calibrated_vs_wan13b": fitted_vs_published(results), "full_compute": {"accuracy_all": full_accuracy, "denoise_s": sum(full["denoise"]),
                                                 "total_s": sum(full["total"])},
            "prompts": [s.prompt for s in specs], "steps": args.steps,
            "guidance_scale": pipeline.model.defaults.guidance_scale, "model": pipeline.model.name}, sheet


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    kinds = {k: c for k, c in KIND_COLOURS.items() if any(r["cache"]["kind"] == k for r in report["results"])}
    for r in report["results"]:
        ax.scatter(r["dit_speedup"], r["psnr_db"], color=kinds[r["cache"]["kind"]], s=40)
        ax.annotate(r["setting"], (r["dit_speedup"], r["psnr_db"]), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    front = sorted((r["dit_speedup"], r["psnr_db"]) for r in report["results"] if r["pareto"])
    ax.plot(*zip(*front), color="grey", linestyle="--", linewidth=1, label="Pareto front")
    ax.axhline(30, color="black", linewidth=0.5, linestyle=":")
    ax.axvline(2, color="black", linewidth=0.5, linestyle=":")
    ax.set_xlabel("DiT-time speed-up vs full compute (same run)")
    ax.set_ylabel("mean PSNR vs full compute (dB)")
    ax.set_title(f"Feature caches on {report['model']}, {report['steps']} steps, CFG {report['guidance_scale']:g}")
    for kind, colour in kinds.items():
        ax.scatter([], [], color=colour, label=kind)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def contact_sheet(sheet: dict[str, np.ndarray], path: Path, columns: int = 5) -> None:
    """Rows: full compute, then each setting (labelled); columns: evenly spaced frames of the first prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sheet), columns, figsize=(columns * 1.1 + 1.6, len(sheet) * 1.1), squeeze=False)
    for row, (name, frames) in zip(axes, sheet.items()):
        for j, ax in enumerate(row):
            ax.imshow(frames[int(round(j * (len(frames) - 1) / (columns - 1)))])
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder; default the embedded model")
    parser.add_argument("--prompts", type=int, default=6, help="prompts of the tiny_accuracy set (evenly spaced)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="run only settings whose name contains one of these")
    parser.add_argument("--out", type=Path, default=RESULTS / "cache_bench.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    report, sheet = run(args)
    report["machine"] = {"threads": args.threads, "cpu": platform.processor() or platform.machine(),
                         "loadavg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                         "seconds": round(time.perf_counter() - start, 1)}
    report["command"] = "benchmarks/cache_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(report, args.out.with_suffix(".png"))
    contact_sheet(sheet, args.out.with_name(args.out.stem + "_sheet.png"))
    full = report["full_compute"]
    print(f"full compute: DiT {full['denoise_s']:.1f} s over {len(report['prompts'])} prompts, "
          f"detector accuracy {full['accuracy_all']:.0%}")
    print("| setting | DiT speed-up (paired) | end-to-end | PSNR dB (min) | SSIM | accuracy | forwards reused | "
          "attention reused | extra memory | Pareto |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in report["results"]:
        print(f"| {r['setting']} | {r['dit_speedup']:.2f}x ({r['dit_speedup_paired']:.2f}x) | {r['e2e_speedup']:.2f}x | {r['psnr_db']:.1f} "
              f"({r['psnr_min_db']:.1f}) | {r['ssim']:.3f} | {r['accuracy_all']:.0%} | {r['forwards_reused']:.1f} | "
              f"{r['attention_reused_fraction']:.0%} | {r['peak_extra_bytes'] / 2**20:.1f} MiB | "
              f"{'yes' if r['pareto'] else ''} |")
    return report


if __name__ == "__main__":
    main()
