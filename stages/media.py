"""Writing results: mp4 through imageio-ffmpeg (png for a single frame), plus a JSON sidecar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import imageio.v2 as imageio
import numpy as np


def output_suffix(num_frames: int) -> str:
    return ".png" if num_frames == 1 else ".mp4"


def write_media(frames: np.ndarray, path: str | Path, fps: int) -> Path:
    """frames (T, H, W, 3) uint8 -> `path` (.mp4 for T > 1, .png for T == 1). Returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    if path.suffix == ".png":
        if frames.shape[0] != 1:
            raise ValueError(f"a .png holds one frame, got {frames.shape[0]}")
        imageio.imwrite(path, frames[0])
        return path
    # yuv420p + libx264 plays everywhere; sizes are multiples of 16, so no resizing happens.
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, pixelformat="yuv420p",
                            macro_block_size=16, ffmpeg_log_level="error") as writer:
        for frame in frames:
            writer.append_data(frame)
    return path


def write_sidecar(media_path: str | Path, record: dict[str, Any]) -> Path:
    """`<media>.json` next to the media file, with everything needed to reproduce it."""
    sidecar = Path(media_path).with_suffix(".json")
    sidecar.write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n")
    return sidecar


def read_video(path: str | Path) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of a video or image file (used by tests and benchmarks)."""
    path = Path(path)
    if path.suffix == ".png":
        return np.asarray(imageio.imread(path))[None, ..., :3]
    return np.stack([np.asarray(f)[..., :3] for f in imageio.get_reader(path)])
