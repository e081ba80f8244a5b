"""What a metric outputs: each value's key, label, direction, number format, protocol family and tolerance.

A metric declares its ``outputs`` (``Metric.outputs``); the leaderboard, sweep, nightly, CLI and report read
them through ``lookup`` instead of keeping tables of their own. ``lookup(key)`` scans the metric registry lazily:
the metrics already loaded first, then the registered ones in order, importing a metric's module only when the
key was not found among those loaded before it. The run's own values (NFE, sample count, a method's training
budget) are declared here (``RUN_OUTPUTS``).

A key ``K/part`` (e.g. ``bg_psnr/color``, an editing value per edit type) is a breakdown of ``K`` and shares its
declaration. A declared key ending in ``*`` declares a family of keys by prefix (``attr_acc_*``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

from bench.catalog import METRICS

DIRECTIONS = ("lower", "higher", "none")


@dataclass(frozen=True)
class Output:
    """One value a metric computes."""

    key: str  # the MLflow metric key; a trailing "*" declares a family of keys by prefix (e.g. "attr_acc_*")
    label: str  # what a table's column says, naming the network that computed it on the embedded world
    direction: str = "lower"  # "lower" / "higher" is better; "none": not ranked (a count, a spread)
    fmt: str = ".3f"  # format spec of a table cell
    family: str | None = None  # the protocol family (params protocol.metrics.<family>.*) that defines the value
    tolerance: float | None = 0.05  # nightly's default relative regression tolerance; None: not checked
    scale: float = 1.0  # a table shows value x scale (KID x 1e3); the label says so

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"output {self.key!r}: direction {self.direction!r} is not one of {DIRECTIONS}")

    def matches(self, key: str) -> bool:
        base = key.split("/", 1)[0]  # "bg_psnr/color": bg_psnr per edit type
        return base.startswith(self.key[:-1]) if self.key.endswith("*") else base == self.key

    @property
    def lower_is_better(self) -> bool:
        return self.direction != "higher"

    def format(self, value: float) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return format(value * self.scale, self.fmt)


# values every run records whatever its metrics (bench.runner), and the training budget of methods that fit
RUN_OUTPUTS: tuple[Output, ...] = (
    Output("nfe", "NFE", "lower", "g", "nfe", 0.0),  # counted, whatever the protocol: nothing to match
    # network evaluations per sample: CFG's batched [uncond; cond] call counts twice (Meng et al. 2023's "half the
    # NFE" of a guidance-distilled student), where nfe counts the call once
    Output("evaluations_per_sample", "evaluations / sample", "lower", "g", "nfe", 0.0),
    Output("num_samples", "samples", "none", ".0f", None, None),
    Output("metric_seconds", "metric phase s (after the last batch)", "lower", ".2f", "latency", None),
    Output("streamed_feature_seconds", "feature extraction s (while sampling)", "lower", ".2f", "latency", None),
    Output("train_steps", "training steps", "none", ".0f", None, None),
    Output("train_params", "trained params", "none", ",.0f", None, None),
    Output("train_seconds", "training s", "lower", ".1f", None, None),
    Output("train_peak_memory_bytes", "training peak bytes", "lower", ".3g", None, None),
    Output("train_saved_bytes", "saved bytes", "lower", ".3g", None, None),
    Output("train_*", "training", "none", ".3g", None, None),
    # flow-euler --straightness-probe (Liu et al. 2023): 0 for a straight path
    Output("path_straightness", "path straightness (0 = straight)", "lower", ".4f", None, None),
    # a method trained once for every subject (InstantBooth's encoders, HyperDreamBooth's HyperNetwork): that one-time budget, beside the per-run one
    Output("pretrain_seconds", "pre-training s (once)", "lower", ".1f", None, None),
    Output("pretrain_steps", "pre-training steps (once)", "none", ".0f", None, None),
    Output("pretrain_*", "pre-training", "none", ".3g", None, None),
    Output("prior_drift", "prior drift (FID, before vs after)", "lower", ".3f", None, None),
    Output("prior_*", "prior", "none", ".3f", None, None),
)

_found: dict[str, Output | None] = {}


def find(key: str, outputs: Iterable[Output]) -> Output | None:
    """The declaration of ``key`` among ``outputs``: an exact key first, then a prefix family."""
    outputs = list(outputs)
    base = key.split("/", 1)[0]
    exact = next((o for o in outputs if o.key == base), None)
    return exact or next((o for o in outputs if o.matches(key)), None)


def _metric_classes() -> Iterator[type]:
    """Metric classes: the loaded ones first, then the registry's entries in order (imported one by one)."""
    loaded = dict(METRICS._loaded)
    yield from loaded.values()
    for entry in METRICS.entries():
        if entry.name in loaded:
            continue
        try:
            yield METRICS.get(entry.name)
        except Exception:
            if entry.source == "builtin":
                raise
            continue  # a plugin that does not import here declares nothing


def lookup(key: str) -> Output | None:
    """The declaration of a value's ``key`` (a metric's or the run's); None when nothing declares it."""
    if key in _found:
        return _found[key]
    found = find(key, RUN_OUTPUTS)
    if found is None or found.key.endswith("*"):
        for cls in _metric_classes():
            hit = find(key, getattr(cls, "outputs", ()))
            if hit is not None and (found is None or not hit.key.endswith("*")):
                found = hit
                break
    if found is not None:  # an undeclared key is looked for again: a metric may be registered since
        _found[key] = found
    return found


def lower_is_better(key: str) -> bool:
    """Ranking direction of a key: its declaration's, lower when undeclared."""
    out = lookup(key)
    return out is None or out.lower_is_better


def label(key: str) -> str:
    out = lookup(key)
    return out.label if out is not None and not out.key.endswith("*") else key


def family(key: str) -> str | None:
    out = lookup(key)
    return out.family if out is not None else None


def format_ci(key: str, mean: float, half: float | None = None) -> str:
    """``mean +- half`` in the key's declared format and scale (``mean`` alone without an interval)."""
    out = lookup(key) or Output(key, key)
    if half is None or (isinstance(half, float) and math.isnan(half)) or out.format(mean) == "-":
        return out.format(mean)
    return f"{out.format(mean)} +- {out.format(half)}"


def tolerance(key: str) -> float | None:
    out = lookup(key)
    return out.tolerance if out is not None else None


def undeclared(keys: Iterable[str], outputs: Iterable[Output]) -> list[str]:
    """The keys that ``outputs`` does not declare (a metric returning one is refused by the runner)."""
    outputs = list(outputs)
    return sorted(k for k in keys if find(k, outputs) is None)


def clear_cache() -> None:
    """Forget looked-up keys (after replacing a metric's declarations)."""
    _found.clear()
