"""`bench claims`: decide every paper claim the adapters declare, from runs (made, or reused from MLflow)."""

from __future__ import annotations

import sys
from pathlib import Path

from bench.cli import options


def add_parser(sub, argv: list[str]) -> None:
    p = sub.add_parser(
        "claims",
        help="decide the paper claims the methods declare (plan, reuse or make the runs, verdicts in MLflow)",
        description="Each method adapter declares its paper's claims (Method.claims: the statement, the paper's "
        "numbers, the runs, the metric, the relation and the tolerance rule). This command plans the runs they need "
        "(identical runs shared between claims), reuses FINISHED MLflow runs of the same protocol hash, makes the "
        "missing ones with the normal runner, prints one verdict per claim (holds, does not hold, not measured) with "
        "the values and 95% intervals over seeds, and records the verdicts as an MLflow run named 'claims'. "
        "Examples: bench claims --quick --plan; bench claims --method ddim --quick; bench claims --markdown. "
        "The runs are made in this process, on Ray or as Slurm jobs (--executor; docs/scale.md). "
        "Exit code: 0 when every claim was measured (whatever its verdict), 1 if a run failed, 2 on bad input.",
    )
    p.add_argument("--method", action="append", metavar="M", type=options.comma_list,
                   help="only the claims of these methods (repeatable or comma-separated; default: every method)")
    p.add_argument("--claim", action="append", metavar="ID", type=options.comma_list,
                   help="only these claims (their id, or method/id; repeatable or comma-separated)")
    p.add_argument("--quick", action="store_true",
                   help="each arm at its quick size (fewer samples and seeds; the default test suite uses it)")
    p.add_argument("--plan", "--dry-run", dest="plan", action="store_true",
                   help="print the runs and the estimated time, run nothing")
    p.add_argument("--markdown", action="store_true",
                   help="print the verdicts as a markdown table (for README.md and docs/claims.md)")
    p.add_argument("--update", action="append", metavar="FILE", default=[],
                   help="write the markdown table between the '<!-- bench claims --markdown: begin/end -->' markers "
                   "of FILE (repeatable; README.md, docs/editing.md), replacing what was there")
    p.add_argument("--no-reuse", action="store_true", help="make every run even if MLflow has a FINISHED one")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--experiment", help="MLflow experiment (default: diffbench)")
    p.add_argument("--tracking-uri",
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--output", default="bench-runs/claims", help="folder of the claims table (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    options.add_executor_options(p)
    p.set_defaults(func=run)


BEGIN = "<!-- bench claims --markdown: begin -->"
END = "<!-- bench claims --markdown: end -->"


def read_markers(path: Path) -> tuple[str, int, int]:
    """The file's text and the span between its claims markers; BenchError (bad input) if it has none."""
    from bench.errors import BenchError

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchError(f"--update {path}: cannot read it ({exc.__class__.__name__})") from None
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise BenchError(f"--update {path}: no '{BEGIN}' ... '{END}' markers in it")
    return text, start + len(BEGIN), end


def update_markers(path: Path, table: str, quick: bool, methods: list[str] | None = None) -> None:
    """Replace what lies between the markers with the table (and the command that made it)."""
    text, start, end = read_markers(path)
    command = " ".join(["bench claims", *(["--quick"] if quick else []),
                        *([f"--method {','.join(methods)}"] if methods else []), "--markdown", f"--update {path}"])
    body = f"\n\n{table}\n\n(written by `{command}`)\n\n"
    path.write_text(text[:start] + body + text[end:], encoding="utf-8")


def run(args) -> int:
    from bench.claims import (UNMEASURED, execute_plan, format_plan, format_table, markdown_table, plan_claims,
                              record, select_claims)
    from bench.errors import BenchError
    from bench.executors import executor_config, make_executor, warn_if_local_store
    from bench.spec import RunSpec
    from bench.tracking import Tracker

    config = executor_config(options.executor_values(args))
    methods = [m for group in (args.method or []) for m in group]
    refs = select_claims(methods or None)
    wanted = [c for group in (args.claim or []) for c in group]
    if wanted:
        known = {r.qualified for r in refs} | {r.claim.id for r in refs}
        unknown = [c for c in wanted if c not in known]
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], sorted(known), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else " (bench claims --plan lists them)"
            raise BenchError(f"unknown claim {unknown[0]!r}{hint}")
        refs = [r for r in refs if r.qualified in wanted or r.claim.id in wanted]
    if not refs:
        raise BenchError(f"no claims are declared by {', '.join(methods) or 'any method'}")
    for path in args.update:
        read_markers(Path(path))  # bad input before any run
    base = RunSpec(device=args.device or "auto", experiment=args.experiment or "diffbench")
    plan = plan_claims(refs, quick=args.quick, base=base)
    print(format_plan(plan), file=sys.stderr if args.markdown else sys.stdout, flush=True)
    if args.plan:
        return 0
    tracker = Tracker(args.tracking_uri, base.experiment)
    tracker.check()
    warn_if_local_store(config, tracker.uri)

    def log(line: str) -> None:  # on stderr: stdout holds the verdicts alone (--markdown)
        print(line, file=sys.stderr, flush=True)

    execution = execute_plan(plan, tracker, progress=not args.no_progress, log=log, reuse=not args.no_reuse,
                             executor=make_executor(config, Path(args.output), log))
    from bench.claims import judge

    verdicts = judge(plan, execution.results, execution.errors, execution.run_ids)
    run_id = record(verdicts, tracker, plan, execution, Path(args.output))
    print(markdown_table(verdicts) if args.markdown else format_table(verdicts))
    for path in args.update:
        update_markers(Path(path), markdown_table(verdicts), quick=args.quick, methods=methods)
        print(f"wrote the claims table into {path}", file=sys.stderr)
    counts = {v: sum(x.verdict == v for x in verdicts) for v in ("holds", "does not hold", UNMEASURED)}
    print(f"{len(verdicts)} claims: {counts['holds']} hold, {counts['does not hold']} do not hold, "
          f"{counts[UNMEASURED]} not measured; {execution.made} runs made, {execution.reused} reused, "
          f"{len(execution.errors)} failed, {execution.seconds / 60:.1f} min; MLflow run {run_id} ({tracker.uri})",
          file=sys.stderr if args.markdown else sys.stdout)
    return 1 if execution.errors else 0
