"""`smartdiff`: the command line. `smartdiff generate` runs the in-process pipeline once."""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import pydantic
import torch
from tqdm import tqdm

from models.loading import CheckpointError
from stages.media import output_suffix, write_media, write_sidecar
from stages.params import GenerationParams, format_validation_error
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
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smartdiff", description="Smart-Diffusion: Wan text-to-video inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate one video (or image with --frames 1) in this process")
    gen.add_argument("--model", default=None,
                     help="checkpoint folder (original Wan or diffusers layout); default: the embedded tiny model")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None, help="default: Wan's default negative prompt")
    gen.add_argument("--height", type=int, help="pixels, multiple of 16 (default: the model's)")
    gen.add_argument("--width", type=int, help="pixels, multiple of 16 (default: the model's)")
    gen.add_argument("--frames", type=int, help="4n+1 frames; 1 writes a .png (default: the model's)")
    gen.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale; 1 disables it")
    gen.add_argument("--guidance-2", type=float, help="Wan2.2 A14B: guidance of the low-noise expert")
    gen.add_argument("--shift", type=float, help="flow-matching timestep shift")
    gen.add_argument("--sampler", choices=SAMPLER_NAMES, help="default: the model's (unipc)")
    gen.add_argument("--seed", type=int, help="default: random (recorded in the sidecar)")
    gen.add_argument("--out", type=Path, default=None,
                     help="output file (.mp4, or .png for one frame); a JSON sidecar is written next to it")
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def peak_memory_mb(device: str) -> dict[str, float]:
    """Peak resident memory of this process (and of the GPU allocator on CUDA), in MiB."""
    peak = {"host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.device(device).type == "cuda":
        peak["gpu_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def generate(args: argparse.Namespace) -> int:
    from stages.pipeline import Pipeline  # heavy imports only once the arguments are known

    fields = {PARAM_FLAGS[k]: v for k, v in vars(args).items() if k in PARAM_FLAGS and v is not None}
    try:
        params = GenerationParams.model_validate(fields)
    except pydantic.ValidationError as exc:
        print(f"smartdiff: invalid request:\n{format_validation_error(exc)}", file=sys.stderr)
        return 2
    try:
        pipeline = Pipeline.from_pretrained(args.model, dtype=DTYPES.get(args.dtype), device=args.device)
    except (CheckpointError, ValueError) as exc:
        print(f"smartdiff: cannot load the model: {exc}", file=sys.stderr)
        return 1
    try:
        resolved = pipeline.resolve(params)
    except pydantic.ValidationError as exc:
        print(f"smartdiff: invalid request:\n{format_validation_error(exc)}", file=sys.stderr)
        return 2

    bar = tqdm(total=resolved.num_inference_steps, desc="denoising", unit="step", disable=args.quiet)

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    result = pipeline.generate(resolved, progress=progress)
    bar.close()

    out = args.out or Path("outputs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{resolved.seed}"
    out = out.with_suffix(output_suffix(result.frames.shape[0]))
    media = write_media(result.frames, out, fps=pipeline.preset.defaults.fps)
    record: dict[str, Any] = {
        "model": pipeline.model_name,
        "preset": pipeline.preset.name,
        "params": result.params.model_dump(),
        "output": str(media),
        "frames": int(result.frames.shape[0]),
        "height": int(result.frames.shape[1]),
        "width": int(result.frames.shape[2]),
        "fps": pipeline.preset.defaults.fps,
        "device": args.device,
        "dtype": str(next(pipeline.denoise_stage.experts[0].parameters()).dtype).removeprefix("torch."),
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
        "memory": peak_memory_mb(args.device),
    }
    sidecar = write_sidecar(media, record)
    print(f"wrote {media} and {sidecar} ({result.timings['total']:.1f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return generate(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
