"""Grids of runs (methods x steps x seeds x method options) and their summary over seeds.

A grid comes from the command line (``--method a,b --steps 5,10 --seeds 3``) or
from a suite file (YAML) of the same shape::

    name: foundation
    defaults: {num_samples: 1000}          # RunSpec fields for every cell
    seeds: [0, 1, 2]
    grid:
      - {method: ddim, steps: [5, 10, 20, 50]}
      - {method: ddim, steps: [50], method_args: {eta: 1.0}}
      - {method: ddpm, steps: [1000], seeds: 1}  # an entry may set its own seeds

Every cell is one ``bench run`` (one MLflow run, tagged with the sweep's name);
the summary is a pandas table with the mean and a 95% t-interval over seeds.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from bench.errors import BenchError
from bench.spec import FIELD_NAMES, RunSpec, canonical_json, stable_hash

SUMMARY_METRICS = ("fid", "kid_mean", "latency_per_image_ms", "nfe")


@dataclass(frozen=True)
class Cell:
    method: str
    steps: int
    seed: int
    method_args: Mapping[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in sorted(self.method_args.items()))
        return f"{self.method}({args})" if args else self.method


@dataclass
class Suite:
    name: str
    defaults: dict[str, Any]
    cells: list[Cell]


def grid_cells(entries: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> list[Cell]:
    cells = []
    for entry in entries:
        unknown = set(entry) - {"method", "steps", "method_args", "seeds"}
        if unknown or "method" not in entry or "steps" not in entry:
            raise BenchError(f"grid entry {dict(entry)} takes method, steps and optionally method_args and seeds")
        methods = entry["method"] if isinstance(entry["method"], list) else [entry["method"]]
        steps = entry["steps"] if isinstance(entry["steps"], list) else [entry["steps"]]
        entry_seeds = entry.get("seeds", seeds)
        entry_seeds = range(entry_seeds) if isinstance(entry_seeds, int) else entry_seeds
        for method, n, seed in itertools.product(methods, steps, entry_seeds):
            cells.append(Cell(str(method), int(n), int(seed), dict(entry.get("method_args") or {})))
    return cells


def load_suite(path: str | Path) -> Suite:
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise BenchError(f"cannot read suite {p}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise BenchError(f"suite {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or "grid" not in data:
        raise BenchError(f"suite {p} must be a mapping with a 'grid' list")
    defaults = dict(data.get("defaults") or {})
    bad = set(defaults) - set(FIELD_NAMES)
    if bad:
        raise BenchError(f"suite {p}: unknown run fields in defaults: {sorted(bad)}")
    seeds = data.get("seeds", [0])
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    return Suite(str(data.get("name", p.stem)), defaults, grid_cells(data["grid"], seeds))


def cell_spec(base: RunSpec, cell: Cell, sweep_name: str) -> RunSpec:
    return base.replace(
        method=cell.method,
        steps=cell.steps,
        seed=cell.seed,
        method_args={**base.method_args, **cell.method_args},
        run_name=f"{sweep_name}:{cell.label()}-{cell.steps}steps-seed{cell.seed}",
        output=None,
    )


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the t-interval (half-width NaN for one value)."""
    import numpy as np
    from scipy import stats

    x = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    if len(x) == 1:
        return float(x[0]), float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half)


def summarize(rows: list[dict[str, Any]], metrics: Sequence[str] = SUMMARY_METRICS):
    """One row per (method configuration, steps): mean and 95% CI over seeds of each metric."""
    import pandas as pd

    df = pd.DataFrame(rows)
    out = []
    for (label, steps), group in df.groupby(["config", "steps"], sort=False):
        row: dict[str, Any] = {"config": label, "steps": steps, "seeds": len(group)}
        for m in metrics:
            if m in group:
                mean, half = t_interval(group[m].tolist())
                row[m] = mean
                row[f"{m}_ci95"] = half
        out.append(row)
    return pd.DataFrame(out)


def format_table(summary, metrics: Sequence[str] = SUMMARY_METRICS) -> str:
    """A markdown table: value +- CI half-width (no interval with one seed)."""
    headers = ["method", "steps", "NFE", "seeds"] + [m for m in metrics if m in summary and m != "nfe"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for _, r in summary.iterrows():
        cells = [str(r["config"]), str(int(r["steps"])), f"{r.get('nfe', float('nan')):g}", str(int(r["seeds"]))]
        for m in headers[4:]:
            scale = 1e3 if m == "kid_mean" else 1.0
            v, h = r[m] * scale, r.get(f"{m}_ci95", float("nan")) * scale
            cells.append(f"{v:.3f}" if math.isnan(h) else f"{v:.3f} +- {h:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines[0] = lines[0].replace("kid_mean", "KID x 1e3").replace("latency_per_image_ms", "ms / image").replace("fid", "FID")
    return "\n".join(lines)


def plot_fid_vs_nfe(summary, path: Path, title: str, metric: str = "fid") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, group in summary.groupby("config", sort=False):
        group = group.sort_values("nfe")
        err = group.get(f"{metric}_ci95")
        ax.errorbar(group["nfe"], group[metric], yerr=None if err is None or err.isna().all() else err,
                    marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("NFE (denoiser calls per sample, counted)")
    ax.set_ylabel(metric.upper() if metric == "fid" else metric)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sweep_id(base: RunSpec, cells: Sequence[Cell]) -> str:
    return stable_hash({"base": base.hashed_fields(), "cells": [canonical_json(c.__dict__) for c in cells]}, 10)
