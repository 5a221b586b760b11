"""The synthetic text-to-video task of the embedded default model, in one place.

Videos show one shape (circle, square or triangle) in one of six colours on a white background,
moving left, right, up or down at a constant speed, or standing still, and are described by prompts
such as "a red circle moving left on a white background" / "a blue square standing still on a white
background". This module holds the vocabulary, the prompt template, a seeded anti-aliased renderer
(training data) and the simple detector that scores generated videos (benchmark and tests).

Geometry, at the default 64x64 and 17 frames: the shape is 18-24 px across (a fraction of the frame,
so other sizes scale), moves 1.25-1.75 px per frame (20-28 px over the clip) and stays inside the
frame with a 2 px margin for the whole clip. The triangle is isosceles, apex up, base at the bottom.

Videos are numpy arrays (T, H, W, 3): float32 in [0, 1] from the renderer; the detector also takes the
pipeline's uint8 frames. `to_model_video` converts renders to the VAE's (B, 3, T, H, W) in [-1, 1].
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# 1. Vocabulary and prompts
# ---------------------------------------------------------------------------------------------
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.00),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.70, 0.10),
    "blue": (0.10, 0.20, 0.95),
    "purple": (0.60, 0.10, 0.80),
}
"""Shape colours, RGB in [0, 1]; the closest pair (orange, yellow) is 0.37 apart."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")
BACKGROUND = "white"
BACKGROUND_RGB = (1.0, 1.0, 1.0)

# Unit displacement per frame in image coordinates (x right, y down).
_STEP = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0), "still": (0.0, 0.0)}

NUM_FRAMES, HEIGHT, WIDTH = 17, 64, 64
"""The task's native clip: 17 frames (5 latent frames) of 64x64 pixels (8x8 latents)."""

SIZE_RANGE = (18 / 64, 24 / 64)
"""Shape size (bounding-box side) as a fraction of min(H, W)."""
SPEED_RANGE = (1.25 / 64, 1.75 / 64)
"""Speed per frame as a fraction of the frame side along the motion."""
MARGIN = 2 / 64
"""Gap kept between the shape and the frame border, as a fraction of the side."""

_PROMPT_RE = re.compile(
    rf"^an? (?P<colour>{'|'.join(COLOURS)}) (?P<shape>{'|'.join(SHAPES)}) "
    rf"(?:moving (?P<direction>left|right|up|down)|standing still) on an? {BACKGROUND} background$"
)


@dataclass(frozen=True)
class ShapeSpec:
    """What one video shows: a colour, a shape and a direction ("still" for no motion)."""

    colour: str
    shape: str
    direction: str

    def __post_init__(self) -> None:
        for value, allowed, name in ((self.colour, COLOURS, "colour"), (self.shape, SHAPES, "shape"),
                                     (self.direction, DIRECTIONS, "direction")):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")

    @property
    def prompt(self) -> str:
        """e.g. "a red circle moving left on a white background", "a red circle standing still on a ..."."""
        motion = "standing still" if self.direction == "still" else f"moving {self.direction}"
        return f"a {self.colour} {self.shape} {motion} on a {BACKGROUND} background"

    @classmethod
    def from_prompt(cls, prompt: str) -> "ShapeSpec":
        """Parse a prompt written with the template (case and surrounding spaces are ignored)."""
        match = _PROMPT_RE.match(" ".join(prompt.lower().split()))
        if match is None:
            raise ValueError(f"{prompt!r} does not follow the template 'a <colour> <shape> moving <direction> on a "
                             f"white background' (or '... standing still ...'); colours: {', '.join(COLOURS)}; "
                             f"shapes: {', '.join(SHAPES)}; directions: left, right, up, down")
        return cls(match["colour"], match["shape"], match["direction"] or "still")


def all_specs() -> list[ShapeSpec]:
    """Every colour x shape x direction combination (6 x 3 x 5 = 90), in a fixed order."""
    return [ShapeSpec(c, s, d) for c, s, d in itertools.product(COLOURS, SHAPES, DIRECTIONS)]


def vocabulary() -> list[str]:
    """Every word a prompt of the task can contain, in a fixed order."""
    words = ["a", "an", "moving", "standing", "still", "on", BACKGROUND, "background"]
    return words + list(COLOURS) + list(SHAPES) + [d for d in DIRECTIONS if d != "still"]


# ---------------------------------------------------------------------------------------------
# 2. Renderer
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Motion:
    """Where the shape is: bounding-box side `size`, centre (x0, y0) at frame 0, `speed` px per frame."""

    size: float
    x0: float
    y0: float
    speed: float


def coverage(shape: str, cx: np.ndarray, cy: np.ndarray, size: np.ndarray, height: int, width: int,
             supersample: int = 4) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], (N, H, W) float32, of N shapes with centres (cx, cy) and sides `size`.

    Pixel (i, j) covers [j, j+1) x [i, i+1); coverage is the mean inside-test over a supersample^2 grid.
    """
    offsets = (np.arange(supersample, dtype=np.float32) + 0.5) / supersample
    ys = (np.arange(height, dtype=np.float32)[:, None] + offsets[None, :]).reshape(-1)  # (H*s,)
    xs = (np.arange(width, dtype=np.float32)[:, None] + offsets[None, :]).reshape(-1)  # (W*s,)
    cx, cy, size = (np.asarray(v, dtype=np.float32).reshape(-1, 1, 1) for v in (cx, cy, size))
    dx = xs[None, None, :] - cx
    dy = ys[None, :, None] - cy
    half = size / 2
    if shape == "circle":
        inside = dx * dx + dy * dy <= half * half
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":
        # apex (cx, cy - half), base corners (cx -/+ half, cy + half): half-width grows as (y - top) / 2
        depth = dy + half
        inside = (depth >= 0) & (dy <= half) & (np.abs(dx) <= depth / 2)
    else:
        raise ValueError(f"shape {shape!r} is not one of {', '.join(SHAPES)}")
    n = inside.shape[0]
    return inside.reshape(n, height, supersample, width, supersample).mean(axis=(2, 4), dtype=np.float32)


def sample_motion(direction: str, rng: np.random.Generator, num_frames: int = NUM_FRAMES, height: int = HEIGHT,
                  width: int = WIDTH) -> Motion:
    """A random size, speed and start such that the shape stays in the frame (with MARGIN) for the whole clip."""
    side = min(height, width)
    size = float(rng.uniform(*SIZE_RANGE)) * side
    dx, dy = _STEP[direction]
    speed = float(rng.uniform(*SPEED_RANGE)) * (width if dx else height) if direction != "still" else 0.0
    travel = speed * (num_frames - 1)
    centres = []
    for extent, step in ((width, dx), (height, dy)):
        lo = MARGIN * extent + size / 2
        hi = extent - MARGIN * extent - size / 2 - travel * abs(step)
        if hi < lo:
            raise ValueError(f"a {size:.1f} px shape moving {travel:.1f} px does not fit in {extent} px; "
                             f"use fewer frames or a larger frame")
        start = float(rng.uniform(lo, hi))
        centres.append(start + travel if step < 0 else start)  # moving left/up starts at the far side
    return Motion(size, centres[0], centres[1], speed)


def render(spec: ShapeSpec, motion: Motion, num_frames: int = NUM_FRAMES, height: int = HEIGHT,
           width: int = WIDTH, colour: tuple[float, float, float] | None = None) -> np.ndarray:
    """The video (T, H, W, 3) float32 in [0, 1]; `colour` overrides the palette colour (augmentation)."""
    dx, dy = _STEP[spec.direction]
    frames = np.arange(num_frames, dtype=np.float32)
    cov = coverage(spec.shape, motion.x0 + dx * motion.speed * frames, motion.y0 + dy * motion.speed * frames,
                   np.full(num_frames, motion.size), height, width)[..., None]  # (T, H, W, 1)
    fg = np.asarray(colour if colour is not None else COLOURS[spec.colour], dtype=np.float32)
    bg = np.asarray(BACKGROUND_RGB, dtype=np.float32)
    return (bg + cov * (fg - bg)).astype(np.float32)


def sample_video(spec: ShapeSpec, rng: np.random.Generator, num_frames: int = NUM_FRAMES, height: int = HEIGHT,
                 width: int = WIDTH, colour_jitter: float = 0.0) -> np.ndarray:
    """`render` at a random size, speed and start (and colour jitter of +-colour_jitter per channel)."""
    motion = sample_motion(spec.direction, rng, num_frames, height, width)
    colour = None
    if colour_jitter:
        base = np.asarray(COLOURS[spec.colour])
        colour = tuple(np.clip(base + rng.uniform(-colour_jitter, colour_jitter, 3), 0, 1).tolist())
    return render(spec, motion, num_frames, height, width, colour)


def to_model_video(videos: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) or (B, T, H, W, 3) in [0, 1] -> (B, 3, T, H, W) float32 in [-1, 1] (the VAE's input)."""
    x = torch.from_numpy(np.ascontiguousarray(videos, dtype=np.float32))
    if x.ndim == 4:
        x = x[None]
    return x.permute(0, 4, 1, 2, 3).mul(2).sub(1).contiguous()


# ---------------------------------------------------------------------------------------------
# 3. Detector
# ---------------------------------------------------------------------------------------------
FOREGROUND_DISTANCE = 0.3
"""A pixel whose RGB (in [0, 1]) is farther than this from white is foreground."""
CORE_FRACTION = 0.6
"""Pixels at >= this fraction of the farthest foreground distance give the shape's colour."""
STILL_PX = 6 / 64
"""Centroid displacements (first vs last frames) below this fraction of the side mean "still"."""


@dataclass(frozen=True)
class Detection:
    """What the detector saw; a field is None when no shape was found.

    rgb: mean colour of the shape's core pixels; displacement: centroid (dx, dy) in px from the first
    to the last frames (x right, y down); shape_scores: mean template IoU per shape; fg_fraction: mean
    fraction of foreground pixels per frame.
    """

    colour: str | None
    shape: str | None
    direction: str | None
    rgb: tuple[float, float, float] | None
    displacement: tuple[float, float] | None
    shape_scores: dict[str, float]
    fg_fraction: float

    def matches(self, spec: ShapeSpec) -> dict[str, bool]:
        """Per attribute, whether this detection agrees with `spec` ("all" when every one does)."""
        hits = {"colour": self.colour == spec.colour, "shape": self.shape == spec.shape,
                "direction": self.direction == spec.direction}
        return {**hits, "all": all(hits.values())}


def _as_unit_video(video: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 (T, H, W, 3), float (T, H, W, 3) in [0, 1] or a model video (3, T, H, W) in [-1, 1] -> float [0, 1]."""
    if isinstance(video, torch.Tensor):
        if video.ndim != 4 or video.shape[0] != 3:
            raise ValueError(f"a tensor video must be (3, T, H, W) in [-1, 1], got {tuple(video.shape)}")
        return ((video.detach().float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).cpu().numpy()
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must be (T, H, W, 3), got {video.shape}")
    return video.astype(np.float32) / 255.0 if video.dtype == np.uint8 else video.astype(np.float32)


def detect(video: np.ndarray | torch.Tensor) -> Detection:
    """Colour, shape and motion direction of the one shape in `video` (see module docstring for the layouts).

    - foreground: pixels farther than FOREGROUND_DISTANCE from white;
    - colour: nearest palette colour to the mean of the core foreground pixels (CORE_FRACTION);
    - direction: centroid of the first three vs the last three frames; "still" below STILL_PX, otherwise
      the dominant axis and its sign;
    - shape: per frame, the soft foreground mask is compared (IoU) with the circle, square and triangle
      that fill its bounding box; the shape with the best mean IoU over the frames wins.
    """
    v = _as_unit_video(video)
    frames, height, width, _ = v.shape
    dist = np.linalg.norm(1.0 - v, axis=-1)  # (T, H, W), distance from white
    fg = dist > FOREGROUND_DISTANCE
    fg_fraction = float(fg.mean())
    if not fg.any():
        return Detection(None, None, None, None, None, {}, fg_fraction)

    # colour
    core = dist >= CORE_FRACTION * dist[fg].max()
    rgb = v[core].mean(axis=0)
    names = list(COLOURS)
    palette = np.asarray([COLOURS[n] for n in names], dtype=np.float32)
    colour = names[int(np.argmin(np.linalg.norm(palette - rgb, axis=1)))]

    # soft mask: coverage estimated from the distance to white relative to the shape colour's distance
    full = max(float(np.linalg.norm(1.0 - rgb)), 1e-3)
    soft = np.clip(dist / full, 0.0, 1.0) * (dist > FOREGROUND_DISTANCE / 2)

    # direction
    ys, xs = np.arange(height, dtype=np.float32) + 0.5, np.arange(width, dtype=np.float32) + 0.5
    mass = soft.sum(axis=(1, 2))
    present = mass > 0
    cx = np.where(present, (soft.sum(axis=1) * xs).sum(axis=1) / np.maximum(mass, 1e-6), np.nan)
    cy = np.where(present, (soft.sum(axis=2) * ys).sum(axis=1) / np.maximum(mass, 1e-6), np.nan)
    k = max(1, min(3, frames // 3))
    if np.isnan(cx[:k]).all() or np.isnan(cx[-k:]).all():
        direction, disp = None, None
    else:
        ddx = float(np.nanmean(cx[-k:]) - np.nanmean(cx[:k]))
        ddy = float(np.nanmean(cy[-k:]) - np.nanmean(cy[:k]))
        disp = (ddx, ddy)
        if max(abs(ddx) / width, abs(ddy) / height) < STILL_PX:
            direction = "still"
        elif abs(ddx) / width >= abs(ddy) / height:
            direction = "right" if ddx > 0 else "left"
        else:
            direction = "down" if ddy > 0 else "up"

    # shape
    scores = {s: 0.0 for s in SHAPES}
    counted = 0
    for t in range(frames):
        mask = soft[t]
        rows, cols = np.nonzero(mask >= 0.5)
        if rows.size < 4:
            continue
        y0, y1 = rows.min(), rows.max() + 1
        x0, x1 = cols.min(), cols.max() + 1
        h, w = y1 - y0, x1 - x0
        for s in SHAPES:
            template = _box_template(s, h, w)
            window = mask[y0:y1, x0:x1]
            inter = np.minimum(window, template).sum()
            union = mask.sum() - window.sum() + np.maximum(window, template).sum()
            scores[s] += float(inter / max(union, 1e-6))
        counted += 1
    if counted == 0:
        return Detection(colour, None, direction, tuple(rgb.tolist()), disp, {}, fg_fraction)
    scores = {s: v / counted for s, v in scores.items()}
    shape = max(scores, key=scores.__getitem__)
    return Detection(colour, shape, direction, tuple(float(c) for c in rgb), disp, scores, fg_fraction)


@functools.lru_cache(maxsize=512)
def _box_template(shape: str, h: int, w: int) -> np.ndarray:
    """Coverage (h, w) of `shape` stretched to fill an h x w box (the circle becomes an ellipse); read-only, cached."""
    template = _stretched_template(shape, h, w)
    template.setflags(write=False)
    return template


def _stretched_template(shape: str, h: int, w: int) -> np.ndarray:
    side = float(max(h, w))
    cov = coverage(shape, np.array([side / 2]), np.array([side / 2]), np.array([side]), int(side), int(side))[0]
    if h == w:
        return cov
    # stretch the square template to the box by nearest sampling (boxes are near-square in practice)
    ri = np.minimum((np.arange(h) + 0.5) * side / h, side - 1).astype(int)
    ci = np.minimum((np.arange(w) + 0.5) * side / w, side - 1).astype(int)
    return cov[np.ix_(ri, ci)]
