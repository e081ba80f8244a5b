"""Leaderboards from MLflow runs: one row per method configuration, mean and 95% t-interval over seeds.

A method configuration is (method, method args, steps, model, dtype); its runs with
different seeds are its samples (a seed run twice counts once, the latest run).
Rows are grouped by metric protocol (the ``eval_protocol_hash`` tag: extractor,
reference set, sample count, latency settings) and device, and ranked within a
group. Runs whose protocol for the ranked metric differs (another reference set,
another N) are never ranked together: ``check_comparable`` refuses, naming the
fields that differ, until the selection is narrowed with --dataset or --protocol.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

from bench import outputs
from bench.errors import BenchError
from bench.outputs import lower_is_better
from bench.render import md_table
from bench.sweep import t_interval

CONFIG_COLUMNS = ("method", "method_args", "steps", "model", "dtype")
GROUP_COLUMNS = ("eval_protocol_hash", "device")
RUN_TAGS = ("method", "paper", "model", "dataset", "protocol_hash", "eval_protocol_hash", "device", "device_name",
            "diffbench_git_sha", "torch_version", "diffusers_version", "samples_sha256", "output", "sweep",
            "sweep_id", "sweep_cell")


def metric_family(metric: str) -> str | None:
    """The metric's protocol family (its declaration's); None (undeclared) means the whole protocol must match."""
    return outputs.family(metric)


@dataclass(frozen=True)
class Selection:
    """Which runs: an experiment, a data set, eval-protocol hash prefixes (all when None)."""

    experiment: str | None = None
    dataset: str | None = None
    protocols: tuple[str, ...] = ()
    sweep_id: str | None = None

    def describe(self) -> str:
        parts = [f"experiment {self.experiment}" if self.experiment else "all experiments"]
        if self.dataset:
            parts.append(f"dataset {self.dataset}")
        if self.protocols:
            parts.append(f"protocol {','.join(self.protocols)}")
        if self.sweep_id:
            parts.append(f"sweep {self.sweep_id}")
        return ", ".join(parts)


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def method_args_of(params: dict[str, str]) -> dict[str, str]:
    prefix = "spec.method_args."
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def non_default_args(method: str, args: dict[str, str]) -> dict[str, str]:
    """The method args that differ from the adapter's defaults (all of them if the adapter is unknown here)."""
    import dataclasses

    try:
        from bench.catalog import METHODS

        fields = {f.name: f for f in dataclasses.fields(METHODS.get(method).Args)}
    except Exception:  # a plugin that is not installed here: show everything
        return dict(args)
    out = {}
    for k, v in args.items():
        f = fields.get(k)
        if f is None or f.default is dataclasses.MISSING or str(f.default) != v:
            out[k] = v
    return out


def config_label(method: str, args_json: str) -> str:
    args = non_default_args(method, json.loads(args_json))
    inner = ",".join(f"{k}={v}" for k, v in sorted(args.items()))
    return f"{method}({inner})" if inner else method


def fetch_runs(tracking_uri: str | None, selection: Selection = Selection()):
    """FINISHED diffbench runs (those with an eval_protocol_hash tag) as a pandas DataFrame, one row per run."""
    import pandas as pd

    from bench.tracking import Tracker

    tracker = Tracker(tracking_uri, selection.experiment or "diffbench")
    client = tracker.client
    try:
        experiments = client.search_experiments()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise BenchError(f"MLflow tracking store {tracker.uri} is unreachable: {first}") from None
    if selection.experiment:
        names = [e.name for e in experiments]
        experiments = [e for e in experiments if e.name == selection.experiment]
        if not experiments:
            raise BenchError(f"no experiment {selection.experiment!r} in {tracker.uri} (there are: {', '.join(names) or 'none'})")
    filters = ["attributes.status = 'FINISHED'"]
    if selection.dataset:
        filters.append(f"tags.dataset = {_quote(selection.dataset)}")
    if selection.sweep_id:
        filters.append(f"tags.sweep_id = {_quote(selection.sweep_id)}")
    names = {e.experiment_id: e.name for e in experiments}
    rows: list[dict[str, Any]] = []
    token = None
    while names:
        page = client.search_runs(list(names), " and ".join(filters), max_results=1000, page_token=token)
        for run in page:
            row = run_row(run, names[run.info.experiment_id])
            if row is not None:
                rows.append(row)
        token = page.token
        if not token:
            break
    df = pd.DataFrame(rows)
    if selection.protocols and len(df):
        df = df[df["eval_protocol_hash"].map(lambda h: any(h.startswith(p) for p in selection.protocols))]
    return df.reset_index(drop=True)


def run_row(run, experiment: str) -> dict[str, Any] | None:
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    if not tags.get("eval_protocol_hash") or "spec.steps" not in params:
        return None  # not a diffbench run
    args = method_args_of(params)
    row: dict[str, Any] = {
        "run_id": run.info.run_id, "run_name": run.info.run_name or "", "experiment": experiment,
        "start_time": run.info.start_time or 0,
        **{t: tags.get(t, "") for t in RUN_TAGS},
        "method_args": json.dumps(args, sort_keys=True),
        "steps": int(params["spec.steps"]), "seed": int(params.get("spec.seed", 0)),
        "dtype": params.get("spec.dtype", ""), "num_samples_spec": int(params.get("spec.num_samples", 0)),
        "metric_protocol": json.dumps({k[len("protocol.metrics."):]: v for k, v in params.items()
                                       if k.startswith("protocol.metrics.")}, sort_keys=True),
        **metrics,
    }
    row["model"] = row["model"] or params.get("spec.model", "")
    row["config"] = config_label(row["method"], row["method_args"])
    return row


def protocol_fields(runs, family: str | None) -> dict[str, dict[str, str]]:
    """Per eval-protocol hash: the protocol fields of one metric family, or of all (None).

    The latency protocol's device is left out: rows are grouped by device anyway.
    """
    out: dict[str, dict[str, str]] = {}
    for h, group in runs.groupby("eval_protocol_hash", sort=True):
        fields = json.loads(group.iloc[0]["metric_protocol"])
        out[h] = {k: v for k, v in fields.items()
                  if (family is None or k.split(".")[0] == family) and k != "latency.device"}
    return out


def check_comparable(runs, metric: str) -> None:
    """Refuse (one line, exit 2) when the selected runs measured ``metric`` under different protocols."""
    family = metric_family(metric)
    per_hash = protocol_fields(runs, family)
    distinct = {json.dumps(f, sort_keys=True) for f in per_hash.values()}
    if len(distinct) <= 1:
        return
    keys = sorted({k for f in per_hash.values() for k in f})
    differing = []
    for k in keys:
        values = [f.get(k, "(absent)") for f in per_hash.values()]
        if len(set(values)) > 1:
            shown = " | ".join(dict.fromkeys(v if len(v) <= 40 else v[:37] + "..." for v in values))
            differing.append(f"{k} ({shown})")
    choices = []
    for h, group in runs.groupby("eval_protocol_hash", sort=True):
        first = group.iloc[0]
        choices.append(f"{h[:10]} ({len(group)} run{'s' * (len(group) != 1)}: {first['dataset']}, "
                       f"n={first['num_samples_spec']}, {first['device']})")
    more = f" and {len(differing) - 4} more" if len(differing) > 4 else ""
    raise BenchError(
        f"refusing to rank {metric}: the selected runs measured it under {len(distinct)} different protocols, "
        f"differing in {'; '.join(differing[:4])}{more}; narrow with --dataset or --protocol "
        f"(comma-separated hash prefixes): {', '.join(choices)}"
    )


def config_table(runs, metrics: Sequence[str], by: Sequence[str]):
    """Mean and 95% CI over seeds per configuration (and ``by``); a seed run twice counts once (the latest)."""
    import pandas as pd

    keys = list(by) + list(CONFIG_COLUMNS)
    runs = runs.sort_values("start_time").drop_duplicates(keys + ["seed"], keep="last")
    out = []
    for key, group in runs.groupby(keys, sort=False):
        first = group.iloc[0]
        row: dict[str, Any] = dict(zip(keys, key))
        row.update({"config": first["config"], "seeds": len(group), "seed_list": ",".join(map(str, sorted(group["seed"]))),
                    "device_name": first["device_name"], "dataset": first["dataset"],
                    "num_samples": first["num_samples_spec"], "run_ids": ",".join(group["run_id"])})
        for m in metrics:
            if m in group:
                mean, half = t_interval(group[m].astype(float).tolist())
                row[m] = mean
                row[f"{m}_ci95"] = half
        out.append(row)
    return pd.DataFrame(out)


BOARD_METRICS = ("fid", "kid_mean", "nfe", "latency_per_image_ms", "throughput_images_per_s", "peak_memory_mb",
                 "evaluations_per_sample", "pretrain_steps", "pretrain_seconds")
# shown where a row has them: a few-step student's one-time training beside the solvers' nothing (issue 14)
BUDGET_COLUMNS = ("pretrain_steps", "pretrain_seconds")


def leaderboard(runs, metric: str = "fid", per_protocol: bool = False):
    """The ranked table: one row per configuration within each (eval protocol, device) group.

    Runs that measured ``metric`` under different protocols are refused (one table would invite comparing them)
    unless ``per_protocol``: then each protocol is its own group, ranked alone (never ranked together).
    """
    if runs.empty:
        raise BenchError("no FINISHED diffbench runs match the selection")
    if metric not in runs or runs[metric].isna().all():
        known = sorted(c for c in runs.columns if c not in RUN_TAGS and outputs.lookup(c) is not None)
        raise BenchError(f"no run of the selection has the metric {metric!r} (they have: {', '.join(known)})")
    runs = runs[runs[metric].notna()]
    if not per_protocol:
        check_comparable(runs, metric)
    metrics = list(dict.fromkeys([metric, *BOARD_METRICS]))
    board = config_table(runs, metrics, GROUP_COLUMNS)
    board["rank"] = (board.groupby(list(GROUP_COLUMNS))[metric]
                     .rank(method="min", ascending=lower_is_better(metric), na_option="bottom").astype(int))
    board = board.sort_values(["device", "eval_protocol_hash", "rank", "config", "steps"]).reset_index(drop=True)
    front = list(dict.fromkeys(["rank", "config", "steps", "nfe", "seeds", metric, f"{metric}_ci95"]))
    return board[front + [c for c in board.columns if c not in front]]


def fmt_ci(mean: float, half: float, digits: int = 3, scale: float = 1.0) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if half is None or math.isnan(half):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} +- {half * scale:.{digits}f}"


fmt_metric = outputs.format_ci  # mean +- half in the metric's declared format


def display_rows(board, metric: str) -> tuple[list[str], list[tuple[tuple[str, str, str], list[list[str]]]]]:
    """Headers and, per (protocol, device) group, the formatted rows: what table, md and html print."""
    shown = [m for m in dict.fromkeys([metric, "fid", "kid_mean", "latency_per_image_ms"]) if m in board and m != "nfe"]
    shown += [m for m in BUDGET_COLUMNS if m in board and board[m].notna().any() and m not in shown]
    models = "model" in board and board["model"].nunique() > 1  # students beside their teacher: say which is which
    headers = ["rank", "method", "steps", "NFE", "seeds"] + [outputs.label(m) for m in shown]
    groups = []
    for (h, device), group in board.groupby(list(GROUP_COLUMNS), sort=False):
        rows = []
        for _, r in group.iterrows():
            label = f"{r['config']} @ {r['model']}" if models else r["config"]
            cells = [str(r["rank"]), label, str(int(r["steps"])), f"{r['nfe']:g}" if "nfe" in r else "-",
                     str(int(r["seeds"]))]
            for m in shown:
                cells.append(fmt_metric(m, r[m], r.get(f"{m}_ci95", float("nan"))))
            rows.append(cells)
        first = group.iloc[0]
        groups.append(((h, device, f"{first['dataset']}, n={first['num_samples']}, {first['device_name']}"), rows))
    return headers, groups


def format_board(board, metric: str, fmt: str = "table") -> str:
    if fmt == "csv":
        return board.to_csv(index=False)
    headers, groups = display_rows(board, metric)
    out = []
    for (h, device, desc), rows in groups:
        title = f"metric protocol {h[:10]} on {device} ({desc})"
        if fmt == "md":
            out.append(f"#### {title}\n")
            out.append(md_table(headers, rows))
        else:
            widths = [max(len(x) for x in col) for col in zip(headers, *rows)]
            out.append(title)
            out.append("  " + "  ".join(x.ljust(w) for x, w in zip(headers, widths)))
            out += ["  " + "  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in rows]
        out.append("")
    ranked = "lower is better" if lower_is_better(metric) else "higher is better"
    out.append(f"ranked by {metric} ({ranked}); mean +- 95% t-interval half-width over seeds")
    return "\n".join(out)
