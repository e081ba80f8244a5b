"""Trade-off plots of a swept method option (e.g. the guidance scale): quality metrics against the option's value.

Ho and Salimans' Figure/Table of classifier-free guidance is FID and IS against w;
on the embedded world the y-axes are FID, CLIP score and attribute accuracy, one
panel each, mean and 95% interval over seeds.

``plot_reward_fronts``: the alignment runs' Pareto fronts over the feedback world's judges (Parrot's Figure of
reward trade-offs), one panel per pair of judges, each run a point, the base model marked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from bench import outputs
from bench.sweep import t_interval

PANELS = ("fid", "clip_score", "attr_acc_all")  # labels and directions: the metrics' declarations (bench.outputs)
# the feedback world's judges (bench.alignment's rewards as the held-out columns read them), all higher-is-better
REWARD_AXES = ("reward", "feedback_accuracy", "human_approval", "clip_score")


def panel_label(metric: str) -> str:
    out = outputs.lookup(metric)
    if out is None or out.direction == "none":
        return outputs.label(metric)
    return f"{outputs.label(metric)} ({out.direction} is better)"


def varied_options(cells: Sequence[Any]) -> list[str]:
    """Method options that take more than one value across a sweep's cells."""
    values: dict[str, set] = {}
    for cell in cells:
        for key, value in cell.method_args.items():
            values.setdefault(key, set()).add(repr(value))
    return sorted(k for k, v in values.items() if len(v) > 1)


def plot_option_tradeoff(rows: list[dict[str, Any]], option: str, path: Path, title: str) -> Path | None:
    """One panel per available metric: the metric against ``option`` (one line per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    df = pd.DataFrame(rows)
    df["_x"] = [json.loads(a).get(option) for a in df["method_args"]]
    panels = [(m, panel_label(m)) for m in PANELS if m in df]
    if not panels or df["_x"].isna().all():
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), dpi=120, squeeze=False)
    for ax, (metric, label) in zip(axes[0], panels):
        for method, group in df.groupby("method", sort=False):
            stats = [(x, *t_interval(g[metric].tolist())) for x, g in group.groupby("_x")]
            xs, means, halves = zip(*sorted(stats))
            ax.errorbar(xs, means, yerr=[0 if h != h else h for h in halves], marker="o", capsize=3, label=method)
        ax.set_xlabel(option.replace("_", " "))
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_reward_fronts(rows: list[dict[str, Any]], path: Path, title: str, base: str = "base") -> Path | None:
    """One panel per pair of the world's judges: each cell a point (mean over seeds), the cell named ``base`` (or
    trained for 0 steps) a star, the pair's non-dominated cells joined by a line. None without two judges' columns."""
    import itertools

    import matplotlib
    import torch

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.alignment import non_dominated

    df = pd.DataFrame(rows)
    axes_present = [m for m in REWARD_AXES if m in df and df[m].notna().any()]
    if len(axes_present) < 2:
        return None
    key = "cell" if "cell" in df else "config"
    means = df.groupby(key, sort=False)[axes_present + (["train_steps"] if "train_steps" in df else [])].mean()
    is_base = [str(c) == base or ("train_steps" in means and means.loc[c, "train_steps"] == 0) for c in means.index]
    pairs = list(itertools.combinations(axes_present, 2))
    cols = min(3, len(pairs))
    rows_n = -(-len(pairs) // cols)
    fig, grid = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.6 * rows_n), dpi=110, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (x, y) in zip(grid.flat, pairs):
        points = means[[x, y]].to_numpy(dtype=float)
        for i, cell in enumerate(means.index):
            ax.scatter(*points[i], marker="*" if is_base[i] else "o", s=140 if is_base[i] else 40,
                       color="black" if is_base[i] else colors[i % len(colors)], label=str(cell), zorder=3)
        front = non_dominated(torch.from_numpy(points.copy())).numpy()
        order = sorted(np.flatnonzero(front), key=lambda i: points[i, 0])
        ax.plot(points[order, 0], points[order, 1], color="gray", alpha=0.6, linewidth=1, zorder=2)
        ax.set_xlabel(panel_label(x), fontsize=8)
        ax.set_ylabel(panel_label(y), fontsize=8)
        ax.grid(True, alpha=0.3)
    for ax in list(grid.flat)[len(pairs):]:
        ax.axis("off")
    handles, labels = grid.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(len(labels), 4))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08 if rows_n == 1 else 0.05, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path
