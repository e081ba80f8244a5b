"""Feature extractors of the data sets' protocols (FID, KID, precision/recall, personalization scores).

One table: name -> layer, dimension, weights digest, preflight check, resize rule. The shapes world's
networks are registered with torch-fidelity (bench.embedded.feature_extractor) by ``ensure_registered``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from bench.embedded.feature_extractor import WEIGHTS_DIR, register
from bench.errors import BenchError
from bench.files import file_digest

if TYPE_CHECKING:  # pragma: no cover
    from bench.interfaces import ReferenceSet

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


@dataclass(frozen=True)
class ExtractorInfo:
    name: str
    layer: str
    dim: int
    digest: Callable[[], str]
    preflight: Callable[[], None]
    resize: str


def shapes_digest(folder: str = "feature-net") -> str:
    path = WEIGHTS_DIR.parent / folder / "model.safetensors"
    if not path.exists():
        raise BenchError(f"the embedded feature network is missing ({path}); rebuild it with `bench embedded train {folder}`")
    return file_digest([path, path.with_name("config.json")])  # the config holds the feature scale


def _inception_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS


def _inception_preflight() -> None:
    path = _inception_path()
    if not path.exists() and os.environ.get("DIFFBENCH_ALLOW_DOWNLOADS") != "1":
        raise BenchError(
            f"torch-fidelity's InceptionV3 weights are not at {path}: download {INCEPTION_WEIGHTS} from "
            f"torch-fidelity's v0.2.0 release into {path.parent} (or set DIFFBENCH_ALLOW_DOWNLOADS=1 where online)"
        )


EXTRACTORS: dict[str, ExtractorInfo] = {
    "shapes-cnn16": ExtractorInfo(
        "shapes-cnn16", "embedding", 64, shapes_digest, lambda: None, "bilinear-antialias to 16x16 if needed"
    ),
    "shapes-cnn32": ExtractorInfo(
        "shapes-cnn32", "embedding", 64, lambda: shapes_digest("feature-net32"), lambda: None,
        "bilinear-antialias to 32x32 if needed",
    ),
    "inception-v3-compat": ExtractorInfo(
        "inception-v3-compat", "2048", 2048, lambda: INCEPTION_WEIGHTS, _inception_preflight, "torch-fidelity legacy TF bilinear to 299"
    ),
}


def ensure_registered() -> None:
    register()


def extractor_for(reference: ReferenceSet) -> ExtractorInfo:
    return EXTRACTORS[reference.feature_extractor]
