"""What metric stages see: the run's samples, the reference set, the timings; features cached at stage boundaries.

Reference features are cached on disk as safetensors under a key that spells out
their whole provenance (reference set identity, extractor, its weights digest,
layer, batch size); generated-sample features are computed once per run and
shared by FID, KID and precision/recall.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from bench.interfaces import ReferenceSet
from bench.spec import RunSpec, stable_hash

FEATURE_BATCH_SIZE = 200
METRIC_THREADS = 1  # the metric phase's CPU threads, whatever the process has: sums do not depend on the machine's


@contextmanager
def metric_threads(n: int = METRIC_THREADS) -> Iterator[None]:
    """Run the block with ``n`` intra-op torch threads and ``n`` BLAS/OpenMP threads, then restore them.

    A feature network's reductions (and numpy's covariance) are summed in an order that depends on the thread
    count, so the same samples gave FIDs that differ in the 8th digit between a one-process run (all cores) and
    a torchrun process (one thread). With the count fixed here, the metrics of the same samples are the same
    bytes whatever the process count, OMP_NUM_THREADS or the number of cores.
    """
    before = torch.get_num_threads()
    limits = nullcontext()
    try:
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(limits=n)
    except ImportError:  # numpy's BLAS keeps its threads; torch's are fixed all the same
        pass
    torch.set_num_threads(n)
    try:
        with limits:
            yield
    finally:
        torch.set_num_threads(before)


def cache_dir() -> Path:
    return Path(os.environ.get("DIFFBENCH_CACHE", Path("~/.cache/diffbench").expanduser()))


@dataclass
class SamplingTimings:
    batch_seconds: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    batch_calls: list[int] = field(default_factory=list)  # denoiser calls per batch (NFE)
    call_seconds: list[list[float]] = field(default_factory=list)  # per batch, per call
    batch_warmup: list[bool] = field(default_factory=list)  # per batch: warm-up of its process ([]: the first ones)
    peak_memory_bytes: int = 0
    memory_source: str = ""


class UInt8Images(torch.utils.data.Dataset):
    """A uint8 [N, 3, H, W] tensor as the Dataset torch-fidelity's feature stage takes."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


@dataclass
class EvalContext:
    spec: RunSpec
    samples: torch.Tensor  # uint8 [N, 3, H, W]
    reference: ReferenceSet
    device: torch.device
    timings: SamplingTimings = field(default_factory=SamplingTimings)
    prompts: list[str] | None = None  # prompt i of sample i (text-conditioned runs)
    targets: list[Any] | None = None  # attributes sample i should have (attribute accuracy)
    items: list[Any] | None = None  # edit i of sample i (bench.interfaces.EditItem; editing runs)
    _features: dict[Any, torch.Tensor] = field(default_factory=dict)
    _extractors: dict[Any, Any] = field(default_factory=dict)

    def extractor(self, name: str, layer: str):
        from torch_fidelity.utils import create_feature_extractor

        key = (name, layer)
        if key not in self._extractors:
            from metrics.fidelity import ensure_registered

            ensure_registered()
            self._extractors[key] = create_feature_extractor(
                name, [layer], cuda=self.device.type == "cuda", verbose=False
            )
        return self._extractors[key]

    def _extract(self, dataset, name: str, layer: str) -> torch.Tensor:
        from torch_fidelity.utils import get_featuresdict_from_dataset

        fe = self.extractor(name, layer)
        with metric_threads():
            feats = get_featuresdict_from_dataset(
                dataset, fe, FEATURE_BATCH_SIZE, self.device.type == "cuda", save_cpu_ram=True, verbose=False
            )
        return feats[layer].double()

    def sample_features(self, name: str, layer: str) -> torch.Tensor:
        key = ("samples", name, layer)
        if key not in self._features:
            self._features[key] = self._extract(UInt8Images(self.samples), name, layer)
        return self._features[key]

    def reference_images(self) -> torch.Tensor:
        """The reference set as one uint8 [N, 3, H, W] tensor (for metrics on pixels)."""
        if "reference_images" not in self._features:
            ds = self.reference.dataset()
            self._features["reference_images"] = ds.images if isinstance(ds, UInt8Images) else torch.stack(
                [ds[i] for i in range(len(ds))]
            )
        return self._features["reference_images"]

    def reference_features(self, name: str, layer: str, extractor_digest: str) -> torch.Tensor:
        key = ("reference", name, layer)
        if key in self._features:
            return self._features[key]
        provenance = {
            "reference": self.reference.identity(),
            "extractor": name,
            "extractor_digest": extractor_digest,
            "layer": layer,
            "batch_size": FEATURE_BATCH_SIZE,
            "device": self.device.type,
        }
        path = cache_dir() / "reference-features" / f"{self.reference.name}-{name}-{stable_hash(provenance)}.safetensors"
        feats = load_cached(path)
        if feats is None:
            feats = self._extract(self.reference.dataset(), name, layer)
            save_cached(path, feats, provenance)
        self._features[key] = feats
        return feats


def load_cached(path: Path) -> torch.Tensor | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        return None
    try:
        # copied out of the memory map: another run may replace the cache file while this one still uses it
        return load_file(str(path))["features"].clone()
    except (SafetensorError, KeyError, OSError):  # a damaged cache entry is recomputed, never trusted
        return None


def save_cached(path: Path, features: torch.Tensor, provenance: dict) -> None:
    from safetensors.torch import save_file

    from bench.spec import canonical_json

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"features": features.contiguous()}, str(tmp), metadata={"provenance": canonical_json(provenance)})
    os.replace(tmp, path)
