"""Entry point of `bench` and `python -m bench`: dispatch, and the exit-code contract.

0 ok, 1 internal error, 2 bad input (one line on stderr, no traceback), 3 regression.
Set BENCH_DEBUG=1 for tracebacks of internal errors.
"""

from __future__ import annotations

import argparse
import os
import sys

from bench.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, BenchError

SUBCOMMANDS = ("run", "sweep", "evaluate", "ls", "embedded", "leaderboard", "report", "nightly", "sync", "profile",
               "runs", "claims")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        raise BenchError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser(argv: list[str] | None = None) -> ArgumentParser:
    """The full parser; ``argv`` lets `run` and `sweep` add the options of the methods it names."""
    import importlib

    from bench import __version__

    parser = ArgumentParser(
        prog="bench",
        description="diffbench: benchmark and reproduce diffusion-model methods. "
        "Start with `bench run --method ddim --steps 50` (the embedded shapes world) or `bench ls`.",
    )
    parser.add_argument("--version", action="version", version=f"diffbench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name in SUBCOMMANDS:
        importlib.import_module(f"bench.cli.{name}").add_parser(sub, argv or [])
    return parser


def quiet_libraries() -> None:
    """Keep third-party INFO chatter (MLflow's database set-up, diffusers' notices) off the terminal."""
    import logging

    for name in ("mlflow", "alembic", "diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_libraries()
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_BAD_INPUT
        return int(args.func(args) or 0)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM inside a tracked run (bench.tracking.Terminated)
        print("bench: interrupted; samples written so far are kept in the output folder (finish the run with "
              "--resume)", file=sys.stderr)
        from bench.tracking import Terminated

        return 143 if isinstance(exc, Terminated) else 130
    except BrokenPipeError:  # the reader went away (`bench ls | head`): nothing left to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # an internal error: one line unless BENCH_DEBUG asks for the traceback
        if os.environ.get("BENCH_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"bench: internal error: {type(exc).__name__}: {first} (BENCH_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
