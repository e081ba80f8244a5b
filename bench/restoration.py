"""Image restoration: the degradation operators (A and its pseudo-inverse A+) and the embedded restoration set.

The operators are those of DDNM's official code (wyhuai/DDNM, guided_diffusion/diffusion.py, the simplified
``simplified_ddnm_plus`` path), on [N, 3, H, W] tensors of any float dtype, in any affine pixel range (A and A+
here commute with x -> 2x - 1 in the sense that A+A does: the projection is the same in [0, 1] and [-1, 1] units):

- ``inpainting``: A x = x (1 - mask) (the item's mask is 1 where a pixel is missing, PIE-Bench's "edited"
  convention; DDNM's ``mask`` is the opposite, 1 = kept), A+ = A;
- ``sr4``: 4x super-resolution, A = 4x4 average pooling (DDNM's ``sr_averagepooling``, ``AdaptiveAvgPool2d``),
  A+ = nearest upsampling (DDNM's ``MeanUpsample``: each low-resolution pixel copied into its 4x4 block);
- ``colorization``: A x = the mean of the three channels (DDNM's ``color2gray``, ``coef = 1/3``; the SVD version in
  functions/svd_operators.py rounds the weights to 0.3333 / 0.3334 / 0.3333), A+ y = y w / |w|^2 (``gray2color``:
  the gray value copied into each channel).

For each: A A+ A = A, and A+A is idempotent (a projection onto the range of A+): tests/test_ddnm.py checks both in
float64. ``observe`` renders the degraded observation as an image, A+ y in uint8 (inpainting: the missing region
black, as the official code's ``Apy`` images), so that y = A(source) is recovered exactly from the stored bytes.

``embedded-restoration``: 16x16 scenes of the pixel DDPM's world (one object, seen values) rendered from their own
seed (``RESTORATION_SEED``), the three tasks taking turns (item i has task ``TASKS[i mod 3]``);
``embedded-restoration-inpainting`` / ``-sr4`` / ``-colorization``: one task alone, on the same scenes. Items are
``EditItem``: source = the observation, target = the ground truth, mask = the inpainting mask (zeros for the other
tasks), edit_type = the task, prompts = the scene's caption (unused by the restorers). The FID reference is the
ground truths of scenes 0..999.

This module is at the bottom of the layers: it imports neither methods nor metrics.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bench.embedded.shapes import RENDERER_VERSION, WorldConfig, render, sample_scene, scene_rng
from bench.errors import BenchError
from bench.evaluation import UInt8Images
from bench.interfaces import EditItem, Prompt, ReferenceSet

# the pixel DDPM trains on seed 1, shapes16's reference is seed 2, the feature network trains on 3, the evaluation
# CLIP on 5, the t2i model on 6, prompts 7, edits and concepts 8, class images 9, feedback 11-14, held-out 97/98
RESTORATION_SEED = 21
TASKS = ("inpainting", "sr4", "colorization")
SR_SCALE = 4
GRAY_WEIGHTS = (1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0)  # DDNM's color2gray (coef = 1/3)
BOX_SIDES = (6, 10)  # inpainting: a random box, each side 6 to 10 pixels of 16 (inclusive), anywhere in the image
RESTORATION_METRICS = ("restoration", "fid", "latency")
UNBOUNDED = 1e6  # stands for infinity in stored_interval (finite: inpainting's A multiplies it by 0)
DEFAULT_ITEMS = 256  # FID needs at least 128 samples (twice shapes-cnn16's 64 feature dimensions)
REFERENCE_SIZE = 1000


# -- the operators --------------------------------------------------------------------------------------------------
def check_task(task: str) -> None:
    if task not in TASKS:
        raise BenchError(f"restoration task {task!r} has no degradation operator here (tasks: {', '.join(TASKS)})")


def _keep(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if mask is None:
        raise BenchError("inpainting needs a mask")
    m = torch.as_tensor(mask).to(x.device, x.dtype)
    if m.dim() == 2:
        m = m[None]
    if m.dim() == 3:
        m = m[:, None]
    if tuple(m.shape[-2:]) != tuple(x.shape[-2:]):
        raise BenchError(f"inpainting mask is {m.shape[-2]}x{m.shape[-1]}, the images are {x.shape[-2]}x{x.shape[-1]}")
    return 1.0 - m


def degrade(task: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """y = A x for images ``x`` [N, 3, H, W] (inpainting: [N, 3, H, W]; sr4: [N, 3, H/4, W/4]; colorization:
    [N, 1, H, W]); ``mask`` [N, H, W] or [N, 1, H, W], 1 = missing (inpainting only)."""
    check_task(task)
    if task == "inpainting":
        return x * _keep(mask, x)
    if task == "sr4":
        if x.shape[-1] % SR_SCALE or x.shape[-2] % SR_SCALE:
            raise BenchError(f"sr4 needs image sides divisible by {SR_SCALE}, got {x.shape[-2]}x{x.shape[-1]}")
        return F.avg_pool2d(x, SR_SCALE)
    w = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def pinv(task: str, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A+ y: back to the image's shape [N, 3, H, W]."""
    check_task(task)
    if task == "inpainting":
        return y * _keep(mask, y)
    if task == "sr4":
        return y.repeat_interleave(SR_SCALE, dim=-2).repeat_interleave(SR_SCALE, dim=-1)
    w = torch.tensor(GRAY_WEIGHTS, dtype=y.dtype, device=y.device).view(1, 3, 1, 1)
    return y * w / w.pow(2).sum()


def project(task: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A+A x: the range-space part of ``x`` (``x - project(x)`` is its null-space part)."""
    return pinv(task, degrade(task, x, mask), mask)


def observe(task: str, target: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The observation of ground truth ``target`` (uint8 [H, W, 3]) as an image: A+ A target in uint8 ([0, 1] units,
    rounded), the missing region of an inpainting black. A of the result equals A of the target up to rounding, and
    A A+ A = A makes y = A(observation) exact from the stored bytes."""
    x = torch.from_numpy(np.asarray(target, dtype=np.float64) / 255.0).permute(2, 0, 1)[None]
    m = None if mask is None else torch.from_numpy(np.asarray(mask, dtype=np.float64))[None]
    out = project(task, x, m)[0].permute(1, 2, 0).numpy()
    return np.rint(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)


def stack_masks(items: Sequence[EditItem], shape: tuple[int, int]) -> torch.Tensor:
    """The items' masks as float64 [N, 1, H, W], refusing a mask that is not ``shape``."""
    masks = []
    for it in items:
        m = np.asarray(it.mask, dtype=np.float64)
        if m.shape != tuple(shape):
            raise BenchError(f"restoration item {it.key}: its mask is {'x'.join(map(str, m.shape))}, the images are "
                             f"{shape[0]}x{shape[1]}")
        masks.append(m)
    return torch.from_numpy(np.stack(masks))[:, None]


class Operators:
    """Per-sample operators of a batch of items (each item has its own task and mask): ``degrade``, ``pinv`` of the
    batch, sample i through item i's operator alone (the batch is split by task, never mixed)."""

    def __init__(self, items: Sequence[EditItem], shape: tuple[int, int]):
        for it in items:
            check_task(it.edit_type)
        self.tasks = [it.edit_type for it in items]
        self.masks = stack_masks(items, shape)

    def _groups(self):
        for task in TASKS:
            idx = [i for i, t in enumerate(self.tasks) if t == task]
            if idx:
                yield task, torch.tensor(idx)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """A+A x, sample by sample (same shape as ``x``)."""
        out = torch.empty_like(x)
        for task, idx in self._groups():
            i = idx.to(x.device)
            out[i] = project(task, x[i], self.masks[idx].to(x.device, x.dtype))
        return out

    def consistency(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Per sample max |A x - y| with y = A(source)."""
        err = torch.empty(len(x), dtype=x.dtype, device=x.device)
        for task, idx in self._groups():
            i = idx.to(x.device)
            m = self.masks[idx].to(x.device, x.dtype)
            err[i] = (degrade(task, x[i], m) - degrade(task, source[i], m)).abs().flatten(1).amax(1)
        return err

    def interval_distance(self, lo: torch.Tensor, hi: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Per sample max over y's entries of the distance from y = A(source) to [A lo, A hi]: the values A x takes
        for the images x with lo <= x <= hi (A's weights are non-negative, so A is monotone)."""
        err = torch.empty(len(lo), dtype=lo.dtype, device=lo.device)
        for task, idx in self._groups():
            i = idx.to(lo.device)
            m = self.masks[idx].to(lo.device, lo.dtype)
            y = degrade(task, source[i], m)
            gap = torch.maximum(degrade(task, lo[i], m) - y, y - degrade(task, hi[i], m)).clamp_min(0.0)
            err[i] = gap.flatten(1).amax(1)
        return err


def stored_interval(images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([0, 1] units, float64) the values a float image in [0, 1] may have had before it was stored as these bytes:
    within half a step of its byte, and, for a byte 0 or 255, anything beyond (it was clipped there)."""
    v = images_uint8.double()
    lo = torch.where(v == 0, torch.full_like(v, -UNBOUNDED), (v - 0.5) / 255.0)
    hi = torch.where(v == 255, torch.full_like(v, UNBOUNDED), (v + 0.5) / 255.0)
    return lo, hi


# -- the embedded restoration set -------------------------------------------------------------------------------------
def box_mask(seed: int, index: int, resolution: int) -> np.ndarray:
    """Item ``index``'s inpainting mask: a random box (sides ``BOX_SIDES``) of ones, from its own stream."""
    rng = np.random.default_rng([int(seed), int(index), 1])  # the scene uses the stream [seed, index]
    h, w = (int(rng.integers(BOX_SIDES[0], BOX_SIDES[1] + 1)) for _ in range(2))
    top, left = int(rng.integers(0, resolution - h + 1)), int(rng.integers(0, resolution - w + 1))
    mask = np.zeros((resolution, resolution), np.float32)
    mask[top : top + h, left : left + w] = 1.0
    return mask


class EmbeddedRestoration(ReferenceSet):
    """16x16 scenes of the pixel DDPM's world, degraded by inpainting, 4x super-resolution or colorization."""

    name = "embedded-restoration"
    summary = "embedded restoration set: 16x16 scenes degraded by inpainting, 4x SR or colorization (tasks take turns); ground truths"
    resolution = 16
    default_model = "embedded-ddpm"
    feature_extractor = "shapes-cnn16"
    embedded = True
    default_metrics = RESTORATION_METRICS
    default_num_samples = DEFAULT_ITEMS
    reference_size = REFERENCE_SIZE
    restoration_tasks: tuple[str, ...] = TASKS  # item i has task restoration_tasks[i mod len]

    def world(self) -> WorldConfig:
        return WorldConfig(resolution=self.resolution, max_objects=1, split="train")

    def task(self, index: int) -> str:
        return self.restoration_tasks[index % len(self.restoration_tasks)]

    def identity(self) -> dict[str, Any]:
        w = self.world()
        return {"name": self.name, "renderer_version": RENDERER_VERSION, "seed": RESTORATION_SEED,
                "resolution": w.resolution, "max_objects": w.max_objects, "split": w.split,
                "tasks": list(self.restoration_tasks), "assignment": "item i has task tasks[i mod len]",
                "operators": {"inpainting": f"x (1 - mask), mask a random box of sides {BOX_SIDES} (stream [seed, i, 1])",
                              "sr4": f"{SR_SCALE}x{SR_SCALE} average pooling, nearest upsampling",
                              "colorization": f"channel weights {GRAY_WEIGHTS}, copied back"},
                "observation": "A+ A ground truth, uint8 [0, 1] units rounded, holes black", "reference": self.reference_size}

    def _scene(self, index: int):
        return sample_scene(scene_rng(RESTORATION_SEED, index), self.world())

    def edits(self, num_samples: int) -> list[EditItem]:
        items = []
        for i in range(num_samples):
            scene, task = self._scene(i), self.task(i)
            target, _ = render(scene, self.resolution)
            mask = box_mask(RESTORATION_SEED, i, self.resolution) if task == "inpainting" else \
                np.zeros((self.resolution, self.resolution), np.float32)
            items.append(EditItem(key=f"{i:05d}", source=observe(task, target, mask), source_prompt=scene.caption,
                                  target_prompt=scene.caption, mask=mask, edit_type=task, target=target,
                                  instruction=f"restore the image ({task})"))
        return items

    def prompts(self, num_samples: int):
        out = []
        for i in range(num_samples):
            scene = self._scene(i)
            out.append(Prompt(scene.caption, {**scene.attributes(), "count": len(scene.objects)}, self.task(i)))
        return out

    def dataset(self):
        images = np.stack([render(self._scene(i), self.resolution)[0] for i in range(self.reference_size)])
        return UInt8Images(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())


class RestorationInpainting(EmbeddedRestoration):
    name = "embedded-restoration-inpainting"
    summary = "embedded-restoration, inpainting alone (a random box missing)"
    restoration_tasks = ("inpainting",)


class RestorationSR4(EmbeddedRestoration):
    name = "embedded-restoration-sr4"
    summary = "embedded-restoration, 4x super-resolution alone (4x4 average pooling)"
    restoration_tasks = ("sr4",)


class RestorationColorization(EmbeddedRestoration):
    name = "embedded-restoration-colorization"
    summary = "embedded-restoration, colorization alone (channel mean)"
    restoration_tasks = ("colorization",)
