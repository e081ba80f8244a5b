"""Restoration metrics (embedded-restoration): PSNR to the ground truth and the range-space consistency error.

- ``restore_psnr``: PSNR (data range 1, [0, 1] pixels, MSE floored as the editing metrics do) between each sample
  and its item's ground truth, averaged over the run and per task (``restore_psnr/inpainting``, ``/sr4``,
  ``/colorization``), as DDNM's evaluation averages per-image PSNR;
- ``consistency_error``: max over the run's samples of max |A(x) - y| in [0, 1] units, with y = A(source) read
  from the item's stored observation and x the stored uint8 sample; per task too. A method that reproduces the
  range space exactly (DDNM: A x0 = y) is bounded by the uint8 rounding of its samples, at most 0.5/255 for the
  operators here (each averages or keeps rounded pixels), plus float round-off, where storing did not clip it:
  a sample is clipped to [-1, 1] before rounding, and DDNM's null-space term can leave that range (a 4x4 block of
  a white background whose mean must stay 1 while its pixels vary), so this value also measures the clipping;
- ``consistency_error_unclipped``: max over y's entries of the distance from y to the values A x takes for every
  float image x that the stored bytes may have come from (each pixel within half a step of its byte; a pixel stored
  as 0 or 255 anywhere beyond, as the clipping before storing allows): 0 up to float round-off for a method whose
  float output satisfies A x = y, whatever the rounding and the clipping did to it; a lower bound of the float output's
  inconsistency (next to a byte 0 or 255 any deficit on that side is explained by the clipping).

FID against the data set's ground truths is the ``fid`` metric (shapes-cnn16 features).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from bench.errors import BenchError
from bench.interfaces import Metric, ReferenceSet
from bench.outputs import Output
from bench.restoration import TASKS, Operators, stored_interval
from metrics.editing import PSNR_MSE_FLOOR, psnr  # the editing metrics' PSNR: identical images give 100 dB



def _float01(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(images).double() / 255.0


class Restoration(Metric):
    name = "restoration"
    summary = "restoration: PSNR to the ground truth and max |A(x) - y| (range-space consistency), per task"
    outputs = (
        Output("restore_psnr", "restoration PSNR to the ground truth", "higher", ".2f", "restoration"),
        Output("consistency_error", "max |A(x) - y| ([0, 1] units)", "lower", ".5f", "restoration", None),
        Output("consistency_error_unclipped", "max distance of y from A(x before storing)", "lower", ".2e",
               "restoration", None),
    )
    needs_edits: ClassVar[bool] = True

    def check(self, spec, reference: ReferenceSet) -> None:
        tasks = getattr(reference, "restoration_tasks", None)
        if not tasks:
            raise BenchError(f"metric {self.name} needs a restoration data set with degradation operators "
                             f"(embedded-restoration); data set {reference.name} has none")

    def protocol(self, spec, reference):
        return {"psnr": f"[0, 1] pixels, data range 1, MSE floored at {PSNR_MSE_FLOOR}, mean over samples and per task",
                "consistency": "max over samples of max |A(x) - A(source)|, [0, 1] units, float64, from the uint8 files; "
                               "unclipped: distance of y from [A lo, A hi], lo / hi the bytes -+ 0.5, 0 and 255 unbounded",
                "operators": reference.identity().get("operators")}

    def compute(self, ctx) -> dict[str, float]:
        if ctx.items is None:
            raise BenchError(f"{self.name}: this run has no restoration items")
        if len(ctx.items) != ctx.num_samples:
            raise BenchError(f"{self.name}: {ctx.num_samples} samples for {len(ctx.items)} items")
        if any(it.target is None for it in ctx.items):
            raise BenchError(f"{self.name}: some items have no ground truth")

        def per_sample(a: int, chunk: torch.Tensor):
            items = ctx.items[a : a + len(chunk)]
            x = _float01(chunk)
            ops = Operators(items, tuple(x.shape[-2:]))
            truth = _float01(np.stack([it.target for it in items])).permute(0, 3, 1, 2)
            source = _float01(np.stack([it.source for it in items])).permute(0, 3, 1, 2)
            lo, hi = stored_interval(chunk)
            return {"psnr": psnr(x, truth),
                    "consistency": ops.consistency(x, source), "unclipped": ops.interval_distance(lo, hi, source)}

        values = ctx.map_samples(per_sample, 256)
        types = [it.edit_type for it in ctx.items]
        out: dict[str, float] = {}
        for suffix, sel in [("", torch.ones(len(types), dtype=torch.bool)),
                            *((f"/{task}", torch.tensor([t == task for t in types])) for task in TASKS)]:
            if sel.any():
                out[f"restore_psnr{suffix}"] = float(values["psnr"][sel].mean())
                out[f"consistency_error{suffix}"] = float(values["consistency"][sel].max())
                out[f"consistency_error_unclipped{suffix}"] = float(values["unclipped"][sel].max())
        return out
