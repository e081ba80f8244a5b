"""Sample shards on disk: one uint8 batch per file, written atomically, each with a sidecar that proves it complete.

A shard is ``samples/shard-NNNNN.npy``; its sidecar ``samples-index/shard-NNNNN.json`` is written after it (both
atomically: a temporary file, fsync, rename; ``samples/`` holds nothing but samples) and holds the file's sha256, the batch's sample indices, shape and dtype, the
protocol hash of the run, and the batch's timings. A shard counts as complete only when its sidecar exists,
belongs to this run and matches the file byte for byte, so a file cut short (a copy, a full disk, a non-atomic
file system) or left from another run is generated again, never read. Shards are numbered by batch, so a run
split across processes or resumed after a crash writes the same files as one uninterrupted process.

A run whose metrics read per-sample features (FID, KID) streams them: ``samples-features/shard-NNNNN.safetensors``
(float64 tensors keyed "extractor/layer") is written atomically after its shard and before its sidecar, which holds
its sha256; a features file that does not match its sidecar is never read (the caller extracts them again).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SHARD_PATTERN = "shard-{:05d}.npy"
FEATURES_SUFFIX = ".safetensors"  # samples-features/shard-NNNNN.safetensors beside samples/shard-NNNNN.npy
SIDECAR_FORMAT = 1
RUN_STATE = "run.json"  # in the output folder: protocol hash, attempt id, MLflow run id, prepare budget


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _verified_bytes(path: Path, sha256: str) -> bytes | None:
    """The file's bytes if it exists and its sha256 is ``sha256`` (a non-empty digest); else None."""
    if not sha256:
        return None
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == sha256 else None


@dataclass
class ShardRecord:
    """What a sidecar says about its shard: identity, content digest and the batch's timings."""

    batch: int
    indices: tuple[int, int]  # [start, stop) of the samples in the batch
    protocol_hash: str
    seconds: float  # wall time of the batch, device-synchronised
    call_seconds: list[float] = field(default_factory=list)  # time inside each denoiser call
    calls: int = 0  # denoiser calls (NFE of the batch)
    evaluations: int = 0  # per-sample network evaluations of the batch (CFG's two branches count twice; 0: older)
    warmup: bool = False  # one of its process's first warm-up batches: left out of the latency statistics
    peak_memory_bytes: int = 0  # its process's peak so far
    rank: int = 0
    shape: tuple[int, ...] = ()  # set by ShardStore.write
    sha256: str = ""  # of the .npy file's bytes; set by ShardStore.write
    features_sha256: str = ""  # of its features file's bytes ("": none; sidecars older than streamed features)
    feature_seconds: float = 0.0  # time extracting its streamed features (metric work done while sampling)

    def to_json(self) -> str:
        return json.dumps({"format": SIDECAR_FORMAT, "dtype": "uint8", **self.__dict__}, indent=1, sort_keys=True)


class ShardStore:
    """The shards of one run's output folder (``folder/samples``)."""

    def __init__(self, folder: Path, protocol_hash: str):
        self.dir = Path(folder) / "samples"
        self.index = Path(folder) / "samples-index"
        self.features_dir = Path(folder) / "samples-features"
        self.protocol_hash = protocol_hash

    def path(self, k: int) -> Path:
        return self.dir / SHARD_PATTERN.format(k)

    def sidecar(self, k: int) -> Path:
        return self.index / self.path(k).with_suffix(".json").name

    def features_path(self, k: int) -> Path:
        return self.features_dir / self.path(k).with_suffix(FEATURES_SUFFIX).name

    def write(self, array: np.ndarray, record: ShardRecord, features: dict[tuple[str, str], Any] | None = None) -> None:
        """The shard first, then its features (float64 tensors by (extractor, layer)), then its sidecar: a crash
        before the sidecar leaves a shard that is not complete, so a complete shard proves its features."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        data = buffer.getvalue()
        record.sha256 = hashlib.sha256(data).hexdigest()
        record.shape = tuple(array.shape)
        self.sidecar(record.batch).unlink(missing_ok=True)  # a replaced shard is incomplete until its new sidecar
        atomic_write(self.path(record.batch), data)
        if features:
            from safetensors.torch import save

            self.features_dir.mkdir(parents=True, exist_ok=True)
            blob = save({f"{name}/{layer}": t.contiguous() for (name, layer), t in features.items()})
            record.features_sha256 = hashlib.sha256(blob).hexdigest()
            atomic_write(self.features_path(record.batch), blob)
        atomic_write(self.sidecar(record.batch), record.to_json().encode())

    def load_features(self, k: int, features: tuple[tuple[str, str], ...]) -> dict[tuple[str, str], Any] | None:
        """Shard ``k``'s stored features for each (extractor, layer) of ``features`` if its features file is the one
        its sidecar names (sha256) and holds each as float64 [B, D] for the B samples of the shard; else None.
        The shard itself must have been checked complete (``load``)."""
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load

        record = self.record(k)
        blob = _verified_bytes(self.features_path(k), record.features_sha256) if record else None
        if blob is None:
            return None
        try:
            stored = load(blob)
        except (SafetensorError, ValueError):
            return None
        size = record.indices[1] - record.indices[0]
        out = {}
        for name, layer in features:
            t = stored.get(f"{name}/{layer}")
            if t is None or t.dtype != torch.float64 or t.ndim != 2 or len(t) != size:
                return None
            out[(name, layer)] = t
        return out

    def record(self, k: int) -> ShardRecord | None:
        try:
            data = json.loads(self.sidecar(k).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.pop("format", None) != SIDECAR_FORMAT or data.pop("dtype", None) != "uint8":
            return None
        try:
            record = ShardRecord(**data)
        except TypeError:
            return None
        record.indices, record.shape = tuple(record.indices), tuple(record.shape)
        return record if record.protocol_hash == self.protocol_hash else None

    def load(self, k: int, indices: tuple[int, int],
             sample_shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, ShardRecord] | None:
        """Shard ``k`` and its record if it is complete and is the batch of samples ``indices`` (of ``sample_shape``,
        [H, W, C], where given); else None."""
        record = self.record(k)
        if record is None or record.batch != k or record.indices != tuple(indices):
            return None
        expected = (indices[1] - indices[0], *(record.shape[1:] if sample_shape is None else sample_shape))
        if record.shape != expected:
            return None
        data = _verified_bytes(self.path(k), record.sha256)
        if data is None:
            return None
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError):
            return None
        if array.dtype != np.uint8 or array.shape != expected:
            return None
        return array, record

    def clear(self) -> None:
        """Remove every shard, sidecar, features file and left-over temporary file (a fresh run into a used folder)."""
        for folder in (self.dir, self.index, self.features_dir):
            if folder.is_dir():
                for p in folder.iterdir():
                    if p.name.startswith(("shard-", ".shard-")):
                        p.unlink(missing_ok=True)

    def remove_temporaries(self) -> None:
        """Temporary files of writers killed mid-write: never read, removed on resume."""
        for folder in (self.dir, self.index, self.features_dir):
            for p in folder.glob(".shard-*.tmp*") if folder.is_dir() else ():
                p.unlink(missing_ok=True)


def run_state(folder: Path) -> dict[str, Any] | None:
    """The run's state file (``run.json``): protocol hash, MLflow run id, prepare budget; None if absent."""
    try:
        data = json.loads((Path(folder) / RUN_STATE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def save_run_state(folder: Path, state: dict[str, Any]) -> None:
    atomic_write(Path(folder) / RUN_STATE, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())



class ShardSamples:
    """A run's samples as the metric phase reads them: straight from the shards, memory-mapped, one chunk at a
    time (bench.evaluation.SampleSource). ``ranges[k]`` is batch k's [start, stop); the shards were checked
    complete (sidecar, sha256) by the caller, and each is checked again for dtype and shape when mapped."""

    def __init__(self, store: ShardStore, ranges: list[tuple[int, int]], sample_shape: tuple[int, int, int]):
        self.store, self.ranges, self.sample_shape = store, list(ranges), tuple(sample_shape)  # [H, W, C]

    def __len__(self) -> int:
        return self.ranges[-1][1] if self.ranges else 0

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.sample_shape)

    def array(self) -> np.ndarray:
        """Every sample as one uint8 [N, H, W, C] array: for tests and small one-process runs (``runner.sample``),
        never on the run path."""
        return np.concatenate([self.shard(k) for k in range(len(self.ranges))])

    def digest(self) -> str:
        """sha256 of the samples' bytes in index order (that of ``array()``), one shard at a time."""
        h = hashlib.sha256()
        for k in range(len(self.ranges)):
            h.update(np.ascontiguousarray(self.shard(k)).data)
        return h.hexdigest()

    def shard(self, k: int) -> np.ndarray:
        """Shard ``k`` memory-mapped (read-only): pages come from disk as they are read."""
        start, stop = self.ranges[k]
        array = np.load(self.store.path(k), mmap_mode="r", allow_pickle=False)
        if array.dtype != np.uint8 or array.shape != (stop - start, *self.sample_shape):
            raise ValueError(f"sample shard {k} in {self.store.dir} changed since it was checked")
        return array

    def chunks(self, size: int, within_shards: bool = False):
        """(first index, uint8 [B, 3, H, W] tensor) of ``size`` samples each (the last may be shorter), in index
        order; a chunk may span shards, unless ``within_shards`` (then each shard's last chunk may be shorter).
        Only the chunk is copied into memory."""
        if size < 1:
            raise ValueError(f"chunk size {size} < 1")
        parts: list[np.ndarray] = []
        have = start = 0
        for k in range(len(self.ranges)):
            array = self.shard(k)
            pos = 0
            while pos < len(array):
                take = min(size - have, len(array) - pos)
                parts.append(array[pos : pos + take])
                have, pos = have + take, pos + take
                if have == size or (within_shards and pos == len(array)):
                    yield start, _chw(parts)
                    parts, start, have = [], start + have, 0
            del array
        if parts:
            yield start, _chw(parts)

    def images(self, k: int):
        """Shard ``k``'s samples as one uint8 [B, 3, H, W] tensor in memory (one batch: what its process held)."""
        return _chw([self.shard(k)])


    def take(self, indices: list[int]):
        """The samples ``indices`` (in that order) as one uint8 [len, 3, H, W] tensor, read from their shards."""
        import bisect

        import torch

        starts = [a for a, _ in self.ranges]
        out = np.empty((len(indices), *self.sample_shape), np.uint8)
        by_shard: dict[int, list[int]] = {}
        for j, i in enumerate(indices):
            if not 0 <= i < len(self):
                raise IndexError(f"sample {i} of {len(self)}")
            by_shard.setdefault(bisect.bisect_right(starts, i) - 1, []).append(j)
        for k, js in by_shard.items():
            array = self.shard(k)
            out[js] = array[[indices[j] - starts[k] for j in js]]
            del array
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _chw(parts: list[np.ndarray]):
    """Shard slices [b, H, W, C] as one uint8 [B, 3, H, W] tensor in memory (copied out of the maps)."""
    import torch

    return torch.from_numpy(np.concatenate(parts)).permute(0, 3, 1, 2).contiguous()
