"""`smartdiff`: the command line. `smartdiff generate` runs the pipeline once; `smartdiff calibrate` measures a
model's feature-cache calibration (stages/calibrate.py).

With `--world-size N` it spawns N local ranks (one torch.distributed group: gloo on CPU, NCCL with
one GPU per rank on CUDA) that run the same pipeline together: the DiT over the parallel layout
(`--cfg-degree/--ring-degree/--ulysses-degree`, automatic when none is given) and the VAE decode one
strip per rank. Rank 0 reports progress and returns the frames; this process writes the files.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import pydantic
import torch
from tqdm import tqdm

from flexcache.spec import parse_cache_option
from models.cache_calibration import CALIBRATION_FILE
from models.loading import CheckpointError
from parallel.launch import run_local
from parallel.mesh import LayoutError, ParallelLayout, resolve_layout
from stages.media import output_suffix, write_media, write_sidecar
from stages.params import GenerationParams, ResolvedParams, format_validation_error
from stages.samplers import SAMPLER_NAMES

logger = logging.getLogger("smartdiff")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# CLI flag -> GenerationParams field; a flag left out means "the model's default".
PARAM_FLAGS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "height": "height",
    "width": "width",
    "frames": "num_frames",
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
    "guidance_2": "guidance_scale_2",
    "shift": "shift",
    "sampler": "sampler",
    "seed": "seed",
    "cache": "cache",
}


def _cache_option(text: str) -> dict[str, Any]:
    try:
        return parse_cache_option(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smartdiff", description="Smart-Diffusion: text-to-video and text-to-image "
                                                                 "inference with diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate one video or image (an image model, or --frames 1) in this "
                                          "process")
    gen.add_argument("--model", default=None,
                     help="checkpoint folder (Wan or FLUX.1, original or diffusers layout); default: the embedded "
                          "tiny Wan model")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None,
                     help="models with classifier-free guidance (Wan); default: the model's own")
    gen.add_argument("--height", type=int, help="pixels, multiple of 16 (default: the model's)")
    gen.add_argument("--width", type=int, help="pixels, multiple of 16 (default: the model's)")
    gen.add_argument("--frames", type=int, help="4n+1 frames; 1 writes a .png (default: the model's)")
    gen.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    gen.add_argument("--guidance", type=float, help="guidance scale: classifier-free (Wan; 1 disables it) or "
                                                    "distilled (FLUX.1-dev)")
    gen.add_argument("--guidance-2", type=float, help="Wan2.2 A14B: guidance of the low-noise expert")
    gen.add_argument("--shift", type=float, help="flow-matching timestep shift")
    gen.add_argument("--sampler", choices=SAMPLER_NAMES, help="default: the model's (Wan: unipc; FLUX.1: flowmatch-euler)")
    gen.add_argument("--seed", type=int, help="default: random (recorded in the sidecar)")
    gen.add_argument("--cache", type=_cache_option, metavar="KIND[:key=value,...]",
                     help="feature cache, e.g. fbcache:threshold=0.08 (default: none, every block computed)")
    gen.add_argument("--calibration", type=Path, default=None,
                     help=f"feature-cache calibration file (default: {CALIBRATION_FILE} in the checkpoint folder, if any)")
    gen.add_argument("--out", type=Path, default=None,
                     help="output file (.mp4, or .png for one frame); a JSON sidecar is written next to it")
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    par = gen.add_argument_group("parallelism (one request over several local ranks)")
    par.add_argument("--world-size", type=int, default=1,
                     help="ranks to spawn on this machine (CUDA: one GPU each); default 1")
    par.add_argument("--cfg-degree", type=int, help="1 or 2: run the two guidance branches on different ranks")
    par.add_argument("--ring-degree", type=int, help="ring-attention degree")
    par.add_argument("--ulysses-degree", type=int, help="Ulysses degree (must divide the attention heads)")
    cal = sub.add_parser("calibrate", help="measure a model's feature-cache calibration (TeaCache polynomial, "
                                           "MagCache curve, threshold per quality target) from full compute")
    cal.add_argument("--model", default=None, help="checkpoint folder; default: the embedded tiny Wan model")
    cal.add_argument("--prompts", type=Path, required=True, help="text file, one prompt per line")
    cal.add_argument("--steps", type=int, help="denoising steps (default: the model's); the curves are for this count")
    cal.add_argument("--height", type=int, help="pixels (default: the model's); calibrate at the size you serve")
    cal.add_argument("--width", type=int, help="pixels (default: the model's)")
    cal.add_argument("--frames", type=int, help="frames (default: the model's)")
    cal.add_argument("--seed", type=int, default=0, help="prompt i runs with seed SEED + i (default 0)")
    cal.add_argument("--out", type=Path, default=None,
                     help=f"calibration file; default: {CALIBRATION_FILE} in the checkpoint folder, where every "
                          "request on the model picks it up")
    cal.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cal.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    cal.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def peak_memory_mb(device: str) -> dict[str, float]:
    """Peak resident memory of this process (and of the GPU allocator on CUDA), in MiB."""
    peak = {"host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.device(device).type == "cuda":
        peak["gpu_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def generate(args: argparse.Namespace) -> int:
    from models.registry import describe, resolve_model_path  # heavy imports only once the arguments are known

    fields = {PARAM_FLAGS[k]: v for k, v in vars(args).items() if k in PARAM_FLAGS and v is not None}
    try:
        params = GenerationParams.model_validate(fields)
    except pydantic.ValidationError as exc:
        print(f"smartdiff: invalid request:\n{format_validation_error(exc)}", file=sys.stderr)
        return 2
    try:
        root = resolve_model_path(args.model)
        model = describe(root, args.calibration)
    except (CheckpointError, ValueError) as exc:
        print(f"smartdiff: cannot load the model: {exc}", file=sys.stderr)
        return 1
    try:
        resolved = params.resolve(model)
    except pydantic.ValidationError as exc:
        print(f"smartdiff: invalid request:\n{format_validation_error(exc)}", file=sys.stderr)
        return 2
    degrees = (args.cfg_degree, args.ring_degree, args.ulysses_degree)
    try:
        if args.world_size < 1:
            raise LayoutError(f"--world-size must be at least 1, got {args.world_size}")
        layout = resolve_layout(args.world_size, model.num_heads, resolved.guided, *degrees,
                                world_label="--world-size", guidance=model.guidance)
    except LayoutError as exc:
        print(f"smartdiff: invalid parallel layout: {exc}", file=sys.stderr)
        return 2
    rank_args = (str(root), args.dtype, args.device, resolved.model_dump(),
                 (layout.cfg_degree, layout.ring_degree, layout.ulysses_degree), args.quiet)
    if layout.world_size == 1:
        run = _generate_on_rank(0, 1, *rank_args)
    else:
        logger.info("spawning %d ranks, layout %s", layout.world_size, layout)
        # CPU ranks share the cores instead of each taking all of them.
        threads = max(1, (os.cpu_count() or 1) // layout.world_size) if args.device == "cpu" else None
        run = run_local(_generate_on_rank, layout.world_size, *rank_args, threads_per_rank=threads)[0]
    assert run is not None

    out = args.out or Path("outputs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{resolved.seed}"
    out = out.with_suffix(output_suffix(run["frames"].shape[0]))
    frames = run["frames"]
    media = write_media(frames, out, fps=model.defaults.fps)
    record: dict[str, Any] = {
        "model": str(root),
        "preset": model.name,
        "params": resolved.model_dump(),
        "output": str(media),
        "frames": int(frames.shape[0]),
        "height": int(frames.shape[1]),
        "width": int(frames.shape[2]),
        "fps": model.defaults.fps,
        "device": args.device,
        "dtype": run["dtype"],
        "world_size": layout.world_size,
        "parallel_layout": str(layout),
        "timings_s": {k: round(v, 4) for k, v in run["timings"].items()},
        "memory": run["memory"],
        "cache": run["cache"],
    }
    sidecar = write_sidecar(media, record)
    print(f"wrote {media} and {sidecar} ({run['timings']['total']:.1f} s)")
    return 0


def _generate_on_rank(rank: int, world_size: int, model: str, dtype: str | None, device: str,
                      params: dict[str, Any], degrees: tuple[int, int, int], quiet: bool) -> dict[str, Any] | None:
    """One rank of `generate` (a spawned process, or this one when world_size is 1); rank 0 returns the result."""
    from parallel.mesh import ParallelMesh
    from stages.pipeline import Pipeline

    mesh = ParallelMesh.build(ParallelLayout(*degrees)) if world_size > 1 else None
    pipeline = Pipeline.from_pretrained(model, dtype=DTYPES.get(dtype) if dtype else None, device=device, mesh=mesh)
    resolved = ResolvedParams.model_validate(params)
    bar = tqdm(total=resolved.num_inference_steps, desc="denoising", unit="step", disable=quiet or rank != 0)

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    result = pipeline.generate(resolved, progress=progress)
    bar.close()
    if rank != 0:
        return None
    return {"frames": result.frames, "timings": result.timings, "memory": peak_memory_mb(device), "cache": result.cache,
            "dtype": str(next(pipeline.denoise_stage.experts[0].parameters()).dtype).removeprefix("torch.")}


def calibrate(args: argparse.Namespace) -> int:
    from models.registry import resolve_model_path
    from stages.calibrate import SWEEPS, calibrate as run_calibration, read_prompts, target_table, work_units
    from stages.pipeline import Pipeline

    try:
        prompts = read_prompts(args.prompts)
    except (OSError, ValueError) as exc:
        print(f"smartdiff: cannot read the prompts: {exc}", file=sys.stderr)
        return 2
    if args.steps is not None and args.steps < 2:
        print(f"smartdiff: --steps must be at least 2, got {args.steps}", file=sys.stderr)
        return 2
    try:
        root = resolve_model_path(args.model)
        pipeline = Pipeline.from_pretrained(root, dtype=DTYPES[args.dtype] if args.dtype else None, device=args.device)
    except (CheckpointError, ValueError) as exc:
        print(f"smartdiff: cannot load the model: {exc}", file=sys.stderr)
        return 1
    with tqdm(total=work_units(prompts, SWEEPS), unit="gen", disable=args.quiet, desc="calibrating") as bar:
        try:
            size = {field: value for field, value in (("height", args.height), ("width", args.width),
                                                      ("num_frames", args.frames)) if value is not None}
            calibration = run_calibration(pipeline, prompts, steps=args.steps, seed=args.seed, request=size,
                                          tick=lambda: bar.update(1))
        except pydantic.ValidationError as exc:
            print(f"smartdiff: invalid request:\n{format_validation_error(exc)}", file=sys.stderr)
            return 2
    out = calibration.write(args.out or root / CALIBRATION_FILE)
    for mode, fit in calibration.teacache.items():
        print(f"TeaCache {mode} ({fit.signal}): R^2 {fit.r2:.3f} over {fit.samples} forwards")
    if calibration.magcache is not None:
        print(f"MagCache ratio curve: R^2 {calibration.magcache.r2:.3f} over {calibration.magcache.samples} ratios")
    print("kind        target dB  threshold  PSNR dB  forwards reused")
    for row in target_table(calibration):
        psnr = "-" if row["psnr_db"] is None else f"{row['psnr_db']:.1f}"
        print(f"{row['kind']:<11} {row['target_psnr']:>9.0f}  {row['threshold']:>9g}  {psnr:>7}  "
              f"{row['forwards_reused']:>15.1f}")
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return generate(args)
    if args.command == "calibrate":
        return calibrate(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
