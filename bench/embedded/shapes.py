"""The shapes world: a deterministic, seeded renderer of small RGB scenes.

Every scene is one or two objects (shape, color, size, position) on a uniform
background, with a caption, its attributes and its object masks. Scene ``i`` of a
set with seed ``s`` depends on ``(s, i)`` alone, so any slice of a set can be
rendered on its own and the same seed always gives the same bytes.

Held-out attribute values (``HELDOUT_SHAPES``, ``HELDOUT_COLORS``) never appear in
the training distribution (``split="train"``); they are the concepts that
personalization methods learn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
HELDOUT_SHAPES: tuple[str, ...] = ("diamond",)
ALL_SHAPES = SHAPES + HELDOUT_SHAPES

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 210, 220),
}
HELDOUT_COLORS: dict[str, tuple[int, int, int]] = {"orange": (245, 140, 20)}
ALL_COLORS = {**COLORS, **HELDOUT_COLORS}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "navy": (20, 30, 90),
}
SIZES: dict[str, float] = {"small": 0.22, "large": 0.34}  # radius as a fraction of the image side

# Bump when rendering changes: it is part of every reference set's identity (and cache key).
RENDERER_VERSION = 1
SUPERSAMPLE = 4  # each pixel is the mean of SUPERSAMPLE**2 sub-pixel samples (anti-aliasing)


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    cx: float  # centre, as a fraction of the image side
    cy: float


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: str

    @property
    def caption(self) -> str:
        things = " and ".join(f"a {o.size} {o.color} {o.shape}" for o in self.objects)
        return f"{things} on a {self.background} background"

    def attributes(self) -> dict:
        return {"background": self.background, "objects": [asdict(o) for o in self.objects]}

    def with_changes(self, index: int = 0, **changes) -> "Scene":
        """The same scene with one object's attributes changed (ground truth for editing)."""
        objects = list(self.objects)
        objects[index] = replace(objects[index], **changes)
        return Scene(tuple(objects), self.background)


@dataclass(frozen=True)
class WorldConfig:
    """Which attribute values a set draws from. ``split`` selects seen or held-out values."""

    resolution: int = 16
    max_objects: int = 1
    split: str = "train"  # "train": seen values only; "all": held-out values too

    def shapes(self) -> Sequence[str]:
        return SHAPES if self.split == "train" else ALL_SHAPES

    def colors(self) -> Sequence[str]:
        return tuple(COLORS) if self.split == "train" else tuple(ALL_COLORS)


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of scene ``index`` in the set with ``seed``; independent of any other index."""
    return np.random.default_rng([int(seed), int(index)])


def sample_scene(rng: np.random.Generator, world: WorldConfig) -> Scene:
    n_objects = int(rng.integers(1, world.max_objects + 1))
    background = str(rng.choice(tuple(BACKGROUNDS)))
    objects = []
    shapes, colors = world.shapes(), world.colors()
    for _ in range(n_objects):
        size = str(rng.choice(tuple(SIZES)))
        r = SIZES[size]
        # keep the object inside the frame; with two objects, split the frame left/right
        lo, hi = r + 0.02, 1.0 - r - 0.02
        if n_objects == 2:
            half = (len(objects) == 0)
            lo_x, hi_x = (lo, max(lo, 0.5 - r * 0.5)) if half else (min(hi, 0.5 + r * 0.5), hi)
        else:
            lo_x, hi_x = lo, hi
        objects.append(
            ShapeObject(
                shape=str(rng.choice(shapes)),
                color=str(rng.choice(colors)),
                size=size,
                cx=float(rng.uniform(lo_x, hi_x)),
                cy=float(rng.uniform(lo, hi)),
            )
        )
    return Scene(tuple(objects), background)


def make_scenes(seed: int, indices: Sequence[int] | range, world: WorldConfig) -> list[Scene]:
    return [sample_scene(scene_rng(seed, i), world) for i in indices]


def _inside(obj: ShapeObject, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sub-pixel coverage test; x and y are sub-pixel centres in [0, 1] (y grows downwards)."""
    r = SIZES[obj.size]
    dx, dy = x - obj.cx, y - obj.cy
    if obj.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if obj.shape == "square":
        h = r * 0.85
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if obj.shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r * 1.1
    if obj.shape == "triangle":
        # upward triangle with apex at (cx, cy - r) and base at y = cy + r/2 (inscribed in the circle)
        top, base = obj.cy - r, obj.cy + 0.5 * r
        half_width = (y - top) / (base - top) * (r * np.sqrt(3) / 2)
        return (y >= top) & (y <= base) & (np.abs(dx) <= half_width)
    raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene, resolution: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Render one scene: (image uint8 [H, W, 3], masks float32 [n_objects, H, W] of coverage in [0, 1])."""
    n = resolution * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float64) + 0.5) / n
    x, y = np.meshgrid(coords, coords, indexing="xy")
    image = np.empty((n, n, 3), dtype=np.float64)
    image[:] = BACKGROUNDS[scene.background]
    masks = []
    for obj in scene.objects:
        inside = _inside(obj, x, y)
        image[inside] = ALL_COLORS[obj.color]
        masks.append(inside)
    # box filter down to the target resolution
    image = image.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE, 3).mean(axis=(1, 3))
    cover = np.stack(masks).astype(np.float32)
    cover = cover.reshape(len(masks), resolution, SUPERSAMPLE, resolution, SUPERSAMPLE).mean(axis=(2, 4))
    return np.rint(image).astype(np.uint8), cover


def render_set(seed: int, indices: Sequence[int] | range, world: WorldConfig) -> tuple[np.ndarray, list[Scene]]:
    """Render scenes ``indices`` of the set with ``seed``: (images uint8 [N, H, W, 3], scenes)."""
    scenes = make_scenes(seed, indices, world)
    images = np.stack([render(s, world.resolution)[0] for s in scenes]) if scenes else np.zeros(
        (0, world.resolution, world.resolution, 3), np.uint8
    )
    return images, scenes


def attribute_labels(scenes: Sequence[Scene]) -> dict[str, np.ndarray]:
    """Integer labels of the first object's attributes (indices into the ALL_* tables) and its centre."""
    shapes, colors, bgs, sizes = list(ALL_SHAPES), list(ALL_COLORS), list(BACKGROUNDS), list(SIZES)
    first = [s.objects[0] for s in scenes]
    return {
        "shape": np.array([shapes.index(o.shape) for o in first], dtype=np.int64),
        "color": np.array([colors.index(o.color) for o in first], dtype=np.int64),
        "background": np.array([bgs.index(s.background) for s in scenes], dtype=np.int64),
        "size": np.array([sizes.index(o.size) for o in first], dtype=np.int64),
        "position": np.array([(o.cx, o.cy) for o in first], dtype=np.float32),
    }
