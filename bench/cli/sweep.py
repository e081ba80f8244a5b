"""`bench sweep`: a grid of runs, a table with confidence intervals over seeds, and FID-versus-NFE plot."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

from bench.cli import options
from bench.errors import EXIT_INTERNAL, BenchError
from bench.spec import RunSpec, load_spec_file, resolve_spec


def int_list(text: str) -> tuple[int, ...]:
    return tuple(options.positive_int(s) for s in options.comma_list(text))


def add_parser(sub, argv: list[str]) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a grid of methods x steps x seeds; table with CIs and a FID-vs-NFE plot",
        description="Run every cell of a grid as its own MLflow run, then summarize over seeds (mean and 95% "
        "t-interval) and plot FID against counted NFE. Example: "
        "bench sweep --method ddim,ddpm --steps 5,10,20,50 --seeds 3",
    )
    p.add_argument("--method", type=options.comma_list, help="comma-separated methods")
    p.add_argument("--steps", type=int_list, help="comma-separated step counts")
    p.add_argument("--seeds", type=options.positive_int, help="number of seeds (0..N-1; default 1)")
    p.add_argument("--suite", metavar="FILE", help="YAML suite (name, defaults, seeds, grid); see bench/sweep.py")
    p.add_argument("--out", help="folder for table.csv, table.md and fid_vs_nfe.png (default: bench-runs/sweep-<id>)")
    options.add_spec_options(p)
    options.add_executor_options(p)
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
                options.add_method_options(p, m, only=new, lists=True)  # a comma list: one cell per value
            seen.update(dests[m])
    p.set_defaults(func=lambda args: run(args, dests))


def _method_fields(method: str) -> list[str]:
    from bench.catalog import METHODS

    return [f.name for f in dataclasses.fields(METHODS.get(method).Args)]


def build(args, dests: dict[str, list[str]]):
    """The sweep's name, base spec, cells and the suite's executor options ({} for a grid on the command line)."""
    from bench.sweep import grid_cells, load_suite

    file_values = load_spec_file(args.config) if args.config else {}
    cli = options.spec_values(args)
    if args.suite:
        if args.method or args.steps or args.seeds:
            raise BenchError("--suite defines the grid; do not combine it with --method, --steps or --seeds")
        suite = load_suite(args.suite)
        base = resolve_spec(cli, {**suite.defaults, **file_values})
        return suite.name, base, suite.cells, suite.executor
    if not args.method:
        raise BenchError("bench sweep needs --method (or --suite FILE)")
    given = {d: getattr(args, f"m_{d}") for ds in dests.values() for d in ds if getattr(args, f"m_{d}", None) is not None}
    base = resolve_spec(cli, file_values)
    if not args.steps:  # one steps value: the --config file's or the default
        args.steps = (base.steps,)
    seeds = range(args.seeds or 1)
    cells = []
    for method in args.method:
        axes = {k: v for k, v in given.items() if k in dests.get(method, [])}
        for values in itertools.product(*axes.values()):  # method options given as comma lists span the grid
            margs = dict(zip(axes, values))
            cells += grid_cells([{"method": method, "steps": list(args.steps), "method_args": margs}], seeds)
    return "sweep", base, cells, {}


def run(args, dests: dict[str, list[str]]) -> int:
    from bench.executors import executor_config, make_executor, warn_if_local_store
    from bench.sweep import plan_cells, run_cells, sweep_id, write_summary
    from bench.tracking import Tracker

    name, base, cells, suite_executor = build(args, dests)
    config = executor_config(options.executor_values(args), suite_executor, f"suite {args.suite}")
    tracker = Tracker(args.tracking_uri, base.experiment)
    tracker.check()
    sid = sweep_id(base, cells)
    out = Path(args.out) if args.out else Path("bench-runs") / f"sweep-{name}-{sid}"
    from bench.runner import check_writable

    from bench.catalog import METHODS

    for cell in cells:  # every cell's options, before any cell is planned (a model loaded, a folder made)
        METHODS.get(cell.method).parse_args({**base.method_args, **cell.method_args})
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {out} is a file, not a folder")
    plans = plan_cells(name, base, cells)
    check_writable(out, "--out")  # before any cell runs
    resolved = sorted({(plan.spec.dataset, plan.spec.num_samples) for _, plan in plans})  # after method defaults
    datasets = ", ".join(f"{n} samples of {d}" for d, n in resolved)
    print(f"diffbench sweep {name!r}: {len(plans)} runs, {datasets} each, executor {config.name}; results in {out}")
    warn_if_local_store(config, tracker.uri)
    rows, failures = run_cells(name, sid, plans, tracker, out, make_executor(config, out),
                               progress=not args.no_progress)
    if not rows:
        print(f"no cell finished: {len(failures)} failed (their errors: {out / 'failures.csv'})")
        return EXIT_INTERNAL
    _, table = write_summary(name, sid, base, cells, rows, out)
    print(table)
    print(f"table: {out / 'table.md'}  plot: {out / 'fid_vs_nfe.png'}")
    from bench.tradeoff import plot_option_tradeoff, plot_reward_fronts, varied_options

    if plot_reward_fronts(rows, out / "reward_fronts.png", f"{name}: Pareto fronts over the judges ({datasets})"):
        print(f"reward fronts: {out / 'reward_fronts.png'}")  # alignment suites: every pair of the world's judges

    for option in varied_options(cells):  # e.g. --guidance 1,2,4,8: the metrics against the guidance scale
        if plot_option_tradeoff(rows, option, out / f"tradeoff_{option}.png",
                                f"{name}: metrics vs {option} ({datasets})"):
            print(f"trade-off plot: {out / f'tradeoff_{option}.png'}")
    if failures:
        print(f"{len(failures)} of {len(plans)} runs failed; the table summarises the {len(rows)} others "
              f"(errors: {out / 'failures.csv'})")
        return EXIT_INTERNAL
    return 0
