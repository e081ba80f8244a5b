"""Plan a run (resolve and validate everything, no sampling), then execute it.

Planning fails with one line on any bad input before the MLflow run exists.
Execution samples in batches with per-sample seeds, writes each batch as an
atomic shard, computes the metrics once over all samples, and records the run.
"""

from __future__ import annotations

import dataclasses
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

from bench.errors import BenchError
from bench.interfaces import DiffusionModel, Method, Metric, Prompt, ReferenceSet
from bench.spec import RunSpec, stable_hash

SHARD_PATTERN = "shard-{:05d}.npy"


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

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return self.protocol["method"].get("scheduler", {})


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


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise BenchError(f"output folder {folder} is not writable: {exc.strerror or exc}") from None


def plan_run(spec: RunSpec) -> Plan:
    """Resolve names, load the model, validate the combination. Raises BenchError on bad input."""
    import torch

    from bench.catalog import METHODS, METRICS
    from bench.datasets import load_dataset
    from bench.models import load_model
    from bench.spec import DEFAULT_METRICS

    method_cls = METHODS.get(spec.method)
    args = method_cls.parse_args(spec.method_args)
    # a text-conditioned method on the default (prompt-less) data set runs on its own default data set instead
    dataset_name = spec.dataset
    if method_cls.default_dataset and dataset_name == RunSpec.dataset:
        dataset_name = method_cls.default_dataset
    reference = load_dataset(dataset_name)
    metric_names = spec.metrics
    if reference.default_metrics and tuple(metric_names) == DEFAULT_METRICS:  # the data set's defaults
        metric_names = tuple(reference.default_metrics)
    metric_classes = {name: METRICS.get(name) for name in metric_names}
    for name, metric_cls in metric_classes.items():
        if metric_cls.needs_prompts and not method_cls.text_conditioned:
            raise BenchError(f"metric {name} needs prompts; method {spec.method!r} is not text-conditioned")
    device = resolve_device(spec.device)
    model_name = spec.model or reference.default_model
    spec = spec.replace(model=model_name, device=str(device), method_args=dataclasses.asdict(args),
                        dataset=dataset_name, metrics=metric_names)
    metrics = {name: cls() for name, cls in metric_classes.items()}
    for metric in metrics.values():
        metric.check(spec, reference)
    reference.preflight()

    model = load_model(model_name)
    method = method_cls(args)
    method.check(model, spec.steps)
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
    prompts, targets = _prompts_and_targets(spec, method, reference, metrics)

    method_protocol: dict[str, Any] = {"name": method.name, "args": spec.method_args}
    if hasattr(method, "resolved_config"):
        method_protocol["scheduler"] = method.resolved_config(model)
    if hasattr(method, "extra_protocol"):  # e.g. the guidance classifier's weights digest
        method_protocol.update(method.extra_protocol(model))
    eval_protocol = {name: m.protocol(spec, reference) for name, m in metrics.items()}
    protocol = {
        "spec": spec.hashed_fields(),
        "method": method_protocol,
        "model": model.identity(),
        "metrics": eval_protocol,
        "seeding": "per-sample sha256(run seed, index); initial noise drawn on the CPU in float32",
    }
    if prompts is not None:
        protocol["prompts"] = {"dataset": reference.prompts_identity(), "assignment": "prompt i for sample i",
                               "texts_sha256": stable_hash([p.text for p in prompts], 64)}
    protocol_hash = stable_hash(protocol)
    output = Path(spec.output) if spec.output else Path("bench-runs") / f"{spec.method}-{protocol_hash[:12]}"
    check_writable(output)
    return Plan(spec, method, model, reference, metrics, output, protocol, protocol_hash, stable_hash(eval_protocol),
                prompts, targets)


def _prompts_and_targets(spec: RunSpec, method: Method, reference: ReferenceSet, metrics: dict[str, Metric]):
    """The prompt of every sample (text-conditioned methods) and what each sample should show (for metrics)."""
    prompts = reference.prompts(spec.num_samples) if method.text_conditioned else None
    if method.text_conditioned and prompts is None:
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


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def to_uint8(images) -> np.ndarray:
    """[-1, 1] float [B, C, H, W] -> uint8 [B, H, W, C], rounding as diffusers' numpy_to_pil does."""
    import torch

    x = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
    return (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def sample(plan: Plan, progress: bool = True, on_batch: Callable[[int], None] | None = None):
    """Generate all samples in batches; returns (uint8 [N, H, W, C], SamplingTimings)."""
    import torch
    from tqdm.auto import tqdm

    from bench.denoiser import CountingDenoiser, sample_seed, synchronize
    from bench.evaluation import SamplingTimings

    spec = plan.spec
    device = torch.device(spec.device)
    torch.manual_seed(spec.seed)  # methods draw from per-sample generators; this pins anything else
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    shard_dir = plan.output / "samples"
    shard_dir.mkdir(parents=True, exist_ok=True)
    denoiser = CountingDenoiser(plan.model.unet, device)
    timings = SamplingTimings()
    shards = []
    starts = range(0, spec.num_samples, spec.batch_size)
    bar = tqdm(total=spec.num_samples, unit="img", desc=f"{spec.method} {spec.steps} steps", disable=not progress)
    for k, start in enumerate(starts):
        indices = range(start, min(start + spec.batch_size, spec.num_samples))
        seeds = [sample_seed(spec.seed, i) for i in indices]
        denoiser.reset()
        synchronize(device)
        t0 = time.perf_counter()
        if plan.prompts is not None:  # sample i gets prompt i and seed i, whatever the batching
            images = plan.method.generate(plan.model, seeds, spec.steps, denoiser, [plan.prompts[i].text for i in indices])
        else:
            images = plan.method.generate(plan.model, seeds, spec.steps, denoiser)
        synchronize(device)
        timings.batch_seconds.append(time.perf_counter() - t0)
        timings.batch_sizes.append(len(seeds))
        timings.batch_calls.append(denoiser.calls)
        timings.call_seconds.append(denoiser.call_seconds())
        batch = to_uint8(images)
        _atomic_save(shard_dir / SHARD_PATTERN.format(k), batch)
        shards.append(batch)
        bar.update(len(seeds))
        if on_batch:
            on_batch(k)
    bar.close()
    if device.type == "cuda":
        timings.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
        timings.memory_source = "cuda max_memory_allocated"
    else:
        timings.peak_memory_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        timings.memory_source = "process max RSS"
    return np.concatenate(shards), timings


def samples_digest(samples: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(samples).tobytes()).hexdigest()


def evaluate(plan: Plan, samples: np.ndarray, timings) -> dict[str, float]:
    import torch

    from bench.evaluation import EvalContext

    ctx = EvalContext(
        spec=plan.spec,
        samples=torch.from_numpy(samples).permute(0, 3, 1, 2).contiguous(),
        reference=plan.reference,
        device=torch.device(plan.spec.device),
        timings=timings,
        prompts=[p.text for p in plan.prompts] if plan.prompts is not None else None,
        targets=plan.targets,
    )
    values: dict[str, float] = {}
    for metric in plan.metrics.values():
        values.update(metric.compute(ctx))
    values["num_samples"] = float(len(samples))
    values["nfe"] = float(np.mean(timings.batch_calls))  # counted denoiser calls per sample, whatever the metrics
    return values


def save_grid(samples: np.ndarray, path: Path, n: int = 64, scale: int = 4) -> None:
    from PIL import Image

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
    }
    if samples_sha:
        tags["samples_sha256"] = samples_sha
    return tags


def execute(plan: Plan, tracker, progress: bool = True, extra_tags: dict[str, str] | None = None) -> RunResult:
    """Sample, evaluate, record. The MLflow run ends FAILED if anything raises; shards stay on disk.

    If the tracking store stops answering mid-run, the results stay in the output folder
    with the run's record (PENDING_RECORD) for `bench sync`; the run still succeeds.
    """
    import sys

    from bench.tracking import PENDING_RECORD

    out = plan.output
    config = {"spec": plan.spec.to_dict(), "protocol": plan.protocol, "protocol_hash": plan.protocol_hash,
              "eval_protocol_hash": plan.eval_protocol_hash}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    (out / PENDING_RECORD).unlink(missing_ok=True)  # a rerun into the same folder replaces its record
    name = plan.spec.run_name or f"{plan.spec.method}-{plan.spec.steps}steps-seed{plan.spec.seed}"
    params = {"spec": plan.spec.to_dict(), "protocol": {k: v for k, v in plan.protocol.items() if k != "spec"}}
    with tracker.run(name, params, {**run_tags(plan), **(extra_tags or {})}) as tracked:
        samples, timings = sample(plan, progress=progress)
        digest = samples_digest(samples)
        save_grid(samples, out / "grid.png")
        values = evaluate(plan, samples, timings)
        result = {"values": values, "samples_sha256": digest, "run_id": tracked.run_id,
                  "protocol_hash": plan.protocol_hash, "eval_protocol_hash": plan.eval_protocol_hash}
        (out / "results.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        tracked.log_metrics(values)
        tracked.set_tags({"samples_sha256": digest, "output": str(out.resolve())})
        for artifact in ("grid.png", "config.json", "results.json"):
            tracked.log_artifact(out / artifact)
    if tracked.offline:
        spooled = tracked.spool(out)
        print(f"bench: warning: the MLflow store {tracker.uri} stopped answering ({tracked.error}); the results are "
              f"kept in {out} ({spooled.name}); upload them with `bench sync --output-root {out.parent}`",
              file=sys.stderr, flush=True)
        return RunResult(plan, values, out, digest, None)
    return RunResult(plan, values, out, digest, tracked.run_id)
