"""``control-iou``: how closely a generated image follows its spatial condition (ControlNet, Zhang et al. 2023).

For every item of a data set with control images (embedded-controls), the intersection over union between the
condition's mask (the control image's mean over channels >= half of white, ``bench.controls.control_mask``) and the
generated image's object mask, read by a segmentation of the render (no learned network): the background colour is
the per-channel median of the image's one-pixel border (the shapes world keeps objects inside the frame), and a pixel
is an object's when one of its channels differs from that colour by more than ``SEGMENT_THRESHOLD`` (64 of 255; the
closest object colour to a background, blue on navy, differs by 140). A render's own mask gives IoU near 1 (anti-
aliased edges aside); an image with its objects elsewhere gives less. Averaged overall and per object count.

The key names the segmentation that computes it (``control_iou_border_seg``), so that nobody reads it as the mIoU of
a learned segmenter (the paper's ADE20K evaluation uses OneFormer).
"""

from __future__ import annotations

import numpy as np
import torch

from bench.controls import MASK_THRESHOLD
from bench.errors import BenchError
from bench.outputs import Output
from metrics.editing import EditMetric

SEGMENT_THRESHOLD = 64  # of 255: max over channels of |pixel - background colour| above it is an object's pixel


def border_background(images: torch.Tensor) -> torch.Tensor:
    """The background colour of uint8 images [N, 3, H, W]: the per-channel median of the one-pixel border, [N, 3]."""
    x = images.float()
    border = torch.cat([x[:, :, 0, :], x[:, :, -1, :], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], dim=2)
    return border.median(dim=2).values


def segment(images: torch.Tensor, threshold: float = SEGMENT_THRESHOLD) -> torch.Tensor:
    """Object masks of uint8 images [N, 3, H, W] as bool [N, H, W]: pixels away from the border's colour."""
    diff = (images.float() - border_background(images)[:, :, None, None]).abs().amax(dim=1)
    return diff > threshold


def condition_masks(controls: torch.Tensor) -> torch.Tensor:
    """The masks of uint8 control images [N, C, H, W] as bool [N, H, W] (mean over channels >= half of white)."""
    return controls.float().mean(dim=1) / 255.0 >= MASK_THRESHOLD


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image IoU of bool masks [N, H, W]; nan where both are empty."""
    inter = (a & b).flatten(1).sum(1).double()
    union = (a | b).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))


class ControlIoU(EditMetric):
    name = "control-iou"
    summary = ("spatial-condition adherence: IoU between the control image's mask and the generated image's object "
               "mask, segmented by distance from the border's colour")
    outputs = (
        Output("control_iou_border_seg", "control IoU (border-colour segmentation)", "higher", ".3f", "control-iou"),
    )

    def check(self, spec, reference):
        if not getattr(reference, "has_controls", False):
            raise BenchError(f"metric {self.name} needs control images, which data set {reference.name} does not "
                             f"have (use embedded-controls)")

    def protocol(self, spec, reference):
        return {"condition": f"control image mean over channels >= {MASK_THRESHOLD} of white",
                "generated": f"segmentation: max over channels |pixel - median of the 1-pixel border| > "
                             f"{SEGMENT_THRESHOLD}/255", "iou": "per image, both empty left out; mean"}

    def per_edit(self, ctx, backbones):
        controls = []
        for it in ctx.items:
            if it.control is None:
                raise BenchError(f"{self.name}: item {it.key} has no control image")
            c = np.asarray(it.control)
            controls.append(c[..., None] if c.ndim == 2 else c)
        cond = condition_masks(torch.from_numpy(np.stack(controls)).permute(0, 3, 1, 2))
        got = segment(ctx.samples)
        if got.shape != cond.shape:
            raise BenchError(f"{self.name}: samples are {tuple(got.shape[1:])}, control images {tuple(cond.shape[1:])}")
        value = iou(got, cond)
        return {"control_iou_border_seg": value}, {"control_iou_border_seg": torch.isfinite(value)}
