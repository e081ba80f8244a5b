"""Plan a run (resolve and validate everything, no sampling), then execute it.

Planning fails with one line on any bad input before the MLflow run exists.
Execution samples in batches with per-sample seeds, writes each batch as an
atomic shard with the per-sample features its metrics read (extracted as the
batch is made; on a GPU while the next batch is sampled), computes the metrics
once over all samples, and records the run.
The batches of a run can be shared among processes (torchrun; bench.distributed)
and a killed run resumed from its complete shards (bench.shards), with the same
samples, metrics and MLflow run as one uninterrupted process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import resource
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.distributed import Shards
from bench.errors import BenchError
from bench.interfaces import Batch, DiffusionModel, EditItem, Method, Metric, Prompt, ReferenceSet, recorded_args
from bench.outputs import undeclared
from bench.spec import RunSpec, stable_hash

from bench.shards import SHARD_PATTERN  # noqa: F401  (re-exported: shards are named by batch index)


@dataclass
class Plan:
    spec: RunSpec  # device resolved, method_args complete
    method: Method
    model: DiffusionModel
    reference: ReferenceSet
    metrics: dict[str, Metric]
    output: Path
    protocol: dict[str, Any]
    protocol_hash: str
    eval_protocol_hash: str
    prompts: list[Prompt] | None = None  # prompt i of sample i (text-conditioned methods)
    targets: list[Any] | None = None  # attributes sample i should have (attribute accuracy), or None
    items: list[EditItem] | None = None  # edit i of sample i (editing methods)

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return self.protocol["method"].get("scheduler", {})

    @property
    def sample_features(self) -> tuple[tuple[str, str], ...]:
        """The (extractor, layer) features its metrics read per sample: streamed with the shards."""
        return _sample_features(self.spec, self.reference, self.metrics)


def _sample_features(spec: RunSpec, reference: ReferenceSet, metrics: dict[str, Metric]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({f for metric in metrics.values() for f in metric.sample_features(spec, reference)}))


@dataclass
class RunResult:
    plan: Plan
    values: dict[str, float]
    output: Path
    samples_sha256: str
    run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {name}: no CUDA device is available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BenchError(f"--device {name}: MPS is not available here")
    return device


def check_writable(folder: Path, what: str = "output folder") -> None:
    """Create ``folder`` if needed and write a probe file in it; one line (BenchError) if that fails."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise BenchError(f"{what} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise BenchError(f"{what} {folder} is not writable: {exc.strerror or exc}") from None


LOCK_FILE = ".lock"  # in the output folder: held (flock, exclusive) by the run writing there


@contextlib.contextmanager
def output_lock(folder: Path):
    """Hold an exclusive lock on ``folder`` for the block: a second run into the same folder refuses in one line.

    The lock is ``flock`` on ``folder/.lock`` (the file says who holds it); the kernel drops it when the process
    ends however it ends, so a killed run never leaves the folder locked.
    """
    import fcntl
    import socket

    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / LOCK_FILE, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise BenchError(f"output folder {folder} is in use by another run ({holder}); wait for it to end or "
                             f"pass another --output") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock


SHARD_OVERHEAD_BYTES = 4096  # a shard's .npy header, its features file's header and its sidecar (a generous bound)


def estimated_bytes(num_samples: int, sample_shape: tuple[int, int, int], batch_size: int = 1,
                    feature_values: int = 0) -> int:
    """Disk the run's shards take: uint8 samples, ``feature_values`` float64 features per sample (streamed with the
    shards), and each shard's headers and sidecar."""
    c, h, w = sample_shape
    return num_samples * (c * h * w + 8 * feature_values) + -(-num_samples // batch_size) * SHARD_OVERHEAD_BYTES


def check_disk(output: Path, num_samples: int, sample_shape: tuple[int, int, int], batch_size: int = 1,
               feature_values: int = 0) -> None:
    """Refuse before the run starts if its shards cannot fit on the output folder's disk (a typo in
    --num-samples costs seconds, not hours and a full disk)."""
    import shutil

    need = estimated_bytes(num_samples, sample_shape, batch_size, feature_values)
    free = shutil.disk_usage(output).free
    if need > free:
        c, h, w = sample_shape
        raise BenchError(f"{num_samples:,} samples of {c}x{h}x{w} need {need / 2**30:.1f} GiB in {output}, and its "
                         f"disk has {free / 2**30:.1f} GiB free; lower --num-samples or pass another --output")


def warn_if_long(spec: RunSpec, first_batch_seconds: float, batches: int, processes: int = 1) -> float:
    """After the first batch: the run's estimated sampling time; one warning line when it is over a day."""
    import sys

    estimate = first_batch_seconds * batches / max(processes, 1)
    if estimate > LONG_RUN_SECONDS:
        print(f"bench: warning: from its first batch this run needs about {estimate / 3600:.0f} h of sampling "
              f"({batches:,} batches of {spec.batch_size}); Ctrl-C now and lower --num-samples if that is a typo "
              f"(the shards made so far are kept for --resume)", file=sys.stderr, flush=True)
    return estimate


LONG_RUN_SECONDS = 24 * 3600


def plan_run(spec: RunSpec) -> Plan:
    """Resolve names, load the model, validate the combination. Raises BenchError on bad input."""
    import torch

    from bench.catalog import METHODS, METRICS
    from bench.datasets import load_dataset
    from bench.extractors import EXTRACTORS
    from bench.models import load_model
    from bench.runtime import check_attention
    from bench.runtime import configure as configure_runtime
    from bench.spec import DEFAULT_DATASET, DEFAULT_METRICS, DEFAULT_NUM_SAMPLES

    method_cls = METHODS.get(spec.method)
    args = method_cls.parse_args(spec.method_args)
    # fields left unset (None) take the method's, then the data set's defaults; what the user gave is kept
    dataset_name = spec.dataset or method_cls.default_dataset or DEFAULT_DATASET
    reference = load_dataset(dataset_name)
    metric_names = tuple(spec.metrics or reference.default_metrics or DEFAULT_METRICS)
    spec = spec.replace(num_samples=spec.num_samples or reference.default_num_samples or DEFAULT_NUM_SAMPLES)
    metric_classes = {name: METRICS.get(name) for name in metric_names}
    for name, metric_cls in metric_classes.items():
        if metric_cls.needs_prompts and not method_cls.takes_prompts():
            raise BenchError(f"metric {name} needs prompts; method {spec.method!r} is not text-conditioned")
        if metric_cls.needs_edits and method_cls.conditioning != "edit":
            raise BenchError(f"metric {name} needs an editing run; method {spec.method!r} is not an editor")
    device = resolve_device(spec.device)
    model_name = spec.model or reference.default_model
    spec = spec.replace(model=model_name, device=str(device), method_args=recorded_args(args),
                        dataset=dataset_name, metrics=metric_names)
    metrics = {name: cls() for name, cls in metric_classes.items()}
    for metric in metrics.values():
        metric.check(spec, reference)
    reference.preflight()

    model = load_model(model_name)
    method = method_cls(args)
    method.check(model, spec.steps)
    method.check_dataset(reference)
    for metric in metrics.values():
        metric.check_model(model)
    c, h, w = model.sample_shape
    if (reference.has_images and (h, w) != (reference.resolution, reference.resolution)) or c != 3:
        raise BenchError(
            f"model {model.name} makes {c}x{h}x{w} samples but data set {reference.name} is "
            f"3x{reference.resolution}x{reference.resolution}; pick a matching --model or --dataset"
        )
    dtype = getattr(torch, spec.dtype)
    if device.type == "cpu" and dtype == torch.float16:
        raise BenchError("--dtype float16 is not supported on the CPU; use float32 or bfloat16")
    for module in model.modules():
        module.to(device=device)
        if dtype != torch.float32:
            module.to(dtype=dtype)
    check_attention(spec.attention, device, dtype)
    runtime = configure_runtime(model.unet, spec.attention, spec.compile, spec.channels_last)
    prompts, targets = _prompts_and_targets(spec, method, reference, metrics)
    items = reference.edits(spec.num_samples) if method.conditioning == "edit" else None
    if method.conditioning == "edit" and items is None:
        raise BenchError(f"method {method.name!r} edits images, and data set {reference.name} has no edits "
                         f"(use embedded-edits or pie-bench)")
    if items is not None:
        method.check_items(items)

    method_protocol: dict[str, Any] = {"name": method.name, "args": spec.method_args, **method.protocol(model)}
    eval_protocol = {name: m.protocol(spec, reference) for name, m in metrics.items()}
    protocol = {
        "spec": spec.hashed_fields(),
        "method": method_protocol,
        "model": model.identity(),
        "metrics": eval_protocol,
        "seeding": "per-sample sha256(run seed, index); initial noise drawn on the CPU in float32",
        "runtime": runtime,
    }
    if prompts is not None:
        protocol["prompts"] = {"dataset": reference.prompts_identity(), "assignment": "prompt i for sample i",
                               "texts_sha256": stable_hash([p.text for p in prompts], 64)}
    if items is not None:
        protocol["edits"] = {"dataset": reference.prompts_identity(), "assignment": "edit i for sample i",
                             "items_sha256": _items_digest(items)}
    protocol_hash = stable_hash(protocol)
    output = Path(spec.output) if spec.output else Path("bench-runs") / f"{spec.method}-{protocol_hash[:12]}"
    check_writable(output)
    feature_values = sum(EXTRACTORS[name].dim for name, _ in _sample_features(spec, reference, metrics))
    check_disk(output, spec.num_samples, model.sample_shape, spec.batch_size, feature_values)
    return Plan(spec, method, model, reference, metrics, output, protocol, protocol_hash, stable_hash(eval_protocol),
                prompts, targets, items)


def _items_digest(items: list[EditItem]) -> str:
    """sha256 over every field of every edit (images and masks by their bytes)."""
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps([item.key, item.source_prompt, item.target_prompt, item.edit_type, list(item.blend_words),
                             item.instruction]).encode())
        for array in (item.source, item.mask, item.target):
            h.update(b"-" if array is None else np.ascontiguousarray(array).tobytes())
        for array in (item.control, item.exemplar):  # issue 18's fields, hashed where present (older hashes kept)
            if array is not None:
                h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _prompts_and_targets(spec: RunSpec, method: Method, reference: ReferenceSet, metrics: dict[str, Metric]):
    """The prompt of every sample (text-conditioned methods) and what each sample should show (for metrics)."""
    prompts = reference.prompts(spec.num_samples) if method.takes_prompts() else None
    if method.takes_prompts() and prompts is None:
        raise BenchError(f"method {method.name!r} needs prompts, and data set {reference.name} has none "
                         f"(use shapes32, a prompt data set or a prompt file)")
    targets = method.targets(spec.num_samples)
    if targets is None and prompts is not None and any(p.attributes for p in prompts):
        targets = [p.attributes for p in prompts]
    for name, metric in metrics.items():
        if metric.needs_targets and targets is None:
            raise BenchError(f"metric {name} needs per-sample targets (prompts with attributes, or a guidance target); "
                             f"this run has none")
    return prompts, targets


def batch_range(spec: RunSpec, k: int) -> tuple[int, int]:
    """The samples [start, stop) of batch k: fixed by the batch size alone, whatever the processes."""
    return k * spec.batch_size, min((k + 1) * spec.batch_size, spec.num_samples)


def num_batches(spec: RunSpec) -> int:
    return -(-spec.num_samples // spec.batch_size)


def make_batch(plan: Plan, indices: range, seeds: list[int]) -> Batch:
    """The batch of samples ``indices``: sample i gets seed i (and prompt i, edit i, target i), whatever the batching."""
    return Batch(seeds=tuple(int(s) for s in seeds), steps=plan.spec.steps, indices=tuple(indices),
                 prompts=tuple(plan.prompts[i].text for i in indices) if plan.prompts is not None else (),
                 edits=tuple(plan.items[i] for i in indices) if plan.items is not None else (),
                 targets=tuple(plan.targets[i] for i in indices) if plan.targets is not None else ())


def _generate_batch(plan: Plan, indices: range, seeds: list[int], denoiser):
    """Images in [-1, 1] of samples ``indices``: each from its own seed (and prompt or edit), not from the batch."""
    return plan.method.generate(plan.model, make_batch(plan, indices, seeds), denoiser)


def peak_memory(device) -> tuple[int, str]:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


# extract a batch's features on a background thread while the next batch samples; None: on CUDA only (on a CPU the
# cores are busy sampling, and the thread's metric_threads() settings would race with the sampling's)
OVERLAP_FEATURES: bool | None = None


class _ShardWriter:
    """Writes each batch as a shard (bench.shards) with its per-sample features (``features``: (extractor, layer)).

    Inline, a batch's features are extracted and its shard written before the next batch starts (on a CPU the cores
    are busy sampling). With ``overlap`` they are extracted on one background thread (on CUDA, its own stream) while
    the next batch is sampled, and the shard is written when they are done: at most one batch waits. Either way the
    features are ``bench.evaluation.shard_features`` of the shard, so the bytes are the same.
    """

    def __init__(self, store, features: tuple[tuple[str, str], ...], device, overlap: bool):
        from concurrent.futures import ThreadPoolExecutor

        import torch

        from bench.evaluation import feature_extractor

        self.store, self.device = store, device
        # created once for the run (creating one loads its weights), and here: an error stops the run before sampling
        self.extractors = {(name, layer): feature_extractor(name, layer, device) for name, layer in features}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="bench-features") if overlap and features else None
        self.pending = None  # (future of its features, samples, record) of the batch in flight
        # on CUDA the thread's kernels run beside the sampling kernels, not queued after them
        self.stream = torch.cuda.Stream(device) if self.pool is not None and device.type == "cuda" else None
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(device))  # the extractor's weights are on the device

    def _extract(self, batch: np.ndarray, record):
        import torch

        from bench.evaluation import shard_features

        t0 = time.perf_counter()
        images = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            features = shard_features(images, self.extractors, self.device)
        record.feature_seconds = time.perf_counter() - t0  # the features are on the CPU: their kernels are done
        return features

    def add(self, batch: np.ndarray, record) -> None:
        """Batch ``record.batch``'s samples (uint8 [B, H, W, C]): written now, or once its features are extracted."""
        self.flush()
        if self.pool is None:
            self.store.write(batch, record, self._extract(batch, record) if self.extractors else None)
        else:
            self.pending = self.pool.submit(self._extract, batch, record), batch, record

    def flush(self) -> None:
        """Wait for the batch in flight, if any, and write its shard."""
        if self.pending is not None:
            job, batch, record = self.pending
            self.pending = None
            self.store.write(batch, record, job.result())

    def close(self, failed: bool) -> None:
        """Write the batch in flight (also when sampling failed: a resume keeps it), then stop the thread."""
        try:
            if failed:
                with contextlib.suppress(Exception):  # the sampling error is the one to report
                    self.flush()
            else:
                self.flush()
        finally:
            if self.pool is not None:
                self.pool.shutdown()


def generate_shards(plan: Plan, batches: list[int], progress: bool = True, on_batch: Callable[[int], None] | None = None,
                    rank: int = 0, overlap: bool | None = None) -> dict[int, tuple[np.ndarray, Any]]:
    """Generate ``batches`` and write each as a complete shard (bench.shards) with its samples' features
    (``plan.sample_features``); returns (samples, ShardRecord) by batch index.

    The first ``warmup_batches`` of this process are flagged as warm-up in their records. The global torch RNG is
    seeded per batch (methods draw from per-sample generators; this pins anything else), so a batch is the same
    whichever process makes it and whenever. ``overlap``: extract a batch's features while the next one is sampled
    (default OVERLAP_FEATURES; None: on CUDA); the features are the same bytes either way.
    """
    import torch
    from tqdm.auto import tqdm

    from bench.denoiser import CountingDenoiser, sample_seed, synchronize
    from bench.images import to_uint8
    from bench.runtime import attention_context
    from bench.shards import ShardRecord, ShardStore

    spec = plan.spec
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if overlap is None:
        overlap = device.type == "cuda" if OVERLAP_FEATURES is None else OVERLAP_FEATURES
    writer = _ShardWriter(ShardStore(plan.output, plan.protocol_hash), plan.sample_features if batches else (),
                          device, overlap)
    denoiser = CountingDenoiser(plan.model.unet, device)
    made: dict[int, tuple[None, ShardRecord]] = {}
    total = sum(len(range(*batch_range(spec, k))) for k in batches)
    bar = tqdm(total=total, unit="img", desc=f"{spec.method} {spec.steps} steps", disable=not progress)
    failed = True
    try:
        for n, k in enumerate(batches):
            indices = range(*batch_range(spec, k))
            seeds = [sample_seed(spec.seed, i) for i in indices]
            torch.manual_seed(sample_seed(spec.seed, indices.start))
            denoiser.reset()
            synchronize(device)
            t0 = time.perf_counter()
            with attention_context(spec.attention):
                images = _generate_batch(plan, indices, seeds, denoiser)
            synchronize(device)
            seconds = time.perf_counter() - t0
            record = ShardRecord(batch=k, indices=(indices.start, indices.stop),
                                 protocol_hash=plan.protocol_hash, seconds=seconds, call_seconds=denoiser.call_seconds(),
                                 calls=denoiser.calls, evaluations=denoiser.evaluations, warmup=n < spec.warmup_batches,
                                 peak_memory_bytes=peak_memory(device)[0], rank=rank)
            writer.add(to_uint8(images), record)
            made[k] = None, record  # the samples live in their shard only: memory does not grow with the run
            bar.update(len(seeds))
            if n == 0 and len(batches) > 1:
                warn_if_long(spec, seconds, len(batches))
            if on_batch:
                on_batch(k)
        failed = False
    finally:
        writer.close(failed)
        bar.close()
    return made


def collect(plan: Plan, made: dict[int, tuple[np.ndarray, Any]] | None = None):
    """The run's samples as a ``bench.shards.ShardSamples`` (read from the shards a chunk at a time, never joined
    into one array) and their SamplingTimings, after checking every shard complete on disk (``made``: the
    records of this process's batches; kept for callers). BenchError if a shard is missing or damaged."""
    import torch

    from bench.evaluation import SamplingTimings
    from bench.shards import ShardSamples, ShardStore

    spec, made = plan.spec, made or {}
    store = ShardStore(plan.output, plan.protocol_hash)
    c, h, w = plan.model.sample_shape
    timings = SamplingTimings(memory_source=peak_memory(torch.device(spec.device))[1])
    ranges = []
    for k in range(num_batches(spec)):
        indices = batch_range(spec, k)
        loaded = store.load(k, indices, (h, w, c))  # checks one shard (sidecar, sha256) at a time, then drops it
        if loaded is None:
            raise BenchError(f"sample shard {k} in {store.dir} is missing or damaged; run the command again with --resume")
        _, record = loaded
        ranges.append(indices)
        timings.batch_seconds.append(record.seconds)
        timings.batch_sizes.append(indices[1] - indices[0])
        timings.batch_calls.append(record.calls)
        timings.batch_evaluations.append(record.evaluations)
        timings.call_seconds.append(list(record.call_seconds))
        timings.batch_warmup.append(record.warmup)
        timings.feature_seconds.append(record.feature_seconds)
        timings.peak_memory_bytes = max(timings.peak_memory_bytes, record.peak_memory_bytes)
    return ShardSamples(store, ranges, (h, w, c)), timings


def collect_features(plan: Plan, samples) -> dict[tuple[str, str], Any]:
    """The run's per-sample features (``plan.sample_features``) in index order, by (extractor, layer), for the
    shards of ``samples`` (a ShardSamples from ``collect``: checked complete). Each shard's features file is read
    only if it is the one its sidecar names (sha256); one missing, damaged or of an older run is extracted again
    from the shard's samples (``bench.evaluation.shard_features``, as when streamed), never trusted."""
    import torch

    from bench.evaluation import feature_extractor, shard_features

    features, device = plan.sample_features, torch.device(plan.spec.device)
    parts: dict[tuple[str, str], list[Any]] = {key: [] for key in features}
    extractors: dict[tuple[str, str], Any] = {}  # created on the first shard that needs them
    for k in range(len(samples.ranges) if features else 0):
        stored = samples.store.load_features(k, features)
        if stored is None:
            extractors = extractors or {key: feature_extractor(*key, device) for key in features}
            stored = shard_features(samples.images(k), extractors, device)
        for key, value in stored.items():
            parts[key].append(value)
    return {key: torch.cat(values) for key, values in parts.items()}


def sample(plan: Plan, progress: bool = True, on_batch: Callable[[int], None] | None = None):
    """Generate all samples in one process; returns (uint8 [N, H, W, C], SamplingTimings). The whole array: for
    tests and small runs only (``execute`` reads the shards a chunk at a time)."""
    samples, timings = collect(plan, generate_shards(plan, list(range(num_batches(plan.spec))), progress, on_batch))
    return samples.array(), timings


def samples_digest(samples) -> str:
    """sha256 of the samples' bytes in index order: an array, or a ShardSamples hashed shard by shard."""
    if hasattr(samples, "digest"):
        return samples.digest()
    return hashlib.sha256(np.ascontiguousarray(samples).tobytes()).hexdigest()


def checked_values(metric: Metric, values: dict[str, float]) -> dict[str, float]:
    """A metric's values, refused (BenchError) when it returns a key its ``outputs`` does not declare."""
    extra = undeclared(values, metric.outputs)
    if extra:
        declared = ", ".join(o.key for o in metric.outputs) or "nothing"
        raise BenchError(f"metric {metric.name!r} returned {', '.join(extra)}, which it does not declare in its "
                         f"outputs (it declares: {declared}); add an Output for each key to {type(metric).__name__}.outputs")
    return values


def evaluate(plan: Plan, samples, timings, sample_features: dict[tuple[str, str], Any] | None = None) -> dict[str, float]:
    """The metrics of ``samples``: a ShardSamples (read a chunk at a time) or a uint8 [N, H, W, C] array.
    ``sample_features``: their features already extracted (``collect_features``), by (extractor, layer)."""
    import torch

    from bench.evaluation import EvalContext, metric_threads

    if isinstance(samples, np.ndarray):
        samples = torch.from_numpy(samples).permute(0, 3, 1, 2).contiguous()
    ctx = EvalContext(
        spec=plan.spec,
        samples=samples,
        reference=plan.reference,
        device=torch.device(plan.spec.device),
        timings=timings,
        prompts=[p.text for p in plan.prompts] if plan.prompts is not None else None,
        targets=plan.targets,
        items=plan.items,
        streamed_features=sample_features or {},
        model=plan.model if any(m.needs_model for m in plan.metrics.values()) else None,
    )
    values: dict[str, float] = {}
    with metric_threads():  # the same values whatever the process's thread count (torchrun: one)
        for metric in plan.metrics.values():
            values.update(checked_values(metric, metric.compute(ctx)))
    values["num_samples"] = float(len(samples))
    values["nfe"] = float(np.mean(timings.batch_calls))  # counted denoiser calls per sample, whatever the metrics
    if timings.batch_evaluations and all(timings.batch_evaluations):  # sidecars older than the count have 0
        values["evaluations_per_sample"] = float(sum(timings.batch_evaluations)) / len(samples)
    return values


def save_grid(samples, path: Path, n: int = 64, scale: int = 4) -> None:
    """The first ``n`` samples (an array, or a ShardSamples of which only they are read) as one PNG grid."""
    from PIL import Image

    if hasattr(samples, "chunks"):
        first = next(samples.chunks(n), (0, None))[1]
        samples = first.permute(0, 2, 3, 1).numpy() if first is not None else np.zeros((0, *samples.sample_shape), np.uint8)
    n = min(n, len(samples))
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    h, w, c = samples.shape[1:]
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = samples[i]
    img = Image.fromarray(grid)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path, optimize=False)


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def run_tags(plan: Plan, samples_sha: str | None = None) -> dict[str, str]:
    import diffusers
    import torch

    from bench.catalog import METHODS

    tags = {
        "method": plan.spec.method,
        "paper": METHODS.entry(plan.spec.method).paper,
        "model": plan.model.name,
        "dataset": plan.reference.name,
        "protocol_hash": plan.protocol_hash,
        "eval_protocol_hash": plan.eval_protocol_hash,
        "embedded": str(plan.reference.embedded and plan.model.embedded).lower(),
        "device": plan.spec.device,
        "device_name": device_name(plan.spec.device),
        "diffbench_git_sha": git_sha(),
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "diffbench_pid": str(os.getpid()),  # `bench runs --repair` ends a RUNNING run whose process is gone
        "diffbench_host": platform.node(),
    }
    if samples_sha:
        tags["samples_sha256"] = samples_sha
    return tags


def execute(plan: Plan, tracker, progress: bool = True, extra_tags: dict[str, str] | None = None,
            resume: bool = False, shards: Shards | None = None) -> RunResult | None:
    """The run's whole lifecycle: prepare, sample, evaluate, record; sharded or not, fresh or resumed.

    Every process generates its batches (``shards``: bench.distributed.Shards; one process by default) as shards
    in the output folder. Rank 0 alone writes the run's files and holds the MLflow run: it waits for the other
    processes, evaluates all samples once and ends the run, FAILED if anything raises (KILLED on Ctrl-C or
    SIGTERM); shards stay on disk. The other ranks return None. With ``resume`` the complete shards of the folder
    are kept, only the others generated, and the MLflow run recorded in the folder (run.json) is reopened.

    If the tracking store stops answering mid-run, the results stay in the output folder
    with the run's record (PENDING_RECORD) for `bench sync`; the run still succeeds.
    """
    shards = shards or Shards()
    with output_lock(plan.output) if shards.lead else contextlib.nullcontext():  # rank 0 holds it for all
        return _execute(plan, tracker, progress, extra_tags, resume, shards)


def _execute(plan: Plan, tracker, progress: bool, extra_tags: dict[str, str] | None, resume: bool,
             shards: Shards) -> RunResult | None:
    import shutil
    import sys
    from contextlib import nullcontext

    from bench.shards import ShardStore

    out = plan.output
    state = _run_state(plan, resume)
    store = ShardStore(out, plan.protocol_hash)
    c, h, w = plan.model.sample_shape
    batches = range(num_batches(plan.spec))
    checked = batches if shards.lead else shards.mine(batches)  # rank 0 counts every reused shard
    reused = {k for k in checked if resume and store.load(k, batch_range(plan.spec, k), (h, w, c))}
    todo = [k for k in shards.mine(batches) if k not in reused]
    if shards.lead:
        _start_folder(plan, state, store, resume)
    shards.barrier()  # a fresh run's folder is clean before any process writes to it
    with _open_run(plan, tracker, state, extra_tags) if shards.lead else nullcontext() as tracked:
        budget = _prepare(plan, shards, state, tracked, needed=bool(todo))
        made = generate_shards(plan, todo, progress and shards.lead, rank=shards.rank)
        shards.barrier()  # every shard is on disk
        if not shards.lead:
            return None
        after_last_batch = time.perf_counter()
        shutil.rmtree(out / ".ranks", ignore_errors=True)  # the other processes' copies of the method's workdir
        samples, timings = collect(plan, made)
        digest = samples_digest(samples)
        save_grid(samples, out / "grid.png")
        values = {**budget, **evaluate(plan, samples, timings, collect_features(plan, samples))}
        values["metric_seconds"] = time.perf_counter() - after_last_batch  # what is left once the last shard is made
        values["streamed_feature_seconds"] = sum(timings.feature_seconds)  # metric work done while sampling
        result = {"values": values, "samples_sha256": digest, "run_id": tracked.run_id,
                  "protocol_hash": plan.protocol_hash, "eval_protocol_hash": plan.eval_protocol_hash}
        (out / "results.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        tracked.log_metrics(values)
        tracked.set_tags({"samples_sha256": digest, "output": str(out.resolve()), "processes": str(shards.world_size)})
        for artifact in ("grid.png", "config.json", "results.json"):
            tracked.log_artifact(out / artifact)
        method_dir = out / "method"
        for artifact in sorted(method_dir.rglob("*")) if method_dir.is_dir() else ():
            if artifact.is_file():
                tracked.log_artifact(artifact, str(Path("method") / artifact.parent.relative_to(method_dir)))
    if tracked.offline:
        spooled = tracked.spool(out)
        print(f"bench: warning: the MLflow store {tracker.uri} stopped answering ({tracked.error}); the results are "
              f"kept in {out} ({spooled.name}); upload them with `bench sync --output-root {out.parent}`",
              file=sys.stderr, flush=True)
    extra = {"processes": shards.world_size, "shards": len(batches), "reused_shards": len(reused)}
    return RunResult(plan, values, out, digest, None if tracked.offline else tracked.run_id, extra)


def _run_state(plan: Plan, resume: bool) -> dict[str, Any]:
    """The folder's run state to resume (refused if it is another protocol's), or a new one."""
    import uuid

    from bench.shards import run_state

    state = run_state(plan.output) if resume else None
    if state is None:  # also --resume of a run killed before it wrote anything: start it
        return {"protocol_hash": plan.protocol_hash, "attempt": uuid.uuid4().hex, "run_id": None, "budget": None}
    if state.get("protocol_hash") != plan.protocol_hash:
        raise BenchError(f"{plan.output} holds a run of protocol {str(state.get('protocol_hash'))[:12]}, not this "
                         f"command's {plan.protocol_hash[:12]}: refusing to resume it (pass another --output, or "
                         f"leave out --resume to replace it)")
    return state


def _start_folder(plan: Plan, state: dict[str, Any], store, resume: bool) -> None:
    """Rank 0: the run state first (what --resume needs), then the config; a fresh run clears old shards."""
    from bench.shards import save_run_state
    from bench.tracking import PENDING_RECORD

    out = plan.output
    if resume:
        store.remove_temporaries()
    else:
        store.clear()
    save_run_state(out, state)
    config = {"spec": plan.spec.to_dict(), "protocol": plan.protocol, "protocol_hash": plan.protocol_hash,
              "eval_protocol_hash": plan.eval_protocol_hash}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    (out / PENDING_RECORD).unlink(missing_ok=True)  # a rerun into the same folder replaces its record


@contextlib.contextmanager
def _open_run(plan: Plan, tracker, state: dict[str, Any], extra_tags: dict[str, str] | None):
    """Rank 0's MLflow run: new, or the one of the run being resumed, set RUNNING again.

    The run is tagged with the attempt id of run.json before its id is saved there, so a run killed between the
    two is still found (by the tag) and reopened, never duplicated.
    """
    from bench.shards import save_run_state

    name = plan.spec.run_name or f"{plan.spec.method}-{plan.spec.steps}steps-seed{plan.spec.seed}"
    params = {"spec": plan.spec.to_dict(), "protocol": {k: v for k, v in plan.protocol.items() if k != "spec"}}
    tags = {**run_tags(plan), **(extra_tags or {}), "diffbench_attempt": state["attempt"]}
    run_id = state.get("run_id")
    if state.get("tracking_uri", tracker.uri) != tracker.uri:
        raise BenchError(f"this run is recorded in the MLflow store {state['tracking_uri']}; resume it with "
                         f"--tracking-uri {state['tracking_uri']}")
    if run_id is None and state.get("tracking_uri"):  # resumed, killed before its run id was saved
        run_id = tracker.find_run("diffbench_attempt", state["attempt"])
    if run_id is not None:
        tracker.check_run(run_id)
        tags["resumed"] = "true"
    state["tracking_uri"] = tracker.uri
    save_run_state(plan.output, state)
    with tracker.run(name, params, tags, run_id=run_id) as tracked:
        if tracked.run_id and tracked.run_id != state["run_id"]:
            state["run_id"] = tracked.run_id
            save_run_state(plan.output, state)
        yield tracked


def _prepare(plan: Plan, shards, state: dict[str, Any], tracked, needed: bool) -> dict[str, float]:
    """Method.prepare (fit the method) before sampling; returns the training budget (rank 0).

    Rank 0 fits into the run's workdir (output/method) first; then every other process calls prepare on a copy of
    that folder, so a method that finds its saved result there can load it instead of fitting again (one that
    does not fits again, deterministically). On --resume prepare runs again for the same reason (the fitted state
    lives in memory), unless this process has no batch left to make, and the budget of the first attempt is kept.
    """
    import shutil

    import torch

    torch.manual_seed(plan.spec.seed)  # a fit drawing from the global RNG is the same in every process
    workdir = plan.output / "method"
    budget: dict[str, float] = {}
    if shards.lead and (needed or state.get("budget") is None):
        budget = {k: float(v) for k, v in plan.method.prepare(plan.model, plan.spec, workdir).items()}
    if shards.lead:
        from bench.shards import save_run_state

        if state.get("budget") is None:
            state["budget"] = budget
            save_run_state(plan.output, state)
        budget = state["budget"]
        if budget:
            tracked.log_metrics(budget)  # logged now: a crash while sampling keeps the training record
    shards.barrier()
    if not shards.lead and needed:
        private = plan.output / ".ranks" / str(shards.rank) / "method"
        shutil.rmtree(private, ignore_errors=True)
        if workdir.is_dir():
            shutil.copytree(workdir, private)
        plan.method.prepare(plan.model, plan.spec, private)
    return budget
