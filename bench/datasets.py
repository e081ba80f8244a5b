"""Reference sets for the metrics: the embedded shapes world and real data sets through torch-fidelity."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from bench.embedded.shapes import RENDERER_VERSION, WorldConfig, render_set
from bench.errors import BenchError
from bench.interfaces import ReferenceSet

SHAPES_REFERENCE_SEED = 2  # the pixel DDPM trains on seed 1, the feature network on seed 3


class Shapes16(ReferenceSet):
    """10,000 rendered single-object 16x16 scenes (seen attribute values), seed 2."""

    name = "shapes16"
    summary = "embedded shapes world, 16x16, one object; 10k rendered reference images"
    resolution = 16
    default_model = "embedded-ddpm"
    feature_extractor = "shapes-cnn16"
    embedded = True
    size = 10_000

    def world(self) -> WorldConfig:
        return WorldConfig(resolution=self.resolution, max_objects=1, split="train")

    def identity(self) -> dict[str, Any]:
        w = self.world()
        return {
            "name": self.name,
            "renderer_version": RENDERER_VERSION,
            "seed": SHAPES_REFERENCE_SEED,
            "size": self.size,
            "resolution": w.resolution,
            "max_objects": w.max_objects,
            "split": w.split,
        }

    def dataset(self):
        from bench.evaluation import UInt8Images

        images, _ = render_set(SHAPES_REFERENCE_SEED, range(self.size), self.world())
        return UInt8Images(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())


def datasets_root() -> Path:
    return Path(os.environ.get("DIFFBENCH_DATA", Path("~/.cache/diffbench/data").expanduser()))


class Cifar10Train(ReferenceSet):
    """CIFAR-10 training set (50k) through torch-fidelity's ``cifar10-train`` input, Inception features."""

    name = "cifar10"
    summary = "CIFAR-10 train (50k, 32x32) via torch-fidelity; Inception-v3 features; needs the download"
    resolution = 32
    default_model = "google/ddpm-cifar10-32"
    feature_extractor = "inception-v3-compat"

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "torch_fidelity_input": "cifar10-train", "size": 50_000, "resolution": 32}

    def preflight(self) -> None:
        folder = datasets_root() / "cifar-10-batches-py"
        if not folder.is_dir():
            raise BenchError(
                f"CIFAR-10 is not at {folder}: download cifar-10-python.tar.gz (www.cs.toronto.edu/~kriz/cifar.html) "
                f"and extract it into {datasets_root()} (or set DIFFBENCH_DATA)"
            )

    def dataset(self):
        from torch_fidelity.registry import DATASETS_REGISTRY

        self.preflight()
        try:
            return DATASETS_REGISTRY["cifar10-train"](str(datasets_root()), False)
        except RuntimeError as exc:
            raise BenchError(f"CIFAR-10 in {datasets_root()} cannot be read: {exc}") from None
