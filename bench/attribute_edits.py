"""Attribute-edit data sets: a source image and its ground-truth edit with one attribute of the world changed.

- ``embedded-recolor16``: rendered 16x16 one-object scenes of the pixel world (shapes16's distribution, seen values
  only) whose object is recolored to blue: the renderer draws the same scene with the new color, so every edit has its
  ground-truth target image and the exact region that changes (the object's coverage). A source whose object is
  already blue gets another color from the scene's own stream, so every edit changes the image.

Two splits from distinct seeds: ``edits(n)`` (evaluation, ``RECOLOR_SEED``) and ``training_edits(n)`` (what a method
that learns an edit, e.g. Asyrp's f_t, trains on: ``RECOLOR_TRAIN_SEED``); no image of one is in the other unless the
renderer draws the same scene twice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bench.embedded.shapes import (COLORS, RENDERER_VERSION, Scene, WorldConfig, render, sample_scene, scene_rng)
from bench.evaluation import UInt8Images
from bench.interfaces import EditItem, Prompt, ReferenceSet

RECOLOR_SEED = 21  # evaluation edits (embedded-edits is 8, shapes16's reference 2, the t2i world 5-7)
RECOLOR_TRAIN_SEED = 22  # the training split
TARGET_COLOR = "blue"
RECOLOR_METRICS = ("attribute-accuracy", "edit-ground-truth", "edit-background", "edit-clip", "reconstruction",
                   "latency")


def recolor_edit(index: int, seed: int = RECOLOR_SEED, target: str = TARGET_COLOR,
                 world: WorldConfig | None = None) -> tuple[Scene, Scene]:
    """Edit ``index`` of the set with ``seed``: (source scene, target scene with the object in ``target``)."""
    world = world or WorldConfig(resolution=16, max_objects=1, split="train")
    rng = scene_rng(seed, index)
    source = sample_scene(rng, world)
    if source.objects[0].color == target:
        source = source.with_changes(0, color=str(rng.choice([c for c in world.colors() if c != target])))
    return source, source.with_changes(0, color=target)


class EmbeddedRecolor16(ReferenceSet):
    """16x16 one-object scenes of the pixel world recolored to blue; ground-truth targets, object masks, two splits."""

    name = "embedded-recolor16"
    summary = "embedded attribute edits: 16x16 one-object scenes recolored to blue; ground-truth targets, masks, a training split"
    resolution = 16
    default_model = "embedded-ddpm"
    feature_extractor = "shapes-cnn16"
    clip_backbone = "shapes-clip"  # the t2i world's 32x32 CLIP: its preprocessing upsamples 16x16 images (bicubic)
    embedded = True
    edit_targets = True  # every edit has its ground-truth target (metric edit-ground-truth)
    default_metrics = RECOLOR_METRICS
    default_num_samples = 64
    reference_size = 1000  # ground-truth targets as a FID reference, if anyone asks for FID
    target_color = TARGET_COLOR

    def world(self) -> WorldConfig:
        return WorldConfig(resolution=self.resolution, max_objects=1, split="train")

    def identity(self) -> dict[str, Any]:
        w = self.world()
        return {"name": self.name, "renderer_version": RENDERER_VERSION, "seed": RECOLOR_SEED,
                "train_seed": RECOLOR_TRAIN_SEED, "resolution": w.resolution, "max_objects": w.max_objects,
                "split": w.split, "edit": f"object color -> {self.target_color} (a {self.target_color} source "
                                           "object gets another color from the scene's stream)",
                "mask": "the object's coverage > 0 (source or target)"}

    def _items(self, num_samples: int, seed: int) -> list[EditItem]:
        items = []
        for i in range(num_samples):
            source, target = recolor_edit(i, seed, self.target_color, self.world())
            src_img, src_cover = render(source, self.resolution)
            tgt_img, tgt_cover = render(target, self.resolution)
            old = source.objects[0].color
            items.append(EditItem(
                key=f"{i:05d}", source=src_img, source_prompt=source.caption, target_prompt=target.caption,
                mask=((src_cover[0] > 0) | (tgt_cover[0] > 0)).astype(np.float32), edit_type="color", target=tgt_img,
                blend_words=(old, self.target_color), instruction=f"change the color from {old} to {self.target_color}",
            ))
        return items

    def edits(self, num_samples: int) -> list[EditItem]:
        return self._items(num_samples, RECOLOR_SEED)

    def training_edits(self, num_samples: int) -> list[EditItem]:
        """The training split (seed ``RECOLOR_TRAIN_SEED``): what an edit-learning method fits on, never evaluated."""
        return self._items(num_samples, RECOLOR_TRAIN_SEED)

    def prompts(self, num_samples: int):
        out = []
        for i in range(num_samples):
            _, target = recolor_edit(i, RECOLOR_SEED, self.target_color, self.world())
            out.append(Prompt(target.caption, {**target.attributes(), "count": 1}, "color"))
        return out

    def dataset(self):
        images = np.stack([render(recolor_edit(i, RECOLOR_SEED, self.target_color, self.world())[1],
                                  self.resolution)[0] for i in range(self.reference_size)])
        return UInt8Images(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
