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
      - {name: ddim-fast, method: ddim, steps: 10}  # a named cell: one method, one step count
    executor: {retries: 3, slurm: {partition: gpu, gpus_per_node: 1, time: 60}}  # optional (bench/executors.py)

Every cell is one ``bench run`` (one MLflow run, tagged with the sweep's name and
the cell's key); the summary is a pandas table with the mean and a 95% t-interval
over seeds. A cell's key is its ``name`` if the entry has one, else
``<method(args)>-<steps>steps``: baselines (bench/nightly.py) are keyed by it, so
a named cell whose configuration changes is still compared with its old numbers.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from bench import outputs
from bench.errors import BenchError
from bench.render import md_table
from bench.spec import FIELD_NAMES, RunSpec, canonical_json, stable_hash

# The summary's columns (a column shows when the first run has it); their labels and formats are the metrics'
# declarations (bench.outputs). feedback_accuracy, reward, human_approval, train_seconds: the alignment table
# (issue 9); clip_i, clip_t, dino / subject_sim_shapes_cnn32, prior_drift, train_*: the personalization table (issue 8);
# cutoff_rate, sharpness: SDXL's micro-conditioning, path_straightness: reflow (issue 16); evaluations_per_sample,
# pretrain_steps, pretrain_seconds: the few-step students beside the solvers, with their one-time training (issue 14)
SUMMARY_METRICS = ("fid", "kid_mean", "clip_score", "clip_i", "clip_t", "dino", "subject_sim_shapes_cnn32",
                   "attr_acc_all", "feedback_accuracy", "reward", "human_approval", "prior_drift", "train_steps",
                   "train_reward_queries", "cutoff_rate", "sharpness", "path_straightness",
                   "train_params", "train_saved_bytes", "train_seconds", "train_peak_memory_bytes",
                   "evaluations_per_sample", "pretrain_steps", "pretrain_seconds", "latency_per_image_ms", "nfe")


@dataclass(frozen=True)
class Cell:
    method: str
    steps: int
    seed: int
    method_args: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None  # a suite entry's label; the baseline key when given
    model: str | None = None  # the entry's model, else the suite's (distilled or reflowed models beside the base)

    def label(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in sorted(self.method_args.items()))
        method = f"{self.method}@{self.model}" if self.model else self.method
        return f"{method}({args})" if args else method

    def key(self) -> str:
        """The cell's identity across seeds (and across nightly runs): its name, else label and steps."""
        return self.name or f"{self.label()}-{self.steps}steps"


@dataclass
class Suite:
    name: str
    defaults: dict[str, Any]
    cells: list[Cell]
    regression: dict[str, float] = field(default_factory=dict)  # metric -> relative tolerance (bench nightly)
    executor: dict[str, Any] = field(default_factory=dict)  # ExecutorConfig fields (bench.executors.suite_options)


GRID_KEYS = {"name", "method", "steps", "method_args", "seeds", "model"}
SUITE_KEYS = {"name", "defaults", "seeds", "grid", "regression", "executor"}


def check_seeds(seeds: Any, where: str) -> list[int]:
    """A count N (seeds 0..N-1, N >= 1) or a non-empty list of distinct seeds in [0, 2**63 - 1]."""
    from bench.spec import MAX_SEED

    def ok(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_SEED

    if ok(seeds) and seeds >= 1:
        return list(range(seeds))
    if isinstance(seeds, list) and seeds and all(ok(s) for s in seeds) and len(set(seeds)) == len(seeds):
        return list(seeds)
    raise BenchError(f"{where}: seeds must be a count >= 1 or a non-empty list of distinct seeds in [0, 2**63 - 1], "
                     f"got {seeds!r}")


def grid_cells(entries: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> list[Cell]:
    cells = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            raise BenchError(f"grid entry {entry!r} must be a mapping of method, steps and optionally name, "
                             f"method_args and seeds")
        unknown = set(entry) - GRID_KEYS
        if unknown or "method" not in entry or "steps" not in entry:
            raise BenchError(f"grid entry {dict(entry)} takes method, steps and optionally name, method_args, seeds and model")
        methods = entry["method"] if isinstance(entry["method"], list) else [entry["method"]]
        steps = entry["steps"] if isinstance(entry["steps"], list) else [entry["steps"]]
        name = entry.get("name")
        if name is not None and (len(methods) != 1 or len(steps) != 1 or not str(name).strip()):
            raise BenchError(f"grid entry {dict(entry)}: a named entry is one cell (one method, one steps value)")
        entry_seeds = check_seeds(entry["seeds"], f"grid entry {dict(entry)}") if "seeds" in entry else seeds
        if not all(isinstance(m, str) and m for m in methods):
            raise BenchError(f"grid entry {dict(entry)}: method must be a name or a list of names")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in steps):
            raise BenchError(f"grid entry {dict(entry)}: steps must be a positive integer or a list of them")
        if not isinstance(entry.get("method_args") or {}, Mapping):
            raise BenchError(f"grid entry {dict(entry)}: method_args must be a mapping of option names to values")
        model = entry.get("model")
        if model is not None and not (isinstance(model, str) and model.strip()):
            raise BenchError(f"grid entry {dict(entry)}: model must be a model name, folder or hub id")
        for method, n, seed in itertools.product(methods, steps, entry_seeds):
            cells.append(Cell(str(method), int(n), int(seed), dict(entry.get("method_args") or {}),
                              None if name is None else str(name), model))
    keys: dict[tuple[str, int], Cell] = {}
    for cell in cells:
        other = keys.setdefault((cell.key(), cell.seed), cell)
        if other is not cell:
            raise BenchError(f"grid has the cell {cell.key()!r} with seed {cell.seed} twice")
    return cells


def load_suite(path: str | Path) -> Suite:
    import yaml

    from bench.spec import read_small_file

    p = Path(path)
    try:
        data = yaml.safe_load(read_small_file(p, "suite"))
    except yaml.YAMLError as exc:
        raise BenchError(f"suite {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or "grid" not in data:
        raise BenchError(f"suite {p} must be a mapping with a 'grid' list")
    unknown = set(data) - SUITE_KEYS
    if unknown:
        raise BenchError(f"suite {p}: unknown keys {sorted(unknown)}; known: {', '.join(sorted(SUITE_KEYS))}")
    if not isinstance(data.get("defaults") or {}, dict):
        raise BenchError(f"suite {p}: 'defaults' must be a mapping of run fields")
    defaults = dict(data.get("defaults") or {})
    bad = set(defaults) - set(FIELD_NAMES)
    if bad:
        raise BenchError(f"suite {p}: unknown run fields in defaults: {sorted(bad)}")
    seeds = check_seeds(data.get("seeds", [0]), f"suite {p}")
    if not isinstance(data["grid"], list) or not data["grid"]:
        raise BenchError(f"suite {p}: 'grid' must be a non-empty list of entries (method, steps, ...)")
    regression = data.get("regression") or {}
    if not isinstance(regression, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in regression.values()
    ):
        raise BenchError(f"suite {p}: 'regression' maps metric names to relative tolerances >= 0, e.g. {{fid: 0.1}}")
    from bench.executors import executor_config, suite_options

    executor = suite_options(data.get("executor") or {}, f"suite {p}")
    executor_config({}, executor, f"suite {p}")  # its values checked now, whichever executor runs the suite
    return Suite(str(data.get("name", p.stem)), defaults, grid_cells(data["grid"], seeds),
                 {str(k): float(v) for k, v in regression.items()}, executor)


def cell_spec(base: RunSpec, cell: Cell, sweep_name: str) -> RunSpec:
    return base.replace(
        method=cell.method,
        steps=cell.steps,
        seed=cell.seed,
        method_args={**base.method_args, **cell.method_args},
        model=cell.model or base.model,
        run_name=f"{sweep_name}:{cell.name + ':' if cell.name else ''}{cell.label()}-{cell.steps}steps-seed{cell.seed}",
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


def noise_margin(reference: float, half_a: float, half_b: float, relative_tolerance: float) -> float:
    """How far two means over seeds may differ by noise alone: max(tolerance x |reference|, CI of the difference).

    The difference's CI half-width is the root sum of squares of the two 95% half-widths
    (a missing interval, from one seed, counts as 0), so two seeds give a wide margin and
    ten seeds a narrow one.
    """
    ha = 0.0 if math.isnan(half_a) else half_a
    hb = 0.0 if math.isnan(half_b) else half_b
    return max(relative_tolerance * abs(reference), math.hypot(ha, hb))


def summarize(rows: list[dict[str, Any]], metrics: Sequence[str] = SUMMARY_METRICS):
    """One row per cell (method configuration and steps): mean and 95% CI over seeds of each metric."""
    import pandas as pd

    df = pd.DataFrame(rows)
    if "cell" not in df:
        df["cell"] = df["config"] + "-" + df["steps"].astype(str) + "steps"
    out = []
    for key, group in df.groupby("cell", sort=False):
        first = group.iloc[0]
        row: dict[str, Any] = {"cell": key, "config": first["config"], "steps": first["steps"], "seeds": len(group)}
        for m in metrics:
            if m in group:
                mean, half = t_interval(group[m].tolist())
                row[m] = mean
                row[f"{m}_ci95"] = half
        out.append(row)
    return pd.DataFrame(out)


def format_table(summary, metrics: Sequence[str] = SUMMARY_METRICS) -> str:
    """A markdown table (pandas): value +- CI half-width (no interval with one seed), as the metrics declare."""
    shown = [m for m in metrics if m in summary and m != "nfe"]
    headers = ["method", "steps", "NFE", "seeds"] + [outputs.label(m) for m in shown]
    rows = []
    for _, r in summary.iterrows():
        label = str(r["config"])
        if "cell" in r and r["cell"] != f"{label}-{int(r['steps'])}steps":  # a named cell
            label = f"{r['cell']}: {label}"
        cells = [label, str(int(r["steps"])), f"{r.get('nfe', float('nan')):g}", str(int(r["seeds"]))]
        cells += [outputs.format_ci(m, r[m], r.get(f"{m}_ci95", float("nan"))) for m in shown]
        rows.append(cells)
    return str(md_table(headers, rows))


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
    values = summary[metric].dropna()
    if len(values) and values.min() > 0 and values.max() / values.min() > 20:  # a wide range: log, or it flattens
        ax.set_yscale("log")
    ax.set_xlabel("NFE (denoiser calls per sample, counted)")
    ax.set_ylabel(outputs.label(metric))
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_samples(rows: Sequence[Mapping[str, Any]], path: Path, title: str, per_cell: int = 8) -> bool:
    """One row of images per cell: the first ``per_cell`` samples of its first seed's run (the same sample seeds and
    prompts in every row), labelled with the cell; False where no run left samples to show."""
    import matplotlib
    import numpy as np

    from bench.shards import ShardStore

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown: dict[str, np.ndarray] = {}
    for r in rows:
        if r["cell"] in shown or not r.get("output"):
            continue
        try:
            first = np.load(ShardStore(Path(r["output"]), "").path(0), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            continue
        if first.dtype == np.uint8 and first.ndim == 4:
            shown[r["cell"]] = np.asarray(first[:per_cell])
    if not shown:
        return False
    fig, axes = plt.subplots(len(shown), 1, figsize=(per_cell * 0.9 + 0.4, 1.15 * len(shown) + 0.6), dpi=120,
                             squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], shown.items()):
        ax.imshow(np.concatenate(list(images), axis=1), interpolation="nearest")
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_title(label, loc="left", fontsize=7, pad=2)  # above the row: a long label never clips
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the title above the first row
    fig.savefig(path)
    plt.close(fig)
    return True


def sweep_id(base: RunSpec, cells: Sequence[Cell]) -> str:
    def identity(c: Cell) -> dict[str, Any]:  # unnamed cells keep the ids they had before cells had names
        return {k: v for k, v in c.__dict__.items() if not (k in ("name", "model") and v is None)}

    return stable_hash({"base": base.hashed_fields(), "cells": [canonical_json(identity(c)) for c in cells]}, 10)


def plan_cells(name: str, base: RunSpec, cells: Sequence[Cell]) -> list[tuple[Cell, Any]]:
    """Plan every cell before any sampling, so bad input fails first."""
    from bench.runner import plan_run

    return [(cell, plan_run(cell_spec(base, cell, name))) for cell in cells]


def run_cells(name: str, sid: str, plans: Sequence[tuple[Cell, Any]], tracker, out: Path, executor,
              progress: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every planned cell through ``executor`` (bench.executors); returns (rows, failures), both in cell order.

    One row per finished run, kept current in OUT/runs.csv as results arrive (nothing is lost on a crash); a
    cell that failed (after its retries) is one line on stderr and one row of OUT/failures.csv, and never stops
    the others.
    """
    import sys

    import pandas as pd

    from bench.executors import new_token, task_for

    token = new_token()
    tasks, cells = [], {}
    for i, (cell, plan) in enumerate(plans):
        what = f"{cell.name} = " if cell.name else ""
        key = f"{cell.key()} seed {cell.seed}"  # unique: grid_cells refuses a cell twice
        cells[key] = i, cell
        label = f"{what}{cell.label()} {cell.steps} steps, seed {cell.seed}"
        tasks.append(task_for(plan, key, label, tracker, token, {"sweep": name, "sweep_id": sid,
                                                                 "sweep_cell": cell.key()}, progress, keep_plan=True))
    rows: dict[int, dict[str, Any]] = {}
    failures: dict[int, dict[str, Any]] = {}

    def on_result(task, outcome) -> None:
        i, cell = cells[task.key]
        config = {"cell": cell.key(), "config": cell.label(), "method": cell.method, "steps": cell.steps}
        if outcome.ok:
            r = outcome.result
            rows[i] = {**config, "model": r["model"], "dataset": r["dataset"], "seed": cell.seed,
                       "method_args": r["method_args"], "run_id": r["run_id"], "protocol_hash": r["protocol_hash"],
                       "eval_protocol_hash": r["eval_protocol_hash"], "output": r["output"], **r["values"]}
            pd.DataFrame([rows[k] for k in sorted(rows)]).to_csv(out / "runs.csv", index=False)
        else:
            print(f"bench: cell {task.label} failed after {outcome.attempts} attempt(s): {outcome.error}",
                  file=sys.stderr, flush=True)
            failures[i] = {**config, "seed": cell.seed, "attempts": outcome.attempts, "error": outcome.error,
                           "output": task.spec["output"]}
            pd.DataFrame([failures[k] for k in sorted(failures)]).to_csv(out / "failures.csv", index=False)

    out.mkdir(parents=True, exist_ok=True)
    (out / "failures.csv").unlink(missing_ok=True)  # a rerun into the same folder: only this run's failures
    executor.run(tasks, on_result)
    return [rows[k] for k in sorted(rows)], [failures[k] for k in sorted(failures)]


def write_summary(name: str, sid: str, base: RunSpec, cells: Sequence[Cell], rows: list[dict[str, Any]], out: Path):
    """table.csv, table.md, sweep.json, fid_vs_nfe.png and samples.png in OUT; returns (summary, markdown table)."""
    import json

    shown = [m for m in SUMMARY_METRICS if any(m in r for r in rows)]  # a student's budget too
    if not any(r.get("evaluations_per_sample", r.get("nfe")) != r.get("nfe") for r in rows):
        shown = [m for m in shown if m != "evaluations_per_sample"]  # the NFE column says it already (no CFG)
    summary = summarize(rows, shown)
    summary.to_csv(out / "table.csv", index=False)
    table = format_table(summary)
    (out / "table.md").write_text(table + "\n")
    meta = {"name": name, "sweep_id": sid, "base": base.to_dict(), "cells": len(cells), "runs": len(rows),
            "eval_protocol_hashes": sorted({r["eval_protocol_hash"] for r in rows})}
    (out / "sweep.json").write_text(json.dumps(meta, indent=2) + "\n")
    if "fid" in summary and "nfe" in summary:
        seeds = len({c.seed for c in cells})
        resolved = sorted({(r["dataset"], int(r["num_samples"])) for r in rows})  # after the method's defaults
        sets = ", ".join(f"{d}, {n} samples" for d, n in resolved)
        plot_fid_vs_nfe(summary, out / "fid_vs_nfe.png", f"{name}: FID vs NFE ({sets}, {seeds} seed(s))")
    plot_samples(rows, out / "samples.png", f"{name}: the first samples of each cell (same seeds and prompts)")
    return summary, table
