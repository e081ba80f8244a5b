"""`bench sync`: upload runs that finished while the MLflow store was unreachable."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from bench.errors import EXIT_INTERNAL, BenchError


def add_parser(sub, argv: list[str]) -> None:
    p = sub.add_parser(
        "sync",
        help="upload runs kept locally because the MLflow store was unreachable",
        description="Find run folders holding mlflow-pending.json (written when the tracking store stopped "
        "answering mid-run) and create their MLflow runs from the local record: params, tags, metrics and "
        "artifacts as the run logged them. A synced folder's record becomes mlflow-synced.json. "
        "Example: MLFLOW_TRACKING_URI=http://mlflow.internal:5000 bench sync",
    )
    p.add_argument("folders", nargs="*", metavar="FOLDER", help="run folders (default: all under --output-root)")
    p.add_argument("--output-root", default="bench-runs", help="where to look for run folders (default: bench-runs)")
    p.add_argument("--tracking-uri", help="MLflow store to upload to (default: MLFLOW_TRACKING_URI, else the "
                   "store each run was meant for)")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded")
    p.set_defaults(func=run)


def pending_records(folders: list[str], root: str) -> list[Path]:
    from bench.tracking import PENDING_RECORD

    if folders:
        missing = [f for f in folders if not (Path(f) / PENDING_RECORD).is_file()]
        if missing:
            raise BenchError(f"no {PENDING_RECORD} in {', '.join(missing)}")
        return [Path(f) / PENDING_RECORD for f in folders]
    if not Path(root).is_dir():
        raise BenchError(f"--output-root {root} is not a folder")
    return sorted(Path(root).rglob(PENDING_RECORD))


STATUSES = ("FINISHED", "FAILED", "KILLED")


def load_record(path: Path) -> dict:
    """A pending record, checked field by field before anything is uploaded; one line (BenchError) if malformed."""
    import math

    from bench.spec import read_small_file

    try:
        record = json.loads(read_small_file(path, "pending record", 64 << 20))
    except json.JSONDecodeError as exc:
        raise BenchError(f"{path} is not a pending record: invalid JSON ({exc})") from None

    def bad(why: str) -> BenchError:
        return BenchError(f"{path} is not a valid pending record: {why}; nothing was uploaded")

    if not isinstance(record, dict):
        raise bad("not a JSON object")
    for key in ("name", "experiment", "tracking_uri"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise bad(f"{key!r} must be a non-empty string")
    if record.get("status") not in STATUSES:
        raise bad(f"'status' must be one of {', '.join(STATUSES)}, got {record.get('status')!r}")
    for key in ("params", "tags"):
        if not isinstance(record.get(key), dict) or not all(isinstance(k, str) and k for k in record[key]):
            raise bad(f"{key!r} must be an object of named values")
    metrics = record.get("metrics")
    if not isinstance(metrics, dict) or not all(
            isinstance(k, str) and k and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for k, v in metrics.items()):
        raise bad("'metrics' must be an object of finite numbers")
    artifacts = record.get("artifacts")
    if not isinstance(artifacts, list) or not all(isinstance(a, str) and a for a in artifacts):
        raise bad("'artifacts' must be a list of paths")
    missing = [a for a in artifacts if not (path.parent / a).is_file()]
    if missing:
        raise bad(f"artifact {missing[0]} is not in {path.parent}")
    start, end = record.get("start_time"), record.get("end_time")
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise bad("'start_time' must be a time in milliseconds")
    if end is not None and (not isinstance(end, int) or isinstance(end, bool) or end < start):
        raise bad("'end_time' must be null or a time in milliseconds after start_time")
    if record.get("partial_run_id") is not None and not isinstance(record["partial_run_id"], str):
        raise bad("'partial_run_id' must be a run id or null")
    return record


def sync_one(path: Path, uri: str | None, record: dict | None = None) -> tuple[str, str]:
    """Replay one record; returns (run id, store). The record is renamed only after the upload succeeded."""
    from bench.tracking import SYNCED_RECORD, Tracker

    record = record if record is not None else load_record(path)
    target = uri or record["tracking_uri"]
    tracker = Tracker(target, record["experiment"])
    tracker.check()
    run_id = tracker.replay(record, path.parent)
    if record.get("partial_run_id") and target == record["tracking_uri"]:  # the run the store got half of
        try:
            tracker.client.set_terminated(record["partial_run_id"], status="FAILED")
            tracker.client.set_tag(record["partial_run_id"], "superseded_by", run_id)
        except Exception:
            pass
    results = path.parent / "results.json"
    if results.is_file():
        data = json.loads(results.read_text())
        data["run_id"] = run_id
        results.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    synced = {**record, "synced_run_id": run_id, "synced_tracking_uri": tracker.uri}
    (path.parent / SYNCED_RECORD).write_text(json.dumps(synced, indent=2, sort_keys=True) + "\n")
    path.unlink()
    return run_id, tracker.uri


def run(args) -> int:
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    records = pending_records(args.folders, args.output_root)
    if not records:
        print(f"nothing to sync under {args.output_root}")
        return 0
    loaded = {path: load_record(path) for path in records}  # every record valid before the first upload
    failed = 0
    for path in records:
        record = loaded[path]
        where = uri or record["tracking_uri"]
        if args.dry_run:
            print(f"would upload {path.parent} ({record['name']}, {record['status']}) to {where}")
            continue
        try:
            run_id, store = sync_one(path, uri, record)
        except BenchError:
            raise  # the store is unreachable: the same for every record
        except Exception as exc:
            failed += 1
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            print(f"FAILED {path.parent}: {type(exc).__name__}: {first} (the record is kept)", file=sys.stderr)
            continue
        print(f"synced {path.parent} -> run {run_id} ({store})")
    return EXIT_INTERNAL if failed else 0
