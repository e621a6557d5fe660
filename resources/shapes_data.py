"""The `shapes` world: procedural clips of one coloured shape moving over a plain background.

Used three ways: ``scripts/train_shapes.py`` trains the embedded ``shapes`` model on these clips, and
``scripts/evaluate_shapes.py`` and ``tests/test_models_semantic.py`` check generated clips with the
attribute readers at the end of this module (colour, shape, motion, background).

Every word of a prompt changes the clip in a way the readers can see: five foreground colours at
well-separated corners of the RGB cube, three neutral backgrounds (so a foreground pixel is simply one
far from the background), three shapes told apart by their bounding boxes (a circle: square box, fill 0.79; a
triangle: square box, fill 0.5; a rectangle twice as wide as tall) and six motions (four directions, growing,
shrinking). Everything is deterministic from a ``numpy.random.Generator``.

A square was the third shape until the models of docs/models.md showed why not: at 32 x 32 under the VAE's
4x compression a square and a circle of the same size differ by little in the latents, and the trained model
drew squares with round corners (14% read as squares). A rectangle's width-to-height ratio survives blur.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.12, 0.80, 0.20),
    "blue": (0.12, 0.28, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.72, 0.15, 0.85),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
    "white": (1.0, 1.0, 1.0),
}
SHAPES = ("circle", "rectangle", "triangle")
MOTIONS = ("left", "right", "up", "down", "growing", "shrinking")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

WORDS = ["a", "moving", "on", "background", *COLOURS, *BACKGROUNDS, *SHAPES, *MOTIONS]

SIZE = 32  # default clip size (square), frames
FRAMES = 9


@dataclass(frozen=True)
class ClipSpec:
    colour: str
    shape: str
    motion: str
    background: str

    @property
    def prompt(self) -> str:
        action = f"moving {self.motion}" if self.motion in DIRECTIONS else self.motion
        return f"a {self.colour} {self.shape} {action} on a {self.background} background"


def parse_prompt(prompt: str) -> ClipSpec:
    """The spec of a prompt of the grammar (the inverse of ``ClipSpec.prompt``)."""
    words = prompt.lower().split()
    colour = next(w for w in words if w in COLOURS)
    shape = next(w for w in words if w in SHAPES)
    motion = next(w for w in words if w in MOTIONS)
    background = next(w for w in words if w in BACKGROUNDS)
    return ClipSpec(colour, shape, motion, background)


def all_specs() -> list[ClipSpec]:
    """Every prompt of the grammar (5 x 3 x 6 x 3 = 270)."""
    return [ClipSpec(*combo) for combo in itertools.product(COLOURS, SHAPES, MOTIONS, BACKGROUNDS)]


def random_spec(rng: np.random.Generator) -> ClipSpec:
    return ClipSpec(
        colour=str(rng.choice(list(COLOURS))),
        shape=str(rng.choice(SHAPES)),
        motion=str(rng.choice(MOTIONS)),
        background=str(rng.choice(list(BACKGROUNDS))),
    )


# --- Rendering ------------------------------------------------------------------------------------------

SUPERSAMPLE = 4  # subpixel samples per axis: anti-aliased edges
RECTANGLE_HEIGHT = 0.5  # of its width


def _coverage(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Fraction of each pixel inside the shape of half-size ``r`` centred at (cx, cy): [size, size]."""
    sub = (np.arange(size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(sub, sub)
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "rectangle":  # as wide as the circle, half as tall
        inside = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r * RECTANGLE_HEIGHT)
    elif shape == "triangle":  # apex up; its bounding box is the circle's
        depth = y - (cy - r)
        inside = (depth >= 0) & (y <= cy + r) & (np.abs(x - cx) <= depth / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def render(spec: ClipSpec, rng: np.random.Generator, size: int = SIZE, frames: int = FRAMES) -> np.ndarray:
    """One clip of ``spec``, float32 [frames, size, size, 3] in [0, 1]; position and sizes from ``rng``."""
    s = size / 32  # the ranges below are for 32 x 32
    t = np.linspace(0.0, 1.0, frames)
    if spec.motion in DIRECTIONS:
        # Large enough that a triangle's apex survives the VAE's 4x compression (at half-size 5-7 its
        # reconstructions read as circles), small enough to travel.
        r = rng.uniform(7.5, 9.0) * s
        travel = rng.uniform(9.0, 12.0) * s
        dx, dy = DIRECTIONS[spec.motion]
        margin = r + 1 * s
        along = rng.uniform(margin, size - margin - travel)  # start on the axis of motion
        across = rng.uniform(margin, size - margin)
        pos = along + travel * t
        cx, cy = (pos, np.full_like(t, across)) if dx else (np.full_like(t, across), pos)
        if dx < 0:
            cx = size - cx
        if dy < 0:
            cy = size - cy
        radii = np.full_like(t, r)
    else:
        small, large = rng.uniform(2.5, 3.5) * s, rng.uniform(10.0, 12.0) * s
        margin = large + 1 * s
        cx = np.full_like(t, rng.uniform(margin, size - margin))
        cy = np.full_like(t, rng.uniform(margin, size - margin))
        radii = small + (large - small) * (t if spec.motion == "growing" else 1 - t)
    fg = np.array(COLOURS[spec.colour], np.float32)
    bg = np.array(BACKGROUNDS[spec.background], np.float32)
    clip = np.empty((frames, size, size, 3), np.float32)
    for f in range(frames):
        alpha = _coverage(spec.shape, cx[f], cy[f], radii[f], size)[..., None]
        clip[f] = alpha * fg + (1 - alpha) * bg
    return clip


# --- Reading attributes back from a clip ----------------------------------------------------------------

FOREGROUND_DISTANCE = 0.3  # RGB distance (0-1 units) from the background that counts as foreground
MIN_MOTION = 3.0  # pixels (at 32 x 32) a clip's winning motion score must reach
GROWTH_PIXELS = 6.0  # a doubling of the area scores like a shift of 6 * ln 2 = 4.2 pixels
# Thresholds between the shapes, each about half way across the gap between the two classes' ranges on
# rendered clips (300 clips): bounding-box width / height (circle and triangle 0.94-1.07, rectangle
# 1.78-2.29), then fill ratio (triangle 0.50-0.59, circle 0.72-0.83).
ASPECT_RECTANGLE = 1.4
FILL_TRIANGLE_CIRCLE = 0.65


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[float, float, float]]) -> str:
    names = list(palette)
    distances = np.linalg.norm(np.array([palette[n] for n in names]) - rgb, axis=1)
    return names[int(np.argmin(distances))]


def _as_float(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    return frames.astype(np.float32) / 255.0 if frames.dtype == np.uint8 else frames.astype(np.float32)


def read_background(frames: np.ndarray) -> str:
    """The background name nearest the median colour of the clip's border pixels."""
    clip = _as_float(frames)
    border = np.concatenate([clip[:, 0], clip[:, -1], clip[:, :, 0], clip[:, :, -1]], axis=1)
    return _nearest(np.median(border.reshape(-1, 3), axis=0), BACKGROUNDS)


def foreground_mask(frames: np.ndarray) -> np.ndarray:
    """bool [F, H, W]: pixels far from the (read) background colour."""
    clip = _as_float(frames)
    bg = np.array(BACKGROUNDS[read_background(clip)])
    return np.linalg.norm(clip - bg, axis=-1) > FOREGROUND_DISTANCE


def read_colour(frames: np.ndarray) -> str | None:
    """The foreground colour name nearest the median foreground pixel; None when there is no foreground."""
    clip = _as_float(frames)
    mask = foreground_mask(clip)
    if not mask.any():
        return None
    return _nearest(np.median(clip[mask], axis=0), COLOURS)


def read_motion(frames: np.ndarray) -> str | None:
    """The motion whose score is highest: centroid shift (first two frames to last two) or log area ratio."""
    mask = foreground_mask(frames)
    n = mask.shape[0]
    k = max(1, n // 4)
    scale = 32 / mask.shape[-1]
    areas = mask.sum(axis=(1, 2)).astype(float)
    if areas[:k].sum() == 0 or areas[-k:].sum() == 0:
        return None
    ys, xs = np.mgrid[: mask.shape[1], : mask.shape[2]]

    def centroid(sel: slice) -> np.ndarray:
        m = mask[sel]
        return np.array([(m * xs).sum(), (m * ys).sum()]) / m.sum()

    dx, dy = (centroid(slice(n - k, n)) - centroid(slice(0, k))) * scale
    growth = GROWTH_PIXELS * np.log(areas[-k:].sum() / areas[:k].sum())
    scores = {"right": dx, "left": -dx, "down": dy, "up": -dy, "growing": growth, "shrinking": -growth}
    best = max(scores, key=lambda name: scores[name])
    return best if scores[best] >= MIN_MOTION else None


def read_shape(frames: np.ndarray) -> str | None:
    """Shape from the bounding box of the three largest foreground frames: a wide box is the rectangle, else
    the fill ratio tells the triangle (0.5) from the circle (0.79); None when the foreground is too small."""
    mask = foreground_mask(frames)
    aspects, fills = [], []
    for f in np.argsort(mask.sum(axis=(1, 2)))[::-1][:3]:
        ys, xs = np.nonzero(mask[f])
        if len(xs) < 12:
            continue
        width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        aspects.append(width / height)
        fills.append(len(xs) / (width * height))
    if not fills:
        return None
    if np.median(aspects) >= ASPECT_RECTANGLE:
        return "rectangle"
    return "triangle" if np.median(fills) < FILL_TRIANGLE_CIRCLE else "circle"


def read_clip(frames: np.ndarray) -> dict[str, str | None]:
    """Every attribute read back from a clip (uint8 or float frames [F, H, W, 3])."""
    return {
        "colour": read_colour(frames),
        "shape": read_shape(frames),
        "motion": read_motion(frames),
        "background": read_background(frames),
    }


def check_clip(frames: np.ndarray, spec: ClipSpec) -> dict[str, bool]:
    """attribute -> whether the clip shows what ``spec`` asked."""
    read = read_clip(frames)
    return {name: read[name] == getattr(spec, name) for name in read}
