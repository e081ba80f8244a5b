"""Nightly regression runs: a suite's cells summarised over seeds, compared with a committed baseline.

The baseline is a JSON file (reviewable in a diff): per cell key, the configuration,
the metric protocol's hash, and for each metric the mean, the 95% t-interval
half-width and the per-seed values. Cells are keyed by their suite ``name`` (or
method, args and steps), so a named cell whose configuration changes (fewer
steps, another eta) is still compared with its old numbers.

The rule, per cell and per metric of the suite's ``regression:`` map (metric ->
relative tolerance): with b the baseline mean, n the new mean and h_b, h_n their
95% half-widths over seeds (0 for a single seed), the cell regressed if

    worse(n, b) > max(tolerance x |b|, sqrt(h_n^2 + h_b^2))

where worse is n - b for lower-is-better metrics (FID, KID, NFE, latency) and
b - n otherwise: the change must exceed both the tolerance and what seed noise
alone explains (``bench.sweep.noise_margin``). A cell measured under another
metric protocol than its baseline (other N, reference set, extractor) is not
compared but refused: re-measure the baseline with --update-baseline.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from bench.catalog import METRICS
from bench.errors import BenchError
from bench.outputs import RUN_OUTPUTS, lower_is_better
from bench.render import md_table, render
from bench.sweep import noise_margin, t_interval

RULE = "regression if worse by more than max(tolerance x |baseline mean|, sqrt(ci95_new^2 + ci95_baseline^2))"
CONFIG_FIELDS = ("method", "method_args", "steps", "model")


def default_tolerances(metrics: Sequence[str]) -> dict[str, float]:
    """A suite's tolerances when it names none: every ranked value its metrics (and every run) declare with one."""
    declared = [*RUN_OUTPUTS, *(o for name in metrics for o in METRICS.get(name).outputs)]
    return {o.key: o.tolerance for o in declared
            if o.tolerance is not None and o.direction != "none" and not o.key.endswith("*")}


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def cell_summaries(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> dict[str, Any]:
    """Per cell key: configuration, protocol hash, seeds and mean / CI / values of each metric."""
    cells: dict[str, Any] = {}
    for row in rows:
        c = cells.setdefault(row["cell"], {
            "method": row["method"], "method_args": json.loads(row["method_args"]), "steps": int(row["steps"]),
            "model": row["model"], "eval_protocol_hash": row["eval_protocol_hash"],
            "seeds": [], "_values": {m: [] for m in metrics},
        })
        if row["eval_protocol_hash"] != c["eval_protocol_hash"]:
            raise BenchError(f"cell {row['cell']}: its seeds ran under different metric protocols")
        c["seeds"].append(int(row["seed"]))
        for m in metrics:
            if m in row and row[m] is not None and not math.isnan(float(row[m])):
                c["_values"][m].append(float(row[m]))
    for c in cells.values():
        values = c.pop("_values")
        c["metrics"] = {}
        for m, vs in values.items():
            if vs:
                mean, half = t_interval(vs)
                c["metrics"][m] = {"mean": mean, "ci95": _num(half), "values": vs}
    return cells


@dataclass
class Comparison:
    cell: str
    metric: str
    verdict: str  # ok | improved | REGRESSION | new | missing
    new_mean: float | None = None
    new_ci95: float | None = None
    base_mean: float | None = None
    base_ci95: float | None = None
    margin: float | None = None
    worse_by: float | None = None
    note: str = ""

    def line(self) -> str:
        def v(mean, half):
            return "-" if mean is None else (f"{mean:.4g}" if half is None else f"{mean:.4g} +- {half:.2g}")

        return (f"{self.metric} at cell {self.cell}: {v(self.new_mean, self.new_ci95)} vs baseline "
                f"{v(self.base_mean, self.base_ci95)} (worse by {self.worse_by:.4g}, allowed {self.margin:.4g})"
                + (f"; {self.note}" if self.note else ""))


def config_note(base: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    changes = [f"{k} {base.get(k)!r} -> {new.get(k)!r}" for k in CONFIG_FIELDS if base.get(k) != new.get(k)]
    return ("configuration changed since the baseline: " + ", ".join(changes)) if changes else ""


def compare(baseline: Mapping[str, Any], current: Mapping[str, Any], tolerances: Mapping[str, float]) -> list[Comparison]:
    """Every (cell, metric) of the current run against the baseline, by the rule in the module docstring."""
    out: list[Comparison] = []
    base_cells = baseline.get("cells", {})
    for key, cell in current.items():
        base = base_cells.get(key)
        if base is None:
            out.append(Comparison(key, "*", "new", note="no baseline for this cell"))
            continue
        check_protocols(baseline, {key: cell["eval_protocol_hash"]})
        note = config_note(base, cell)
        for metric, tol in tolerances.items():
            b, n = base["metrics"].get(metric), cell["metrics"].get(metric)
            if b is None or n is None:
                continue
            worse = n["mean"] - b["mean"] if lower_is_better(metric) else b["mean"] - n["mean"]
            margin = noise_margin(b["mean"], _nan(n["ci95"]), _nan(b["ci95"]), tol)
            verdict = "REGRESSION" if worse > margin else ("improved" if -worse > margin else "ok")
            out.append(Comparison(key, metric, verdict, n["mean"], n["ci95"], b["mean"], b["ci95"], margin, worse, note))
    for key in base_cells:
        if key not in current:
            out.append(Comparison(key, "*", "missing", note="in the baseline but not in the suite"))
    return out


def check_protocols(baseline: Mapping[str, Any], planned: Mapping[str, str]) -> None:
    """Refuse before any sampling if a cell's metric protocol differs from its baseline's."""
    for key, h in planned.items():
        base = baseline.get("cells", {}).get(key)
        if base is not None and base["eval_protocol_hash"] != h:
            raise BenchError(
                f"cell {key}: the baseline was measured under metric protocol {base['eval_protocol_hash'][:10]}, "
                f"this run under {h[:10]} (sample count, reference set, extractor or latency settings changed); "
                f"refusing to compare; re-measure it with --update-baseline"
            )


def regressions(comparisons: Sequence[Comparison]) -> list[Comparison]:
    return [c for c in comparisons if c.verdict == "REGRESSION"]


def load_baseline(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise BenchError(f"cannot read the baseline {path}: {exc.strerror}; create it with --update-baseline") from None
    except json.JSONDecodeError as exc:
        raise BenchError(f"baseline {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("cells"), dict):
        raise BenchError(f"baseline {path} has no 'cells' mapping; re-create it with --update-baseline")
    return data


def baseline_document(suite: str, cells: Mapping[str, Any], tolerances: Mapping[str, float],
                      environment: Mapping[str, str]) -> dict[str, Any]:
    return {"suite": suite, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rule": RULE,
            "tolerances": dict(tolerances), "environment": dict(environment), "cells": dict(cells)}


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")
    tmp.replace(path)


def _fmt(mean: float | None, half: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4g}" if half is None else f"{mean:.4g} +- {half:.2g}"


COLUMNS = ("cell", "metric", "new", "baseline", "worse by", "allowed", "verdict", "note")


def table_rows(comparisons: Sequence[Comparison]) -> list[list[str]]:
    return [[c.cell, c.metric, _fmt(c.new_mean, c.new_ci95), _fmt(c.base_mean, c.base_ci95),
             "-" if c.worse_by is None else f"{c.worse_by:.4g}", "-" if c.margin is None else f"{c.margin:.4g}",
             c.verdict, c.note] for c in comparisons]


def comparison_md(comparisons: Sequence[Comparison], baseline_path: str) -> str:
    return render("nightly_comparison.md.j2", baseline=baseline_path, rule=RULE,
                  table=md_table(COLUMNS, table_rows(comparisons))).rstrip("\n")


def comparison_html(comparisons: Sequence[Comparison], baseline_path: str) -> str:
    badges = {"REGRESSION": "fail", "ok": "pass", "improved": "pass"}
    rows = [(badges.get(c.verdict, "none"), c.verdict, row) for c, row in zip(comparisons, table_rows(comparisons))]
    return render("nightly_comparison.html.j2", baseline=baseline_path, rule=RULE, columns=COLUMNS,
                  rows=rows).rstrip("\n")


def comparisons_json(comparisons: Sequence[Comparison]) -> list[dict[str, Any]]:
    return [asdict(c) for c in comparisons]
