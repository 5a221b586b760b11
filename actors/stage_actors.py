"""Actor classes for the text-encode and decode stages (the DiT ranks live in dit_group.py, the
patch-parallel VAE ranks in vae_group.py).

They are plain classes: `StagePool` applies `ray.remote` when it spawns them, and tests can
build them in-process. Each loads only its own stage's weights. Only numpy arrays and small
dicts cross the actor boundary (numpy arrays cross Ray's object store 3-5x faster than torch tensors,
measured: docs/design.md, "Data between actors");
decoded pixels are written to the output store inside the decoder and never travel.

torch and the stages are imported inside the methods so that the engine process, which
imports this module for the class objects, does not load torch.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)

DTYPE_NAMES = ("auto", "fp32", "bf16")


def resolve_dtype(dtype: str, device: str) -> "torch.dtype":
    """ServiceConfig.dtype -> torch dtype: "auto" is bf16 on CUDA and fp32 on CPU (stages.devices.default_dtype)."""
    import torch

    from stages.devices import default_dtype

    if dtype == "auto":
        return default_dtype(device)
    if dtype == "fp32":
        return torch.float32
    if dtype == "bf16":
        return torch.bfloat16
    raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")


def resolve_model_folder(model: str | None) -> Path:
    """The checkpoint folder for a path, or for the default model's name / None (created on first use).

    A folder is returned as is: importing the default-model writer pulls in transformers,
    which the engine, VAE and DiT processes would otherwise load for nothing.
    """
    if model is not None:
        path = Path(model).expanduser()
        if path.is_dir():
            return path
    from models.registry import resolve_model_path

    return resolve_model_path(model)


ConditioningArrays = dict[str, "np.ndarray | None"]
"""One prompt's conditioning as named float32 arrays (`models.conditioning.Conditioning.to_numpy`): what
crosses the object store between the text-encoder pool and the DiT group."""


class TextEncoderActor:
    """Stage 1 in an actor: prompts -> the family's conditioning as named float32 arrays."""

    def __init__(self, model: str, dtype: str, device: str) -> None:
        from models.registry import describe
        from stages.text_encode import TextEncodeStage

        described = describe(resolve_model_folder(model))
        torch_dtype = resolve_dtype(dtype, device)
        self.stage = TextEncodeStage.from_pretrained(described, dtype=torch_dtype, device=device)
        logger.info("text encoder of %s loaded (%s on %s, pid %d)", described.root, torch_dtype, device, os.getpid())

    def encode(self, requests: list[tuple[str, str | None]]
               ) -> list[tuple[ConditioningArrays, ConditioningArrays | None]]:
        """requests: (prompt, negative prompt or None) each -> (positive, negative or None) conditioning arrays."""
        out = self.stage.run(list(requests))
        return [(e.positive.to_numpy(), None if e.negative is None else e.negative.to_numpy()) for e in out]

    def encode_apart(self, requests: list[tuple[str, str | None]]) -> tuple[Any, ...]:
        """`encode`, returned as 1 + 2n objects (call it with num_returns = 1 + 2n for n requests): n, then each
        request's positive and negative conditioning, so the caller can await the count (to learn that the
        call succeeded) and hand each array on by reference without fetching it."""
        out = self.encode(requests)
        return (len(out), *(part for pair in out for part in pair))

    def ping(self) -> str:
        """Answers once the weights are loaded (the constructor runs before any method)."""
        return f"text_encode pid {os.getpid()}"


def write_result(frames: np.ndarray, out_path: str, fps: int, record: dict[str, Any],
                 decode_s: float) -> dict[str, Any]:
    """frames (T, H, W, 3) uint8 -> `out_path` (.mp4, or .png for one frame) + `<out_path stem>.json`.

    record: what reproduces the result (params, model, timings so far); the sidecar holds it plus
    frames/height/width/decode_s/output. Returns {"path", "sidecar", "frames", "height", "width", "decode_s"}.
    Shared by the single-actor decoder and rank 0 of a patch-parallel VAE group (vae_group.py).
    """
    from stages.media import write_media, write_sidecar

    path = write_media(frames, out_path, fps)
    info = {"frames": int(frames.shape[0]), "height": int(frames.shape[1]), "width": int(frames.shape[2]),
            "decode_s": decode_s}
    sidecar = write_sidecar(path, {**record, **info, "output": str(path)})
    return {"path": str(path), "sidecar": str(sidecar), **info}


class VAEDecoderActor:
    """Stage 3 in an actor: latents -> media file + JSON sidecar in the output store."""

    def __init__(self, model: str, device: str) -> None:
        from stages.decode import DecodeStage

        folder = resolve_model_folder(model)
        self.stage = DecodeStage.from_pretrained(folder, device=device)
        logger.info("VAE of %s loaded (fp32 on %s, pid %d)", folder, device, os.getpid())

    def decode(self, latents: np.ndarray, out_path: str, fps: int, record: dict[str, Any]) -> dict[str, Any]:
        """latents (C, F', H', W') -> `out_path` (.mp4, or .png for one frame) + `<out_path stem>.json`.

        record: what reproduces the result (params, model, timings so far); the sidecar holds it
        plus frames/height/width/decode_s/output. Returns the paths and the frame geometry.
        """
        start = time.perf_counter()
        frames = self.frames(latents)
        return write_result(frames, out_path, fps, record, time.perf_counter() - start)

    def frames(self, latents: np.ndarray, parallel: bool = False) -> np.ndarray:
        """latents (C, F', H', W') -> (T, H, W, 3) uint8; parallel: strip-parallel over this process's group."""
        import torch

        # Arrays from the object store are read-only views; the copy makes a tensor that owns its memory.
        return self.stage.run(torch.tensor(latents, dtype=torch.float32), parallel=parallel)

    def ping(self) -> str:
        """Answers once the weights are loaded."""
        return f"decode pid {os.getpid()}"
