"""The typed run specification: one precedence rule, CLI > file > defaults.

Everything that can change a number lives here (or is derived from it and the
loaded artifacts) and goes into the protocol hash; the fields that only say
where things go (output folder, experiment, run name) do not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from bench.errors import BenchError

DEFAULT_METRICS = ("fid", "kid", "latency", "memory")
DEFAULT_DATASET = "shapes16"
DEFAULT_NUM_SAMPLES = 1000
DTYPES = ("float32", "float16", "bfloat16")
NOT_HASHED = frozenset({"output", "experiment", "run_name"})
MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64 bits; sample seeds are 63-bit (bench.denoiser.sample_seed)
MAX_CONFIG_BYTES = 1 << 20  # a run, suite or record file larger than this is not one
MAX_EXPERIMENT_NAME = 256  # MLflow's SQL stores keep experiment names of at most 256 characters


def read_small_file(path: str | Path, what: str, limit: int = MAX_CONFIG_BYTES) -> str:
    """The text of a regular file of at most ``limit`` bytes; one line (BenchError) for anything else.

    ``/dev/zero``, ``/dev/urandom``, a FIFO or a folder are refused before a byte is read (they never end, or
    block); a regular file is read to at most ``limit`` + 1 bytes.
    """
    import stat

    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise BenchError(f"cannot read {what} {p}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise BenchError(f"{what} {p} is {kind}; pass a YAML or JSON file")
    if st.st_size > limit:
        raise BenchError(f"{what} {p} is {st.st_size:,} bytes; a {what} is at most {limit:,} bytes")
    try:
        with open(p, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise BenchError(f"cannot read {what} {p}: {exc.strerror}") from None
    if len(data) > limit:
        raise BenchError(f"{what} {p} is over {limit:,} bytes; a {what} is at most {limit:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BenchError(f"{what} {p} is not UTF-8 text") from None


@dataclass(frozen=True)
class RunSpec:
    """One run: a method on a model, evaluated against a data set's reference set."""

    method: str = "ddim"
    method_args: Mapping[str, Any] = field(default_factory=dict)
    model: str | None = None  # None: the data set's default model
    dataset: str | None = None  # None: the method's default data set (text-to-image: shapes32), else shapes16
    steps: int = 50
    num_samples: int | None = None  # None: the data set's default count (shapes32: 256), else 1000
    seed: int = 0
    batch_size: int = 250
    device: str = "auto"  # "auto": cuda if available, else cpu
    dtype: str = "float32"
    metrics: tuple[str, ...] | None = None  # None: the data set's default metrics, else DEFAULT_METRICS
    warmup_batches: int = 1  # batches whose timings the latency statistics leave out (per process)
    attention: str = "sdpa"  # attention kernel of the denoiser (bench.runtime.ATTENTION)
    compile: bool = False  # torch.compile the denoiser
    channels_last: bool = False  # the denoiser in channels-last memory format
    output: str | None = None  # None: bench-runs/<method>-<protocol hash>
    experiment: str = "diffbench"
    run_name: str | None = None

    def __post_init__(self) -> None:
        def text(name: str, value: Any, optional: bool = False) -> None:
            if (value is None and optional) or (isinstance(value, str) and value.strip()):
                return
            raise BenchError(f"{name} must be a {'name' if not optional else 'name or null'}, got {value!r}")

        text("method", self.method)
        for name in ("model", "dataset", "output", "run_name"):
            text(name, getattr(self, name), optional=True)
        text("experiment", self.experiment)
        text("device", self.device)
        if len(self.experiment) > MAX_EXPERIMENT_NAME:
            raise BenchError(f"experiment name is {len(self.experiment)} characters; MLflow takes at most "
                             f"{MAX_EXPERIMENT_NAME}")
        if not isinstance(self.method_args, Mapping) or not all(isinstance(k, str) for k in self.method_args):
            raise BenchError(f"method_args must be a mapping of option names to values, got {self.method_args!r}")

        def positive(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BenchError(f"{name} must be a positive integer, got {value!r}")

        positive("steps", self.steps)
        if self.num_samples is not None:
            positive("num_samples", self.num_samples)
        positive("batch_size", self.batch_size)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise BenchError(f"seed must be an integer in [0, 2**63 - 1], got {self.seed!r}")
        if isinstance(self.warmup_batches, bool) or not isinstance(self.warmup_batches, int) or self.warmup_batches < 0:
            raise BenchError(f"warmup_batches must be a non-negative integer, got {self.warmup_batches!r}")
        from bench.runtime import ATTENTION

        if self.attention not in ATTENTION:
            raise BenchError(f"attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")
        for name in ("compile", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise BenchError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.dtype not in DTYPES:
            raise BenchError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda", "mps")
                or (self.device.startswith("cuda:") and self.device[5:].isdigit() and self.device[5:].isascii())):
            raise BenchError(f"device must be auto, cpu, cuda, cuda:N (N = 0, 1, ...) or mps, got {self.device!r}")
        if self.metrics is not None:
            if isinstance(self.metrics, str) or not isinstance(self.metrics, (list, tuple)) or not all(
                    isinstance(m, str) and m for m in self.metrics):
                raise BenchError(f"metrics must be a list of metric names, got {self.metrics!r}")
            if not self.metrics:
                raise BenchError("at least one metric is needed")
            object.__setattr__(self, "metrics", tuple(self.metrics))
        object.__setattr__(self, "method_args", dict(self.method_args))

    def replace(self, **changes: Any) -> "RunSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["metrics"] = None if self.metrics is None else list(self.metrics)
        out["method_args"] = dict(self.method_args)
        return out

    def hashed_fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in NOT_HASHED}


FIELD_NAMES = tuple(f.name for f in fields(RunSpec))


def load_spec_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file of RunSpec fields (the middle layer of the precedence rule)."""
    import yaml

    p = Path(path)
    text = read_small_file(p, "config file")
    try:
        data = yaml.safe_load(text) if p.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise BenchError(f"config file {p} is not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'}: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise BenchError(f"config file {p} must hold a mapping of run fields")
    unknown = sorted(set(data) - set(FIELD_NAMES))
    if unknown:
        raise BenchError(f"config file {p} has unknown fields {unknown}; known: {', '.join(FIELD_NAMES)}")
    return data


def resolve_spec(cli: Mapping[str, Any], file_values: Mapping[str, Any] | None = None) -> RunSpec:
    """CLI values (None = not given) override file values, which override the defaults."""
    merged: dict[str, Any] = dict(file_values or {})
    if not isinstance(merged.get("method_args", {}), Mapping):
        raise BenchError(f"method_args must be a mapping of option names to values, got {merged['method_args']!r}")
    for key, value in cli.items():
        if value is None:
            continue
        if key == "method_args":
            merged["method_args"] = {**merged.get("method_args", {}), **value}
        else:
            merged[key] = value
    if "metrics" in merged and isinstance(merged["metrics"], str):
        merged["metrics"] = tuple(m.strip() for m in merged["metrics"].split(",") if m.strip())
    try:
        return RunSpec(**merged)
    except TypeError as exc:  # wrong field types from a file
        raise BenchError(f"invalid run specification: {exc}") from None


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def stable_hash(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]
