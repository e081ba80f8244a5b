"""SDXL's micro-conditioning, measured on the shapes world (Podell et al. 2023, "SDXL", sec. 2.2).

Two pixel statistics, each beside the same statistic on the renderer's ground truth for the same prompts (the
prompts' scenes re-rendered at the samples' resolution: cheap, and exact for shapes32, whose targets carry every
object's shape, color, size and position):

- ``cutoff`` (Fig. 5, crop conditioning): the fraction of images with an object cut off by the image border. A
  pixel is foreground when its RGB distance (0-255) from the prompted background exceeds half the smallest
  distance between that background and the prompted object colors (a pixel at least half covered by the least
  contrasting object); an image is cut off when at least ``BORDER_PIXELS`` foreground pixels lie on its outermost
  rows and columns. The renderer keeps every object 0.02 of the side inside the frame, so a border pixel of a
  render is at most 36% covered at 32 px (less for circles and triangle apexes; squares stay farther in): below
  the half-coverage cut except where a second, much more contrasting object color lowers it (renders of
  shapes32's prompts have no foreground border pixel at all: tests/test_microconditioning.py). Two pixels, not
  one, so that a lone stray pixel of a generated image (noise, a decoder artifact) does not count; an object
  across the border puts a run of pixels there.
- ``sharpness`` (Fig. 4, size conditioning): per image, the mean absolute 4-neighbour Laplacian of every channel
  in [0, 1] over the interior pixels (no padding: the border adds no edge); averaged over images. A Laplacian, not
  the mean gradient magnitude: blurring a step edge spreads it without changing its total variation, so the mean
  first difference barely falls under blur, while the second difference falls with the edge's width. Noise
  raises it too: a ``sharpness_ratio`` (against the renderer's) above 1 means noise or artifacts, not detail, so
  the ratio is reported, not ranked.

Checked on renders of shapes32's prompts (tests/test_microconditioning.py): the renderer's ground truth is never
cut off, renders with an object moved onto the border always are, and a render area-down-sampled to 8 px and
bilinearly up-sampled back (the SDXL recipe's "small original") is less sharp than the render.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from bench.embedded.shapes import ALL_COLORS, ALL_SHAPES, BACKGROUNDS, RENDERER_VERSION, SIZES, Scene, ShapeObject, render
from bench.errors import BenchError
from bench.interfaces import Metric
from bench.outputs import Output

KEY_CUTOFF = "cutoff_rate"
KEY_CUTOFF_REFERENCE = "cutoff_rate_reference"
KEY_SHARPNESS = "sharpness"
KEY_SHARPNESS_REFERENCE = "sharpness_reference"
KEY_SHARPNESS_RATIO = "sharpness_ratio"
BORDER_PIXELS = 2  # k: foreground pixels on the border that make an image cut off
FOREGROUND_FRACTION = 0.5  # of the smallest background-to-object color distance
CHUNK = 200  # samples read at a time (per-image values: any chunk gives the same)
REFERENCE = (f"the prompts' scenes re-rendered by the shapes renderer (version {RENDERER_VERSION}) at the samples' "
             f"resolution")


# -- the prompts' colors and scenes -----------------------------------------------------------------------------


def prompt_colors(target: Mapping[str, Any] | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(background RGB [3], object RGBs [n, 3]) float64 of a target (a prompt's attributes), None if it does not
    name a known background and at least one known object color."""
    if not target or target.get("background") not in BACKGROUNDS:
        return None
    colors = [o.get("color") for o in target.get("objects", ()) if isinstance(o, Mapping)]
    if not colors or any(c not in ALL_COLORS for c in colors):
        return None
    return (np.array(BACKGROUNDS[target["background"]], np.float64),
            np.array([ALL_COLORS[c] for c in colors], np.float64))


def prompt_scene(target: Mapping[str, Any] | None) -> Scene | None:
    """The target's scene when it names every object's shape, color, size and position (shapes32's prompts), else
    None."""
    if prompt_colors(target) is None:
        return None
    objects = []
    for o in target["objects"]:
        try:
            obj = ShapeObject(str(o["shape"]), str(o["color"]), str(o["size"]), float(o["cx"]), float(o["cy"]))
        except (KeyError, TypeError, ValueError):
            return None
        if obj.shape not in ALL_SHAPES or obj.size not in SIZES:
            return None
        objects.append(obj)
    return Scene(tuple(objects), str(target["background"]))


def reference_renders(targets: Sequence[Mapping[str, Any] | None], shape: tuple[int, int]) -> np.ndarray | None:
    """uint8 [N, 3, H, W]: the renderer's image of every target's scene at the samples' size (square), or None when
    a target has no full scene or the samples are not square."""
    if shape[0] != shape[1]:
        return None
    scenes = [prompt_scene(t) for t in targets]
    if not scenes or any(s is None for s in scenes):
        return None
    return np.stack([render(s, shape[0])[0] for s in scenes]).transpose(0, 3, 1, 2)


def _targets(ctx) -> list[Any]:
    if ctx.targets is None or len(ctx.targets) != ctx.num_samples:
        raise BenchError(f"this run has no per-sample targets (the prompts' attributes) for its {ctx.num_samples} "
                         f"samples")
    return list(ctx.targets)


# -- cut-off objects ---------------------------------------------------------------------------------------------


def border_foreground(images_uint8: np.ndarray, targets: Sequence[Mapping[str, Any] | None]) -> np.ndarray:
    """Per image, the number of foreground pixels on its outermost rows and columns (float: NaN where the target
    names no background or object colors). images uint8 [N, 3, H, W]."""
    x = np.asarray(images_uint8, np.float64)
    counts = np.full(len(x), np.nan)
    border = np.zeros(x.shape[-2:], bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    for i, target in enumerate(targets):
        colors = prompt_colors(target)
        if colors is None:
            continue
        background, objects = colors
        cut = FOREGROUND_FRACTION * np.linalg.norm(objects - background, axis=1).min()
        distance = np.linalg.norm(x[i] - background[:, None, None], axis=0)  # [H, W]
        counts[i] = float(np.count_nonzero((distance > cut) & border))
    return counts


def cutoff_rate(counts: np.ndarray) -> float:
    """The fraction of images (with a known background) having at least BORDER_PIXELS foreground border pixels."""
    known = counts[~np.isnan(counts)]
    if not len(known):
        raise BenchError("cutoff: no sample's target names its background and object colors (shapes world prompts)")
    return float(np.mean(known >= BORDER_PIXELS))


class Cutoff(Metric):
    name = "cutoff"
    summary = "fraction of images with an object cut off by the border (SDXL crop conditioning; shapes world prompts)"
    outputs = (
        Output(KEY_CUTOFF, "cut-off rate (objects on the border)", "lower", ".3f", "cutoff"),
        Output(KEY_CUTOFF_REFERENCE, "renderer's cut-off rate, same prompts", "none", ".3f", "cutoff", None),
    )
    needs_targets = True

    def protocol(self, spec, reference) -> dict[str, Any]:
        return {"foreground": f"RGB distance (0-255) from the prompted background > {FOREGROUND_FRACTION:g} x the "
                              f"smallest distance between the background and the prompted object colors",
                "border": "outermost rows and columns", "min_border_pixels": BORDER_PIXELS,
                "colors": "bench.embedded.shapes BACKGROUNDS and ALL_COLORS", "reference": REFERENCE}

    def compute(self, ctx) -> dict[str, float]:
        targets = _targets(ctx)
        counts = ctx.map_samples(lambda a, chunk: border_foreground(chunk.numpy(), targets[a : a + len(chunk)]),
                                 CHUNK)
        values = {KEY_CUTOFF: cutoff_rate(counts)}
        first = ctx.take_samples([0]) if ctx.num_samples else None
        ref = reference_renders(targets, tuple(first.shape[-2:])) if first is not None else None
        if ref is not None:
            values[KEY_CUTOFF_REFERENCE] = cutoff_rate(border_foreground(ref, targets))
        return values


# -- sharpness ---------------------------------------------------------------------------------------------------


def laplacian_sharpness(images_uint8: np.ndarray) -> np.ndarray:
    """float64 [N]: each image's mean |4-neighbour Laplacian| over channels and interior pixels, in [0, 1] units.
    images uint8 [N, 3, H, W], H and W at least 3."""
    x = np.asarray(images_uint8, np.float64) / 255.0
    lap = (x[..., :-2, 1:-1] + x[..., 2:, 1:-1] + x[..., 1:-1, :-2] + x[..., 1:-1, 2:]
           - 4.0 * x[..., 1:-1, 1:-1])
    return np.abs(lap).reshape(len(x), -1).mean(axis=1)


class Sharpness(Metric):
    name = "sharpness"
    summary = "mean absolute Laplacian of the images (SDXL size conditioning), against the renderer's for the prompts"
    outputs = (
        Output(KEY_SHARPNESS, "sharpness (mean |Laplacian|, [0,1] pixels)", "higher", ".4f", "sharpness"),
        Output(KEY_SHARPNESS_REFERENCE, "renderer's sharpness, same prompts", "none", ".4f", "sharpness", None),
        # above 1 is noise or artifacts, not detail: reported, not ranked
        Output(KEY_SHARPNESS_RATIO, "sharpness / renderer's, same prompts", "none", ".3f", "sharpness"),
    )

    def protocol(self, spec, reference) -> dict[str, Any]:
        return {"statistic": "per image, mean |4-neighbour Laplacian| of each channel in [0, 1] over interior "
                             "pixels; mean over images",
                "reference": REFERENCE + " (when the prompts carry whole scenes)"}

    def compute(self, ctx) -> dict[str, float]:
        if ctx.num_samples == 0:
            raise BenchError("sharpness: no samples")
        first = ctx.take_samples([0])
        if min(first.shape[-2:]) < 3:
            raise BenchError(f"sharpness: images of {tuple(first.shape[-2:])} pixels have no interior")
        value = float(ctx.map_samples(lambda _, chunk: laplacian_sharpness(chunk.numpy()), CHUNK).mean())
        values = {KEY_SHARPNESS: value}
        targets = ctx.targets if ctx.targets is not None and len(ctx.targets) == ctx.num_samples else None
        ref = reference_renders(targets, tuple(first.shape[-2:])) if targets is not None else None
        if ref is not None:
            values[KEY_SHARPNESS_REFERENCE] = float(laplacian_sharpness(ref).mean())
            values[KEY_SHARPNESS_RATIO] = value / values[KEY_SHARPNESS_REFERENCE]
        return values
