"""The trained editors of issue 18 on the embedded world, in one grid: per method its condition or source, its output
(and a baseline's on the same items), and the ground truth the renderer knows.

    python -m bench.trained_edits_report          # reports/figures/trained-editing-grid.png (6 items per method)

Every output is one MLflow run through `bench run`'s path (plan_run + execute), written under --output-root; the
numbers of these methods are their claims' (`bench claims --method controlnet,instruct-pix2pix,paint-by-example,
imagic,diffusionclip`), not this grid's.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.datasets import load_dataset
from bench.editing_report import grid
from bench.interfaces import EditItem
from bench.runner import execute, plan_run
from bench.spec import RunSpec
from bench.tracking import Tracker


def _mask_overlay(item: EditItem) -> np.ndarray:
    """The source with the region to fill as a black-and-white checkerboard of 2-pixel cells (where the mask is 1)."""
    out = item.source.copy()
    h, w = out.shape[:2]
    checker = ((np.arange(h)[:, None] // 2 + np.arange(w)[None, :] // 2) % 2 * 255).astype(np.uint8)
    region = np.asarray(item.mask) > 0.5
    out[region] = checker[region][:, None]
    return out


def _rgb(image: Any) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[..., :3]


@dataclass(frozen=True)
class Run:
    """One output row: a `bench run` of ``method`` with ``options`` on ``model``."""

    label: str
    method: str
    model: str
    options: dict[str, Any] = field(default_factory=dict)
    steps: int = 50


@dataclass(frozen=True)
class Block:
    """Rows over one data set's items: what the methods are given, their outputs, the ground truth."""

    dataset: str
    given: tuple[tuple[str, Callable[[EditItem], np.ndarray]], ...]
    runs: tuple[Run, ...]
    metrics: tuple[str, ...] = ("edit-ground-truth",)
    truth: str = "ground truth"


SOURCE = (("source", lambda it: it.source),)
BLOCKS: tuple[Block, ...] = (
    Block("embedded-controls", (("control (object mask)", lambda it: it.control),),
          (Run("ControlNet", "controlnet", "embedded-t2i"),
           Run("base (ControlNet scale 0)", "controlnet", "embedded-t2i", {"conditioning_scale": 0.0})),
          metrics=("control-iou",), truth="render (ground truth)"),
    Block("embedded-edits", SOURCE,
          (Run("InstructPix2Pix", "instruct-pix2pix", "embedded-instruct-pix2pix"),
           Run("Imagic (eta 0.7)", "imagic", "embedded-t2i", {"eta": 0.7}),
           Run("SDEdit (strength 0.5)", "sdedit", "embedded-t2i"))),
    Block("embedded-exemplars", (("source, region to fill checkered", _mask_overlay), ("exemplar", lambda it: it.exemplar)),
          (Run("Paint-by-Example", "paint-by-example", "embedded-paint-by-example"),
           Run("text inpainting, noun prompt", "blended-latent", "embedded-t2i",
               {"strength": 1.0}))),
    Block("embedded-recolor32", SOURCE,
          (Run("DiffusionCLIP (red to blue)", "diffusionclip", "embedded-t2i", steps=40),
           Run("SDEdit, target prompt", "sdedit", "embedded-t2i"))),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.trained_edits_report", description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", "-n", type=int, default=6, help="items per method (the grid's columns)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--output-root", default="bench-runs")
    p.add_argument("--grid", default="reports/figures/trained-editing-grid.png")
    args = p.parse_args(argv)
    tracker = Tracker(args.tracking_uri, "diffbench-trained-editing")
    tracker.check()
    rows: list[tuple[str, np.ndarray]] = []
    for block in BLOCKS:
        items = load_dataset(block.dataset).edits(args.num_samples)
        rows += [(f"{block.dataset}: {label}", np.stack([_rgb(get(it)) for it in items])) for label, get in block.given]
        for run in block.runs:
            name = "-".join([run.method, block.dataset, *map(str, run.options.values())])
            spec = RunSpec(method=run.method, method_args=run.options, model=run.model, dataset=block.dataset,
                           steps=run.steps, num_samples=args.num_samples, metrics=block.metrics,
                           output=str(Path(args.output_root) / f"trained-edit-{name}"))
            result = execute(plan_run(spec), tracker, progress=False)
            images = np.concatenate([np.load(f) for f in sorted((result.output / "samples").glob("shard-*.npy"))])
            rows.append((run.label, images))
            print(f"{run.label}: {result.output} (MLflow run {result.run_id})", flush=True)
        rows.append((f"{block.truth}", np.stack([_rgb(it.target) for it in items])))
    grid(rows, Path(args.grid), list(range(args.num_samples)), scale=3)
    print(f"grid: {args.grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
