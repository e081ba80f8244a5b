"""`bench leaderboard`: rank method configurations from the MLflow runs, mean and 95% CI over seeds."""

from __future__ import annotations

from bench.cli import options

FORMATS = ("table", "md", "csv")


def add_selection_options(p) -> None:
    """The options that pick runs (shared with `bench report`)."""
    p.add_argument("--experiment", help="MLflow experiment (default: all experiments)")
    p.add_argument("--dataset", help="only runs on this data set (e.g. shapes16)")
    p.add_argument("--protocol", type=options.comma_list, metavar="HASH[,HASH]",
                   help="only runs whose eval_protocol_hash starts with one of these prefixes")
    p.add_argument("--metric", default="fid", help="the metric to rank by (default: fid; e.g. kid_mean, "
                   "latency_per_image_ms)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")


def selection_from_args(args):
    from bench.leaderboard import Selection

    return Selection(args.experiment, args.dataset, tuple(args.protocol or ()))


def add_parser(sub, argv: list[str]) -> None:
    p = sub.add_parser(
        "leaderboard",
        help="rank method configurations from MLflow runs (mean and 95%% CI over seeds)",
        description="One row per method configuration (method, method args, steps, model, dtype) over the "
        "FINISHED runs: mean and 95%% t-interval over seeds, NFE, latency per image; grouped by metric "
        "protocol and device. Runs measured under different protocols for the ranked metric are refused, "
        "not mixed. Example: bench leaderboard --dataset shapes16 --metric fid --format md",
    )
    add_selection_options(p)
    p.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    p.set_defaults(func=run)


def run(args) -> int:
    from bench.leaderboard import fetch_runs, format_board, leaderboard

    runs = fetch_runs(args.tracking_uri, selection_from_args(args))
    board = leaderboard(runs, args.metric)
    print(format_board(board, args.metric, args.format), end="" if args.format == "csv" else "\n")
    return 0
