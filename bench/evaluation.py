"""What metric stages see: the run's samples, the reference set, the timings; features cached at stage boundaries.

Reference features are cached on disk as safetensors under a key that spells out
their whole provenance (reference set identity, extractor, its weights digest,
layer, batch size); generated-sample features are computed once per run and
shared by FID, KID and precision/recall: streamed by the runner as each batch is
made (stored beside its shard), or extracted here, shard by shard, in the same
extractor batches, so both give the same bytes.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
import torch_fidelity.utils

from bench import reuse
from bench.extractors import EXTRACTORS, ensure_registered
from bench.files import cache_dir
from bench.interfaces import ReferenceSet
from bench.spec import RunSpec, canonical_json, stable_hash

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


@dataclass
class SamplingTimings:
    batch_seconds: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    batch_calls: list[int] = field(default_factory=list)  # denoiser calls per batch (NFE)
    batch_evaluations: list[int] = field(default_factory=list)  # per-sample network evaluations per batch (0: unknown)
    call_seconds: list[list[float]] = field(default_factory=list)  # per batch, per call
    batch_warmup: list[bool] = field(default_factory=list)  # per batch: warm-up of its process ([]: the first ones)
    feature_seconds: list[float] = field(default_factory=list)  # per batch: extracting its streamed features
    peak_memory_bytes: int = 0
    memory_source: str = ""


class SampleSource(Protocol):
    """A run's samples, read a chunk at a time: ``len`` and ``chunks(size)`` yielding (first index, uint8
    [B, 3, H, W]) in index order, every chunk ``size`` samples but the last; with ``within_shards`` a chunk never
    spans two shards (each shard's last chunk may be shorter; a source without shards is one shard)."""

    def __len__(self) -> int: ...

    def chunks(self, size: int, within_shards: bool = False) -> Iterator[tuple[int, torch.Tensor]]: ...

    def take(self, indices: list[int]) -> torch.Tensor: ...


class TensorSamples:
    """Samples already in memory (a caller's tensor): the chunks are slices of it."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def chunks(self, size: int, within_shards: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
        for a in range(0, len(self.images), size):  # one shard: within_shards changes nothing
            yield a, self.images[a : a + size]

    def take(self, indices: list[int]) -> torch.Tensor:
        return self.images[list(indices)]


class UInt8Images(torch.utils.data.Dataset):
    """A uint8 [N, 3, H, W] tensor as the Dataset torch-fidelity's feature stage takes."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def feature_extractor(name: str, layer: str, device: torch.device):
    """torch-fidelity's extractor ``name`` for ``layer`` on ``device``'s type, created once per process and weights
    (bench.reuse; callers only read it): creating one loads its weights. Callers keep it for their run."""
    key = ("feature-extractor", name, layer, device.type, EXTRACTORS[name].digest())

    def create():
        ensure_registered()
        return torch_fidelity.utils.create_feature_extractor(name, [layer], cuda=device.type == "cuda", verbose=False)

    return reuse.shared(key, create)


def extract_features(dataset, extractor, layer: str, device: torch.device) -> torch.Tensor:
    """float64 features of ``layer`` of every image of ``dataset`` (uint8 [3, H, W] items), in extractor batches of
    FEATURE_BATCH_SIZE, under METRIC_THREADS threads (the same bytes whatever the process's thread count)."""
    with metric_threads():
        feats = torch_fidelity.utils.get_featuresdict_from_dataset(
            dataset, extractor, FEATURE_BATCH_SIZE, device.type == "cuda", save_cpu_ram=True, verbose=False
        )
    return feats[layer].double()


def shard_features(images: torch.Tensor, extractors: Mapping[tuple[str, str], Any],
                   device: torch.device) -> dict[tuple[str, str], torch.Tensor]:
    """The per-sample features of one shard (uint8 [B, 3, H, W]) for each (extractor name, layer) of ``extractors``
    (their ``feature_extractor`` objects).

    The extractor's batches are chunks of FEATURE_BATCH_SIZE within the shard: the runner streams a batch's features
    through here as the batch is made, and ``EvalContext.sample_features`` extracts the same chunks, so the values
    are the same bytes whether streamed, recomputed from the shards, made by one process or several, or resumed.
    """
    return {(name, layer): extract_features(UInt8Images(images), fe, layer, device)
            for (name, layer), fe in extractors.items()}


@dataclass
class EvalContext:
    """What a metric sees. The samples are read chunk by chunk (``iter_samples``, ``map_samples``): a run's come
    from its shards on disk, so the metric phase holds one chunk of images at a time, never the whole run;
    metrics keep per-sample values and features, not images."""

    spec: RunSpec
    samples: torch.Tensor | SampleSource  # uint8 [N, 3, H, W], or a source that reads them a chunk at a time
    reference: ReferenceSet
    device: torch.device
    timings: SamplingTimings = field(default_factory=SamplingTimings)
    prompts: list[str] | None = None  # prompt i of sample i (text-conditioned runs)
    targets: list[Any] | None = None  # attributes sample i should have (attribute accuracy)
    items: list[Any] | None = None  # edit i of sample i (bench.interfaces.EditItem; editing runs)
    model: Any = None  # the run's DiffusionModel, for a metric that ``needs_model`` (else None)
    # per-sample features already extracted (the runner's, streamed per shard), by (extractor, layer)
    streamed_features: Mapping[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    _features: dict[Any, torch.Tensor] = field(default_factory=dict)
    _extractors: dict[Any, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.source: SampleSource = TensorSamples(self.samples) if torch.is_tensor(self.samples) else self.samples
        for (name, layer), feats in self.streamed_features.items():
            if len(feats) != len(self.source):
                raise ValueError(f"{len(feats)} streamed {name}/{layer} features for {len(self.source)} samples")
            self._features[("samples", name, layer)] = feats

    @property
    def num_samples(self) -> int:
        return len(self.source)

    def iter_samples(self, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first index, uint8 [B, 3, H, W]) chunks of ``batch_size`` samples (the last may be shorter), in index
        order; chunk boundaries are multiples of ``batch_size``, whatever the shards' batch size."""
        return self.source.chunks(batch_size)

    def map_samples(self, fn: Callable[[int, torch.Tensor], Any], batch_size: int) -> Any:
        """``fn(first index, chunk)`` on each chunk, its per-sample results concatenated (tensors along dim 0,
        arrays along axis 0, dicts key by key). A metric whose network batches by B passes B (or a multiple):
        the network sees the same batches as on one whole array, so the values are the same bytes."""
        parts = [fn(a, chunk) for a, chunk in self.iter_samples(batch_size)]
        return _concat(parts)

    def take_samples(self, indices) -> torch.Tensor:
        """The samples ``indices`` (in that order) as uint8 [len, 3, H, W]: a metric that groups samples (by subject)
        reads a group of at most its network's batch at a time."""
        return self.source.take(list(indices))

    def extractor(self, name: str, layer: str):
        key = (name, layer)
        if key not in self._extractors:
            self._extractors[key] = feature_extractor(name, layer, self.device)
        return self._extractors[key]

    def _extract(self, dataset, name: str, layer: str) -> torch.Tensor:
        return extract_features(dataset, self.extractor(name, layer), layer, self.device)

    def sample_features(self, name: str, layer: str) -> torch.Tensor:
        """float64 [N, D] features of the samples: the streamed ones where the runner gave them, else extracted
        chunk by chunk within each shard, every chunk one extractor batch (the batches of ``shard_features``)."""
        key = ("samples", name, layer)
        if key not in self._features:
            chunks = self.source.chunks(FEATURE_BATCH_SIZE, within_shards=True)
            self._features[key] = _concat([self._extract(UInt8Images(chunk), name, layer) for _, chunk in chunks])
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


def _concat(parts: list[Any]) -> Any:
    import numpy as np

    if not parts:
        raise ValueError("no samples")
    first = parts[0]
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    if isinstance(first, tuple):
        return tuple(_concat([p[i] for p in parts]) for i in range(len(first)))
    if torch.is_tensor(first):
        return torch.cat(parts)
    if isinstance(first, np.ndarray):
        return np.concatenate(parts)
    return [x for p in parts for x in p]


def load_cached(path: Path) -> torch.Tensor | None:
    """Cached features (read once per process while the file is unchanged, then shared: bench.reuse), or None."""
    if not path.exists():
        return None
    try:
        # copied out of the memory map: another run may replace the cache file while this one still uses it
        return reuse.shared(("features", reuse.files_signature([path])),
                            lambda: load_file(str(path))["features"].clone())
    except (SafetensorError, KeyError, OSError):  # a damaged cache entry is recomputed, never trusted
        return None


def save_cached(path: Path, features: torch.Tensor, provenance: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"features": features.contiguous()}, str(tmp), metadata={"provenance": canonical_json(provenance)})
    os.replace(tmp, path)
