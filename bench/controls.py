"""``embedded-controls``: spatial conditions with ground truth, for ControlNet (Zhang et al. 2023).

Held-out scenes of the text-to-image world (seed ``CONTROL_SEED``, which no model trains on and no other set uses),
each as an ``EditItem``: ``control`` is the scene's object mask as ControlNet's segmentation-style input (the union
of the objects' coverage, white on black, three channels, 32x32: the layout of lllyasviel/sd-controlnet-seg's
condition images, with one class), ``source_prompt`` = ``target_prompt`` = the scene's caption, ``source`` =
``target`` = the render (the ground truth the condition and the caption describe together), ``mask`` = the object
mask (coverage >= 0.5). A generated image that follows the condition puts its objects where the mask is; the
metric control-iou (metrics/control.py) measures it.

``control_image`` is also what the recipe (bench/recipes/controlnet.py) trains on, from the training scenes' own
coverage, so that training and evaluation conditions are made the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bench.embedded.shapes import RENDERER_VERSION, WorldConfig, make_scenes, render
from bench.evaluation import UInt8Images
from bench.interfaces import EditItem, Prompt, ReferenceSet

# the t2i model trains on 6, its prompts are 7, embedded-edits 8, restoration and recolor 21-23, eval CLIP 5 and 98,
# the VAE's held-out 97, feedback 11-14, feature networks 1-3: 31 is no one's
CONTROL_SEED = 31
CONTROL_KIND = "object mask"  # the condition: union of the objects' coverage, white on black
MASK_THRESHOLD = 0.5  # a pixel is the condition's (and the item's mask's) when the objects cover half of it or more
OBJECT_COUNTS = {1: "one-object", 2: "two-objects"}  # the items' edit_type: metrics are also given per count
DEFAULT_CONTROLS = 256  # FID needs twice shapes-cnn32's 64 dimensions; 256 gives it room
CONTROL_METRICS = ("control-iou", "fid", "clip-score", "attribute-accuracy", "latency")


def control_image(cover: np.ndarray) -> np.ndarray:
    """The condition image of a render's coverage masks ``[n_objects, H, W]``: their union (coverage summed, clipped
    to 1, anti-aliased edges kept) as uint8 white on black, ``[H, W, 3]``."""
    union = np.clip(np.asarray(cover, dtype=np.float32).sum(0), 0.0, 1.0)
    return np.repeat(np.rint(union * 255.0).astype(np.uint8)[..., None], 3, axis=2)


def control_mask(control: np.ndarray) -> np.ndarray:
    """The binary mask a condition image stands for: its mean over channels >= ``MASK_THRESHOLD`` of white."""
    arr = np.asarray(control, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr.mean(axis=2)
    return (arr / 255.0 >= MASK_THRESHOLD).astype(np.float32)


class EmbeddedControls(ReferenceSet):
    """Held-out 32x32 scenes with their object-mask conditions (ControlNet), captions and renders as ground truth."""

    name = "embedded-controls"
    summary = ("embedded spatial conditions: held-out 32x32 scenes, each with its object mask as a ControlNet "
               "condition (white on black), its caption and its render as ground truth")
    resolution = 32
    default_model = "embedded-t2i"
    feature_extractor = "shapes-cnn32"
    clip_backbone = "shapes-clip"
    embedded = True
    edit_targets = True  # every item's render is its ground truth (metric edit-ground-truth)
    has_controls = True  # every item carries a control image (metric control-iou)
    default_metrics = CONTROL_METRICS
    default_num_samples = DEFAULT_CONTROLS
    reference_size = 1000  # renders of the same held-out scenes as the FID reference

    def world(self) -> WorldConfig:
        return WorldConfig(resolution=self.resolution, max_objects=2, split="train")

    def identity(self) -> dict[str, Any]:
        w = self.world()
        return {"name": self.name, "renderer_version": RENDERER_VERSION, "seed": CONTROL_SEED,
                "resolution": w.resolution, "max_objects": w.max_objects, "split": w.split, "control": CONTROL_KIND,
                "control_image": "union of the objects' coverage clipped to 1, x255 rounded, 3 channels",
                "mask": f"union coverage >= {MASK_THRESHOLD}", "target": "the render"}

    def edits(self, num_samples: int) -> list[EditItem]:
        items = []
        for i, scene in enumerate(make_scenes(CONTROL_SEED, range(num_samples), self.world())):
            image, cover = render(scene, self.resolution)
            control = control_image(cover)
            items.append(EditItem(
                key=f"{i:05d}", source=image, source_prompt=scene.caption, target_prompt=scene.caption,
                mask=control_mask(control), edit_type=OBJECT_COUNTS[len(scene.objects)],
                target=image, control=control,
            ))
        return items

    def prompts(self, num_samples: int) -> list[Prompt]:
        return [Prompt(s.caption, {**s.attributes(), "count": len(s.objects)}, "control")
                for s in make_scenes(CONTROL_SEED, range(num_samples), self.world())]

    def dataset(self):
        images = np.stack([render(s, self.resolution)[0]
                           for s in make_scenes(CONTROL_SEED, range(self.reference_size), self.world())])
        return UInt8Images(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
