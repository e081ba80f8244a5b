"""Trade-off plots of a swept method option (e.g. the guidance scale): quality metrics against the option's value.

Ho and Salimans' Figure/Table of classifier-free guidance is FID and IS against w;
on the embedded world the y-axes are FID, CLIP score and attribute accuracy, one
panel each, mean and 95% interval over seeds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from bench import outputs
from bench.sweep import t_interval

PANELS = ("fid", "clip_score", "attr_acc_all")  # labels and directions: the metrics' declarations (bench.outputs)


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
