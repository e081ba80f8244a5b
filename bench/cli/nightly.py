"""`bench nightly`: run a suite, compare it with the committed baseline, exit 3 on a regression."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bench.cli import options
from bench.errors import EXIT_INTERNAL, EXIT_REGRESSION, BenchError


def add_parser(sub, argv: list[str]) -> None:
    p = sub.add_parser(
        "nightly",
        help="run a suite and compare it with a baseline; exit 3 on a regression",
        description="Run every cell of a suite (as `bench sweep --suite` does), summarise each cell over seeds, "
        "and compare it with the baseline file: a metric regressed if its mean is worse than the baseline's "
        "by more than max(tolerance x baseline, root-sum-square of the two 95%% CI half-widths); tolerances "
        "come from the suite's `regression:` map. Writes comparison.md/json, the sweep table and an HTML "
        "report. Exit 0: no regression; 3: a regression (named on stderr); 1: a cell failed (the others are "
        "compared; no baseline is written); 2: no or incompatible baseline. "
        "Example: bench nightly --suite suites/nightly.yaml",
    )
    p.add_argument("--suite", required=True, metavar="FILE", help="YAML suite (see suites/nightly.yaml)")
    p.add_argument("--baseline", metavar="FILE", help="baseline JSON (default: the suite's path with "
                   ".baseline.json for .yaml)")
    p.add_argument("--update-baseline", action="store_true",
                   help="write this run's numbers as the new baseline (deliberately; commit the file)")
    p.add_argument("--out", help="folder for the comparison, table and report "
                   "(default: bench-runs/nightly-<suite>-<time>)")
    p.add_argument("--report", metavar="FILE", help="HTML report path (default: OUT/report.html)")
    options.add_spec_options(p)
    options.add_executor_options(p)
    p.set_defaults(func=run)


def default_baseline(suite: str) -> Path:
    path = Path(suite)
    return path.with_name(path.stem + ".baseline.json")


def environment(plans) -> dict[str, str]:
    from bench.runner import run_tags

    tags = run_tags(plans[0][1])
    return {k: tags[k] for k in ("device", "device_name", "torch_version", "diffusers_version", "diffbench_git_sha")}


def write_report(tracker, name: str, sid: str, rows, sections, path: Path) -> str:
    from bench import report
    from bench.leaderboard import Selection, fetch_runs

    ids = {r["run_id"] for r in rows if r["run_id"]}
    if not ids:
        return "no report: no run reached the MLflow store"
    runs = fetch_runs(tracker.uri, Selection(experiment=tracker.experiment, sweep_id=sid))
    runs = runs[runs["run_id"].isin(ids)]
    data = report.build(runs, "fid" if "fid" in runs else "nfe", tracker.client, tracker.uri,
                        f"diffbench nightly: {name}", f"{len(runs)} runs of suite {name} (sweep {sid}), "
                        f"{time.strftime('%Y-%m-%d %H:%M')}", sections)
    report.write(data, path, "html")
    return f"report: {path}"


def run(args) -> int:
    from bench import nightly
    from bench.executors import executor_config, make_executor, warn_if_local_store
    from bench.spec import load_spec_file, resolve_spec
    from bench.sweep import load_suite, plan_cells, run_cells, sweep_id, write_summary
    from bench.tracking import Tracker

    suite = load_suite(args.suite)
    config = executor_config(options.executor_values(args), suite.executor, f"suite {args.suite}")
    baseline_path = Path(args.baseline) if args.baseline else default_baseline(args.suite)
    baseline = None if args.update_baseline and not baseline_path.exists() else nightly.load_baseline(baseline_path)
    file_values = load_spec_file(args.config) if args.config else {}
    base = resolve_spec(options.spec_values(args), {**suite.defaults, **file_values})
    tracker = Tracker(args.tracking_uri, base.experiment)
    tracker.check()
    sid = sweep_id(base, suite.cells)
    out = Path(args.out) if args.out else Path("bench-runs") / f"nightly-{suite.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    plans = plan_cells(suite.name, base, suite.cells)
    # the suite's tolerances, else the defaults its metrics declare (bench.outputs.Output.tolerance)
    tolerances = suite.regression or nightly.default_tolerances(sorted({m for _, plan in plans for m in plan.metrics}))
    if baseline and not args.update_baseline:  # fail before sampling, not after
        nightly.check_protocols(baseline, {cell.key(): plan.eval_protocol_hash for cell, plan in plans})
    out.mkdir(parents=True, exist_ok=True)
    print(f"diffbench nightly {suite.name!r}: {len(plans)} runs, baseline {baseline_path}, executor {config.name}; "
          f"results in {out}", flush=True)
    warn_if_local_store(config, tracker.uri)
    start = time.perf_counter()
    rows, failures = run_cells(suite.name, sid, plans, tracker, out, make_executor(config, out),
                               progress=not args.no_progress)
    if not rows:
        print(f"nightly {suite.name}: no cell finished; {len(failures)} failed (errors: {out / 'failures.csv'})")
        return EXIT_INTERNAL
    _, table = write_summary(suite.name, sid, base, suite.cells, rows, out)
    print(table)
    current = nightly.cell_summaries(rows, sorted(set(tolerances) | {"fid", "kid_mean", "nfe", "latency_per_image_ms"}))
    try:
        comparisons = nightly.compare(baseline, current, tolerances) if baseline else []
    except BenchError:
        if not args.update_baseline:
            raise
        comparisons = []  # the protocol changed: the new baseline replaces the old one without a comparison
    section_md = nightly.comparison_md(comparisons, str(baseline_path)) if baseline else "No baseline yet."
    (out / "comparison.md").write_text(section_md + "\n")
    nightly.write_json(out / "comparison.json", {"baseline": str(baseline_path), "rule": nightly.RULE,
                                                  "tolerances": tolerances, "wall_seconds": time.perf_counter() - start,
                                                  "comparisons": nightly.comparisons_json(comparisons)})
    from bench.report import Section

    sections = [Section("Comparison with the baseline", nightly.comparison_html(comparisons, str(baseline_path))
                        if baseline else "<p>No baseline yet.</p>", section_md)]
    print(write_report(tracker, suite.name, sid, rows, sections, Path(args.report) if args.report else out / "report.html"))
    if comparisons:
        print(section_md)
    failed = f"; {len(failures)} run{'s' * (len(failures) != 1)} failed (errors: {out / 'failures.csv'})" \
        if failures else ""
    if args.update_baseline and failures:
        print(f"baseline not updated: it would miss the failed runs{failed}", file=sys.stderr)
        return EXIT_INTERNAL
    if args.update_baseline:
        nightly.write_json(baseline_path, nightly.baseline_document(suite.name, current, tolerances, environment(plans)))
        print(f"baseline updated: {baseline_path} ({len(current)} cells); review and commit it")
        return 0
    bad = nightly.regressions(comparisons)
    print(f"nightly {suite.name}: {len(rows)} runs in {time.perf_counter() - start:.0f} s; "
          f"{len(bad)} regression{'s' * (len(bad) != 1)}{failed}")
    if bad:
        for c in bad:
            print(f"bench: regression: {c.line()}", file=sys.stderr)
        return EXIT_REGRESSION  # a regression outranks a failed cell: it is what a nightly is for
    return EXIT_INTERNAL if failures else 0
