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
    """The source with the region to fill shown in grey (where the mask is 1)."""
    out = item.source.copy()
    out[np.asarray(item.mask) > 0.5] = 128
    return out


def _rgb(image: Any) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[..., :3]


@dataclass(frozen=True)
class Block:
    """One method's rows: what it is given (from the data set's items), its runs' outputs, the ground truth."""

    title: str
    dataset: str
    steps: int
    given: tuple[tuple[str, Callable[[EditItem], np.ndarray]], ...]
    runs: tuple[tuple[str, str, dict[str, Any], str], ...]  # (label, method, options, model)
    truth: str = "ground truth"
    spec: dict[str, Any] = field(default_factory=dict)  # other RunSpec fields


EDIT_METRICS = ("edit-ground-truth",)
SOURCE = (("source", lambda it: it.source),)
BLOCKS: tuple[Block, ...] = (
    Block("ControlNet", "embedded-controls", 50, (("control (object mask)", lambda it: it.control),),
          (("ControlNet", "controlnet", {}, "embedded-t2i"),
           ("base (scale 0)", "controlnet", {"conditioning_scale": 0.0}, "embedded-t2i")),
          truth="render (ground truth)", spec={"metrics": ("control-iou",)}),
    Block("embedded-edits", "embedded-edits", 50, SOURCE,
          (("InstructPix2Pix", "instruct-pix2pix", {}, "embedded-instruct-pix2pix"),
           ("Imagic (eta 0.7)", "imagic", {"eta": 0.7}, "embedded-t2i"),
           ("SDEdit (strength 0.5)", "sdedit", {}, "embedded-t2i")),
          spec={"metrics": EDIT_METRICS}),
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
        rows += [(f"{block.title}: {label}", np.stack([_rgb(get(it)) for it in items])) for label, get in block.given]
        for label, method, options, model in block.runs:
            spec = RunSpec(method=method, method_args=options, model=model, dataset=block.dataset,
                           steps=block.steps, num_samples=args.num_samples, **block.spec,
                           output=str(Path(args.output_root) / f"trained-edit-{method}-{'-'.join(map(str, options.values())) or 'default'}"))
            result = execute(plan_run(spec), tracker, progress=False)
            images = np.concatenate([np.load(f) for f in sorted((result.output / "samples").glob("shard-*.npy"))])
            rows.append((f"{block.title}: {label}", images))
            print(f"{block.title} / {label}: {result.output} (MLflow run {result.run_id})", flush=True)
        rows.append((f"{block.title}: {block.truth}", np.stack([_rgb(it.target) for it in items])))
    grid(rows, Path(args.grid), list(range(args.num_samples)), scale=3)
    print(f"grid: {args.grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
