"""Attribute-edit data sets: a source image and its ground-truth edit with one attribute of the world changed.

- ``embedded-recolor16``: rendered 16x16 one-object scenes of the pixel world (shapes16's distribution, seen values
  only) whose object is recolored to blue: the renderer draws the same scene with the new color, so every edit has its
  ground-truth target image and the exact region that changes (the object's coverage). A source whose object is
  already blue gets another color from the scene's own stream, so every edit changes the image.
- ``embedded-recolor32``: the domain edit "red shapes" -> "blue shapes" in the text-to-image world (32x32 scenes of
  embedded-t2i's world, one or two objects, seen values only): a scene without a red object gets one (an object of the
  scene, chosen by its own stream, turns red), and every red object becomes blue in the ground truth; the other
  object, the shapes, sizes and the background are kept. DiffusionCLIP's source domain and its edit.

Two splits from distinct seeds: ``edits(n)`` (evaluation, ``RECOLOR_SEED``) and ``training_edits(n)`` (what a method
that learns an edit, e.g. Asyrp's f_t, trains on: ``RECOLOR_TRAIN_SEED``); no image of one is in the other unless the
renderer draws the same scene twice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bench.embedded.shapes import (RENDERER_VERSION, Scene, WorldConfig, render, sample_scene, scene_rng)
from bench.evaluation import UInt8Images
from bench.interfaces import EditItem, Prompt, ReferenceSet

RECOLOR_SEED = 21  # evaluation edits (embedded-edits is 8, shapes16's reference 2, the t2i world 5-7)
RECOLOR_TRAIN_SEED = 22  # the training split
RECOLOR32_SEED = 24  # embedded-recolor32's evaluation edits (restoration uses 21, hyperdreambooth's subjects 23)
RECOLOR32_TRAIN_SEED = 25  # its training split (DiffusionCLIP's fine-tuning images)
TARGET_COLOR = "blue"
RECOLOR_METRICS = ("attribute-accuracy", "edit-ground-truth", "edit-background", "edit-clip", "reconstruction",
                   "latency")


def recolor_edit(index: int, seed: int = RECOLOR_SEED, target: str = TARGET_COLOR,
                 world: WorldConfig | None = None, source_color: str | None = None) -> tuple[Scene, Scene]:
    """Edit ``index`` of the set with ``seed``: (source scene, target scene with the object in ``target``).

    With ``source_color`` (a domain edit): the source has at least one object of that color (if it has none, an
    object chosen by the scene's stream takes it) and every object of that color is ``target`` in the target scene."""
    world = world or WorldConfig(resolution=16, max_objects=1, split="train")
    rng = scene_rng(seed, index)
    source = sample_scene(rng, world)
    if source_color is not None:
        if all(o.color != source_color for o in source.objects):
            source = source.with_changes(int(rng.integers(len(source.objects))), color=source_color)
        edited = source
        for k, obj in enumerate(source.objects):
            if obj.color == source_color:
                edited = edited.with_changes(k, color=target)
        return source, edited
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
    source_color: str | None = None  # None: any color but the target's (one object); else the domain's color
    max_objects = 1
    seed = RECOLOR_SEED
    train_seed = RECOLOR_TRAIN_SEED

    def world(self) -> WorldConfig:
        return WorldConfig(resolution=self.resolution, max_objects=self.max_objects, split="train")

    def edit_scenes(self, index: int, seed: int) -> tuple[Scene, Scene]:
        return recolor_edit(index, seed, self.target_color, self.world(), self.source_color)

    def identity(self) -> dict[str, Any]:
        w = self.world()
        return {"name": self.name, "renderer_version": RENDERER_VERSION, "seed": self.seed,
                "train_seed": self.train_seed, "resolution": w.resolution, "max_objects": w.max_objects,
                "split": w.split, "edit": f"object color -> {self.target_color} (a {self.target_color} source "
                                           "object gets another color from the scene's stream)",
                "mask": "the object's coverage > 0 (source or target)"}

    def _items(self, num_samples: int, seed: int) -> list[EditItem]:
        items = []
        for i in range(num_samples):
            source, target = self.edit_scenes(i, seed)
            src_img, src_cover = render(source, self.resolution)
            tgt_img, tgt_cover = render(target, self.resolution)
            changed = [k for k, (a, b) in enumerate(zip(source.objects, target.objects)) if a != b]
            old = source.objects[changed[0]].color
            mask = np.zeros(src_cover.shape[1:], dtype=bool)
            for k in changed:  # the recolored objects' coverage, in the source or the target
                mask |= (src_cover[k] > 0) | (tgt_cover[k] > 0)
            items.append(EditItem(
                key=f"{i:05d}", source=src_img, source_prompt=source.caption, target_prompt=target.caption,
                mask=mask.astype(np.float32), edit_type="color", target=tgt_img,
                blend_words=(old, self.target_color), instruction=f"change the color from {old} to {self.target_color}",
            ))
        return items

    def edits(self, num_samples: int) -> list[EditItem]:
        return self._items(num_samples, self.seed)

    def training_edits(self, num_samples: int) -> list[EditItem]:
        """The training split (``train_seed``): what an edit-learning method fits on, never evaluated."""
        return self._items(num_samples, self.train_seed)

    def prompts(self, num_samples: int):
        out = []
        for i in range(num_samples):
            _, target = self.edit_scenes(i, self.seed)
            out.append(Prompt(target.caption, {**target.attributes(), "count": len(target.objects)}, "color"))
        return out

    def dataset(self):
        images = np.stack([render(self.edit_scenes(i, self.seed)[1], self.resolution)[0] for i in range(self.reference_size)])
        return UInt8Images(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())


class EmbeddedRecolor32(EmbeddedRecolor16):
    """The domain edit red -> blue on 32x32 scenes of the text-to-image world (one or two objects); ground-truth
    targets, masks of the recolored objects, a training split (DiffusionCLIP's fine-tuning images)."""

    name = "embedded-recolor32"
    summary = "embedded domain edit: 32x32 t2i-world scenes with a red object, every red object recolored to blue; ground truths, masks, a training split"
    resolution = 32
    default_model = "embedded-t2i"
    feature_extractor = "shapes-cnn32"
    clip_backbone = "shapes-clip"
    source_color = "red"
    max_objects = 2
    seed = RECOLOR32_SEED
    train_seed = RECOLOR32_TRAIN_SEED

    def identity(self) -> dict[str, Any]:
        w = self.world()
        return {"name": self.name, "renderer_version": RENDERER_VERSION, "seed": self.seed,
                "train_seed": self.train_seed, "resolution": w.resolution, "max_objects": w.max_objects,
                "split": w.split, "edit": f"every {self.source_color} object -> {self.target_color} (a scene without a "
                                           f"{self.source_color} object gets one from the scene's stream)",
                "mask": "the recolored objects' coverage > 0 (source or target)"}
