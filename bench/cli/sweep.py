"""`bench sweep`: a grid of runs, a table with confidence intervals over seeds, and FID-versus-NFE plot."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from bench.cli import options
from bench.errors import BenchError
from bench.spec import RunSpec, load_spec_file, resolve_spec


def int_list(text: str) -> tuple[int, ...]:
    return tuple(options.positive_int(s) for s in options.comma_list(text))


def add_parser(sub, argv: list[str]) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a grid of methods x steps x seeds; table with CIs and a FID-vs-NFE plot",
        description="Run every cell of a grid as its own MLflow run, then summarize over seeds (mean and 95%% "
        "t-interval) and plot FID against counted NFE. Example: "
        "bench sweep --method ddim,ddpm --steps 5,10,20,50 --seeds 3",
    )
    p.add_argument("--method", type=options.comma_list, help="comma-separated methods")
    p.add_argument("--steps", type=int_list, help="comma-separated step counts")
    p.add_argument("--seeds", type=options.positive_int, help="number of seeds (0..N-1; default 1)")
    p.add_argument("--suite", metavar="FILE", help="YAML suite (name, defaults, seeds, grid); see bench/sweep.py")
    p.add_argument("--out", help="folder for table.csv, table.md and fid_vs_nfe.png (default: bench-runs/sweep-<id>)")
    options.add_spec_options(p)
    is_sweep = argv[:1] == ["sweep"]
    methods = options.methods_named(argv, RunSpec().method) if is_sweep else ()
    dests: dict[str, list[str]] = {}
    if is_sweep and options.scan_option(argv, "--suite") is None:
        seen: set[str] = set()
        for m in methods:
            dests[m] = [d for d in _method_fields(m)]
        for m in methods:  # one --option per distinct field, shared by the methods that have it
            new = [d for d in dests[m] if d not in seen]
            if new:
                options.add_method_options(p, m, only=new)
            seen.update(dests[m])
    p.set_defaults(func=lambda args: run(args, dests))


def _method_fields(method: str) -> list[str]:
    from bench.catalog import METHODS

    return [f.name for f in dataclasses.fields(METHODS.get(method).Args)]


def build(args, dests: dict[str, list[str]]):
    from bench.sweep import Cell, Suite, grid_cells, load_suite

    file_values = load_spec_file(args.config) if args.config else {}
    cli = options.spec_values(args)
    if args.suite:
        if args.method or args.steps or args.seeds:
            raise BenchError("--suite defines the grid; do not combine it with --method, --steps or --seeds")
        suite = load_suite(args.suite)
        base = resolve_spec(cli, {**suite.defaults, **file_values})
        return suite.name, base, suite.cells
    if not args.method or not args.steps:
        raise BenchError("bench sweep needs --method and --steps (or --suite FILE)")
    given = {d: getattr(args, f"m_{d}") for ds in dests.values() for d in ds if getattr(args, f"m_{d}", None) is not None}
    base = resolve_spec(cli, file_values)
    seeds = range(args.seeds or 1)
    cells = []
    for method in args.method:
        margs = {k: v for k, v in given.items() if k in dests.get(method, [])}
        cells += grid_cells([{"method": method, "steps": list(args.steps), "method_args": margs}], seeds)
    return "sweep", base, cells


def run(args, dests: dict[str, list[str]]) -> int:
    import pandas as pd

    from bench.runner import execute, plan_run
    from bench.sweep import SUMMARY_METRICS, cell_spec, format_table, plot_fid_vs_nfe, summarize, sweep_id
    from bench.tracking import Tracker

    name, base, cells = build(args, dests)
    tracker = Tracker(args.tracking_uri, base.experiment)
    tracker.check()
    sid = sweep_id(base, cells)
    out = Path(args.out) if args.out else Path("bench-runs") / f"sweep-{name}-{sid}"
    # plan every cell first: bad input fails before any sampling
    plans = [(cell, plan_run(cell_spec(base, cell, name))) for cell in cells]
    out.mkdir(parents=True, exist_ok=True)
    print(f"diffbench sweep {name!r}: {len(plans)} runs, {base.num_samples} samples each, dataset {base.dataset}; "
          f"results in {out}")
    rows = []
    for i, (cell, plan) in enumerate(plans, 1):
        print(f"[{i}/{len(plans)}] {cell.label()} {cell.steps} steps, seed {cell.seed}", flush=True)
        result = execute(plan, tracker, progress=not args.no_progress)
        tracker.set_tags(result.run_id, {"sweep": name, "sweep_id": sid})
        rows.append({"config": cell.label(), "method": cell.method, "steps": cell.steps, "seed": cell.seed,
                     "run_id": result.run_id, "eval_protocol_hash": plan.eval_protocol_hash, **result.values})
        pd.DataFrame(rows).to_csv(out / "runs.csv", index=False)  # kept current: nothing is lost on a crash
    summary = summarize(rows, [m for m in SUMMARY_METRICS if m in rows[0]])
    summary.to_csv(out / "table.csv", index=False)
    table = format_table(summary)
    (out / "table.md").write_text(table + "\n")
    meta = {"name": name, "sweep_id": sid, "base": base.to_dict(), "cells": len(cells),
            "eval_protocol_hashes": sorted({r["eval_protocol_hash"] for r in rows})}
    (out / "sweep.json").write_text(json.dumps(meta, indent=2) + "\n")
    if "fid" in summary and "nfe" in summary:
        plot_fid_vs_nfe(summary, out / "fid_vs_nfe.png",
                        f"{name}: FID vs NFE ({base.dataset}, {base.num_samples} samples, {len(set(c.seed for c in cells))} seed(s))")
    print(table)
    print(f"table: {out / 'table.md'}  plot: {out / 'fid_vs_nfe.png'}")
    return 0
