"""`bench runs`: the runs of the MLflow store left RUNNING, and `--repair` to end those whose process is gone.

A run killed by SIGKILL (the out-of-memory killer, a node lost) cannot end its MLflow run; it stays RUNNING.
Every run is tagged with its process id and host (diffbench_pid, diffbench_host): a RUNNING run of this host
whose process no longer exists is dead, and `--repair` ends it as KILLED (`bench run --resume` into its output
folder still finishes it later, in the same MLflow run). Runs of other hosts are listed, never touched, unless
`--host-any` says their processes are known to be gone.
"""

from __future__ import annotations

import os
import platform


def add_parser(sub, argv: list[str]) -> None:
    p = sub.add_parser(
        "runs",
        help="list runs left RUNNING; --repair ends those whose process is gone as KILLED",
        description="List the store's runs that are RUNNING, with their process and whether it is alive. With "
        "--repair, end the dead ones (their process is gone from this host) as KILLED, tagged "
        "diffbench_repaired. Example: bench runs --repair",
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="diffbench", help="MLflow experiment (default: diffbench)")
    p.add_argument("--repair", action="store_true", help="end the RUNNING runs whose process is gone as KILLED")
    p.add_argument("--host-any", action="store_true", help="also end RUNNING runs of other hosts (their processes "
                   "cannot be checked from here)")
    p.set_defaults(func=run)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def state_of(run, host: str) -> str:
    tags = run.data.tags
    pid = tags.get("diffbench_pid", "")
    if not pid.isdigit():
        return "unknown (no process tag)"
    if tags.get("diffbench_host") != host:
        return f"on host {tags.get('diffbench_host')}"
    if int(pid) == os.getpid() or alive(int(pid)):
        return "alive"
    return "dead"


def run(args) -> int:
    from bench.tracking import Tracker

    tracker = Tracker(args.tracking_uri, args.experiment)
    tracker.check()
    runs = tracker.client.search_runs([tracker._experiment_id], filter_string="attributes.status = 'RUNNING'",
                                      max_results=10000)
    host = platform.node()
    if not runs:
        print(f"no RUNNING runs in {tracker.uri} (experiment {args.experiment})")
        return 0
    for r in runs:
        state = state_of(r, host)
        dead = state == "dead" or (args.host_any and state.startswith("on host"))
        action = ""
        if args.repair and dead:
            tracker.client.set_tag(r.info.run_id, "diffbench_repaired", "process gone; ended by bench runs --repair")
            tracker.client.set_terminated(r.info.run_id, status="KILLED")
            action = " -> KILLED"
        print(f"{r.info.run_id}  {r.info.run_name}  pid {r.data.tags.get('diffbench_pid', '?')}: {state}{action}  "
              f"{r.data.tags.get('output', '')}")
    return 0
