"""Exemplar-guided inpainting data (Paint-by-Example, Yang et al. 2023) in the shapes world.

- ``embedded-exemplars``: held-out one-object 32x32 scenes of the text-to-image world (seen attribute values). Item
  i: the scene (source), the bounding box of its object (mask: 1 where the object is replaced), an exemplar (an
  object with another shape and another color, rendered on its own: centred, large, on a background of its own, the
  way the paper's exemplar is an object crop) and the ground truth (the same scene with the object replaced by the
  exemplar's: same place and size, the exemplar's shape and color). ``target_prompt`` names the class noun only
  ("a large circle on a gray background": the shape, never the color), the prompt of the text-guided inpainting
  baseline; the prompts' attributes are the ground truth's, so ``attribute-accuracy`` scores the exemplar's color
  and shape in the filled region.
- ``training_pairs(n)``: Paint-by-Example's self-supervised pairs (Sec. 3.2) from another seed: a scene, the
  bounding box of its object, the object itself rendered apart (centred on a random background, its position
  jittered: the paper's exemplar augmentation, so that copying the exemplar's pixels does not pay) and the scene as
  the target. ``bench embedded train paint-by-example`` trains on them; no evaluation item is among them unless the
  renderer draws the same scene twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bench.embedded.shapes import (BACKGROUNDS, RENDERER_VERSION, Scene, ShapeObject, WorldConfig, render,
                                   sample_scene, scene_rng)
from bench.evaluation import UInt8Images
from bench.interfaces import EditItem, Prompt, ReferenceSet

EXEMPLAR_SEED = 31  # evaluation items (embedded-edits is 8, embedded-recolor16 21/22, instantbooth 11-12, t2i 5-7)
EXEMPLAR_TRAIN_SEED = 32  # Paint-by-Example's self-supervised training pairs
RESOLUTION = 32
EXEMPLAR_SIZE = "large"  # the exemplar is the object's crop: centred and large
EXEMPLAR_JITTER = 0.08  # training: the exemplar's centre moves by up to this fraction of the side (augmentation)
EXEMPLAR_METRICS = ("attribute-accuracy", "edit-background", "edit-ground-truth", "edit-clip", "latency")


def world() -> WorldConfig:
    return WorldConfig(resolution=RESOLUTION, max_objects=1, split="train")


def bbox_mask(cover: np.ndarray) -> np.ndarray:
    """float32 [H, W]: 1 inside the bounding box of the pixels with coverage > 0 (the paper's bounding-box mask)."""
    ys, xs = np.nonzero(cover > 0)
    mask = np.zeros(cover.shape, dtype=np.float32)
    if len(ys):
        mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = 1.0
    return mask


def exemplar_image(shape: str, color: str, background: str, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """The object rendered apart: centred (moved by dx, dy), large, on ``background``."""
    return render(Scene((ShapeObject(shape, color, EXEMPLAR_SIZE, 0.5 + dx, 0.5 + dy),), background), RESOLUTION)[0]


@dataclass(frozen=True)
class ExemplarEdit:
    source: Scene
    target: Scene
    exemplar: tuple[str, str, str]  # (shape, color, background) of the exemplar image


def exemplar_edit(index: int, seed: int = EXEMPLAR_SEED) -> ExemplarEdit:
    """Item ``index``: a one-object scene and an exemplar with another shape and another color (its own stream)."""
    w = world()
    rng = scene_rng(seed, index)
    source = sample_scene(rng, w)
    obj = source.objects[0]
    shape = str(rng.choice([s for s in w.shapes() if s != obj.shape]))
    color = str(rng.choice([c for c in w.colors() if c != obj.color]))
    background = str(rng.choice(tuple(BACKGROUNDS)))
    return ExemplarEdit(source, source.with_changes(0, shape=shape, color=color), (shape, color, background))


def class_prompt(scene: Scene) -> str:
    """The ground truth's caption without its color: the class noun that text-guided inpainting gets."""
    o = scene.objects[0]
    return f"a {o.size} {o.shape} on a {scene.background} background"


class EmbeddedExemplars(ReferenceSet):
    """One-object 32x32 scenes, an exemplar object to paint into each object's bounding box, and the ground truth."""

    name = "embedded-exemplars"
    summary = "embedded exemplar inpainting: 32x32 one-object scenes, bbox masks, exemplar objects, ground-truth targets"
    resolution = RESOLUTION
    default_model = "embedded-paint-by-example"
    feature_extractor = "shapes-cnn32"
    clip_backbone = "shapes-clip"
    embedded = True
    edit_targets = True  # every item has its ground-truth target (metric edit-ground-truth)
    default_metrics = EXEMPLAR_METRICS
    default_num_samples = 64
    reference_size = 1000  # ground-truth targets as a FID reference, if anyone asks for FID

    def identity(self) -> dict[str, Any]:
        w = world()
        return {"name": self.name, "renderer_version": RENDERER_VERSION, "seed": EXEMPLAR_SEED,
                "resolution": w.resolution, "max_objects": w.max_objects, "split": w.split,
                "exemplar": f"another shape and another color, {EXEMPLAR_SIZE}, centred, on its own background",
                "mask": "bounding box of the object's coverage > 0 in the source or the target",
                "target_prompt": "the ground truth's caption without its color (the class noun)"}

    def _items(self, num_samples: int, seed: int) -> list[EditItem]:
        items = []
        for i in range(num_samples):
            e = exemplar_edit(i, seed)
            src_img, src_cover = render(e.source, self.resolution)
            tgt_img, tgt_cover = render(e.target, self.resolution)
            old, new = e.source.objects[0], e.target.objects[0]
            items.append(EditItem(
                key=f"{i:05d}", source=src_img, source_prompt=e.source.caption, target_prompt=class_prompt(e.target),
                mask=bbox_mask(np.maximum(src_cover[0], tgt_cover[0])), edit_type="exemplar", target=tgt_img,
                blend_words=(old.shape, new.shape),
                instruction=f"replace the {old.color} {old.shape} with the {new.color} {new.shape} of the exemplar",
                exemplar=exemplar_image(*e.exemplar),
            ))
        return items

    def edits(self, num_samples: int) -> list[EditItem]:
        return self._items(num_samples, EXEMPLAR_SEED)

    def prompts(self, num_samples: int):
        out = []
        for i in range(num_samples):
            target = exemplar_edit(i, EXEMPLAR_SEED).target
            out.append(Prompt(class_prompt(target), {**target.attributes(), "count": 1}, "exemplar"))
        return out

    def dataset(self):
        images = np.stack([render(exemplar_edit(i, EXEMPLAR_SEED).target, self.resolution)[0]
                           for i in range(self.reference_size)])
        return UInt8Images(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())


def training_pairs(num: int, seed: int = EXEMPLAR_TRAIN_SEED) -> dict[str, np.ndarray]:
    """Paint-by-Example's self-supervised pairs: ``scene`` uint8 [N, 32, 32, 3] (the target), ``mask`` float32
    [N, 32, 32] (the object's bounding box), ``exemplar`` uint8 [N, 32, 32, 3] (the same object apart: centred,
    large, a random background, the centre jittered) and ``attributes`` (shape, color) per pair."""
    w = world()
    scenes, masks, exemplars, attributes = [], [], [], []
    for i in range(num):
        rng = scene_rng(seed, i)
        scene = sample_scene(rng, w)
        obj = scene.objects[0]
        image, cover = render(scene, RESOLUTION)
        dx, dy = rng.uniform(-EXEMPLAR_JITTER, EXEMPLAR_JITTER, size=2)
        scenes.append(image)
        masks.append(bbox_mask(cover[0]))
        exemplars.append(exemplar_image(obj.shape, obj.color, str(rng.choice(tuple(BACKGROUNDS))), float(dx), float(dy)))
        attributes.append((obj.shape, obj.color))
    return {"scene": np.stack(scenes), "mask": np.stack(masks), "exemplar": np.stack(exemplars),
            "attributes": np.array(attributes)}
