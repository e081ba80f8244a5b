"""`bench report`: a self-contained HTML page (or markdown) comparing the MLflow runs."""

from __future__ import annotations

from pathlib import Path

from bench.cli.leaderboard import add_selection_options, selection_from_args
from bench.errors import BenchError

FORMATS = ("html", "md")


def add_parser(sub, argv: list[str]) -> None:
    p = sub.add_parser(
        "report",
        help="write a comparison report (HTML or markdown) from the MLflow runs",
        description="One self-contained HTML file (images inlined, nothing fetched): the leaderboard, "
        "quality-vs-NFE and quality-vs-latency (Pareto) plots, image grids at a shared seed, each method "
        "card's paper reference next to the reproduced value with pass/fail, and the environment. "
        "Example: bench report --dataset shapes16 --out reports/embedded.html",
    )
    add_selection_options(p)
    p.add_argument("--out", help="output file (default: reports/report.html, or .md with --format md)")
    p.add_argument("--format", choices=FORMATS, help="html or md (default: from --out's suffix, else html)")
    p.add_argument("--title", default="diffbench report", help="the page's title")
    p.add_argument("--per-protocol", action="store_true",
                   help="runs of different metric protocols (data set, sample count, extractor) each get their own "
                   "ranked group instead of a refusal; nothing is ranked across protocols")
    p.set_defaults(func=run)


def check_out_file(out: Path) -> None:
    """--out must be a file we can write: not a folder, not under a file, in a writable folder."""
    from bench.runner import check_writable

    if out.is_dir():
        raise BenchError(f"--out {out} is a folder; name the report file (e.g. {out / 'report.html'})")
    check_writable(out.parent, "--out's folder")
    if out.exists():
        try:
            with open(out, "ab"):
                pass
        except OSError as exc:
            raise BenchError(f"--out {out} is not writable: {exc.strerror or exc}") from None


def run(args) -> int:
    from bench import report
    from bench.leaderboard import fetch_runs
    from bench.tracking import Tracker

    fmt = args.format or ("md" if args.out and args.out.endswith(".md") else "html")
    out = Path(args.out or f"reports/report.{fmt}")
    check_out_file(out)  # before the store is read
    selection = selection_from_args(args)
    runs = fetch_runs(args.tracking_uri, selection)
    from bench.claims import latest_verdicts

    tracker = Tracker(args.tracking_uri)
    latest = latest_verdicts(tracker, selection.experiment)  # the verdicts of the newest `bench claims` run
    data = report.build(runs, args.metric, tracker.client, tracker.uri, args.title,
                        f"{len(runs)} FINISHED runs ({selection.describe()}), ranked by {args.metric}",
                        verdicts=latest[0] if latest else None, per_protocol=args.per_protocol)
    try:
        report.write(data, out, fmt)
    except OSError as exc:
        raise BenchError(f"cannot write the report {out}: {exc.strerror or exc}") from None
    print(f"report: {out} ({out.stat().st_size / 1024:.0f} KiB, {len(data.board)} configurations, "
          f"{len(runs)} runs)")
    return 0
