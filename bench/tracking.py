"""Every run is an MLflow run, written through ``MlflowClient`` (no global fluent state).

Store: ``MLFLOW_TRACKING_URI`` if set (or ``--tracking-uri``), else MLflow's default, a
SQLite file ``mlflow.db`` in the working directory. The store is checked before any
work starts; a run that raises is ended FAILED (KILLED on Ctrl-C or SIGTERM), never left RUNNING
(only SIGKILL can: `bench run --resume` then reopens and finishes that same run).
A store that stops answering mid-run loses nothing: the run's record is spooled to
its output folder (``mlflow-pending.json``) and ``bench sync`` uploads it later.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from bench.errors import BenchError

MAX_PARAM_LENGTH = 6000
PENDING_RECORD = "mlflow-pending.json"  # in a run's output folder: a run the store did not get; `bench sync`
SYNCED_RECORD = "mlflow-synced.json"  # the same record after `bench sync` uploaded it


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, torchrun ending its workers, a batch scheduler's time limit), handled as Ctrl-C is."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Raise Terminated on SIGTERM while the block runs (main thread only: signals are delivered there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextmanager
def _quiet_store() -> Iterator[None]:
    """MLflow's SQL store logs whole SQLAlchemy tracebacks on a failed write; the caller says it in one line."""
    from bench.files import quiet_loggers

    with quiet_loggers("mlflow", "alembic", "sqlalchemy"):
        yield


def _sqlite_write_check(db: Path) -> None:
    """A write transaction on the store's file, rolled back: raises if the file cannot be written (read-only file,
    mount or header, a full disk), whoever runs it."""
    import sqlite3

    con = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        con.execute("CREATE TABLE diffbench_write_check (x)")
        con.execute("ROLLBACK")
    finally:
        con.close()


class Tracker:
    def __init__(self, uri: str | None = None, experiment: str = "diffbench"):
        # fail fast on an unreachable server instead of MLflow's minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        import mlflow

        self.uri = uri or mlflow.get_tracking_uri()
        self.experiment = experiment
        self._client = None
        self._experiment_id: str | None = None

    @property
    def client(self):
        from mlflow.tracking import MlflowClient

        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def check(self) -> None:
        """Reach the store, find (or create) the experiment and write to it; one clear line if any fails.

        The write (an experiment tag) is what a run does first: a read-only store is refused here, before any
        sampling, not after it with the results left in the pending file.
        """
        from bench.spec import MAX_EXPERIMENT_NAME

        if not isinstance(self.experiment, str) or not self.experiment.strip():
            raise BenchError(f"the MLflow experiment name must not be empty, got {self.experiment!r}")
        if len(self.experiment) > MAX_EXPERIMENT_NAME:
            raise BenchError(f"experiment name is {len(self.experiment)} characters; MLflow takes at most "
                             f"{MAX_EXPERIMENT_NAME}")
        if self.uri.startswith("sqlite:///"):
            db = Path(self.uri[len("sqlite:///"):])
            try:
                db.parent.mkdir(parents=True, exist_ok=True)  # as MLflow itself would
            except OSError:
                pass
            if not db.parent.is_dir() or not os.access(db.parent, os.W_OK):
                raise BenchError(f"cannot write the MLflow tracking database {db}: {db.parent} is not a writable folder")
            if db.exists() and (not db.is_file() or not os.access(db, os.R_OK | os.W_OK)):
                raise BenchError(f"cannot write the MLflow tracking database {db}: it is read-only or not a file")
        try:
            with _quiet_store():
                exp = self.client.get_experiment_by_name(self.experiment)
                self._experiment_id = exp.experiment_id if exp else self._create_experiment()
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise BenchError(f"MLflow tracking store {self.uri} is unreachable: {first}") from None
        try:
            if self.uri.startswith("sqlite:///"):
                _sqlite_write_check(Path(self.uri[len("sqlite:///"):]))
            else:  # a new value each time: a tag set to the value it has is no write at all
                with _quiet_store():
                    self.client.set_experiment_tag(self._experiment_id, "diffbench.write_check", uuid.uuid4().hex)
        except Exception as exc:
            self._experiment_id = None
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise BenchError(f"MLflow tracking store {self.uri} is not writable: {first}") from None

    def _create_experiment(self) -> str:
        try:
            return self.client.create_experiment(self.experiment)
        except Exception:  # another process created it meanwhile (runs started at once on a shared server)
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    @contextmanager
    def run(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str],
            run_id: str | None = None) -> Iterator["TrackedRun"]:
        """A new run, or with ``run_id`` that run reopened (set RUNNING again: a resumed run)."""
        if self._experiment_id is None:
            self.check()
        with sigterm_as_interrupt():
            tracked = TrackedRun(self, name, params, tags, run_id)
            status = "FAILED"
            try:
                yield tracked
                status = "FINISHED"
            except KeyboardInterrupt:
                status = "KILLED"
                raise
            finally:
                tracked.end(status)

    def find_run(self, tag: str, value: str) -> str | None:
        """The id of the run of this experiment whose tag ``tag`` is ``value`` (the newest), or None."""
        if self._experiment_id is None:
            self.check()
        runs = self.client.search_runs([self._experiment_id], filter_string=f"tags.{tag} = '{value}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    def check_run(self, run_id: str) -> None:
        """One line if ``run_id`` is not a live run of this store (a resumed run recorded elsewhere)."""
        try:
            lifecycle = self.client.get_run(run_id).info.lifecycle_stage
        except Exception:
            raise BenchError(f"MLflow run {run_id} is not in the tracking store {self.uri}") from None
        if lifecycle != "active":
            raise BenchError(f"MLflow run {run_id} in {self.uri} was deleted; it cannot be resumed")

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def replay(self, record: Mapping[str, Any], folder: Path) -> str:
        """Create a run from a spooled record (see TrackedRun.spool); artifacts are read from ``folder``."""
        from mlflow.entities import Metric, Param

        if self._experiment_id is None:
            self.check()
        tags = {**record["tags"], "spooled": "true"}
        run = self.client.create_run(self._experiment_id, start_time=record["start_time"], tags=tags,
                                     run_name=record["name"])
        run_id = run.info.run_id
        try:
            params = [Param(k, v) for k, v in sorted(record["params"].items())]
            for i in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[i : i + 100])
            t = record["end_time"] or record["start_time"]
            metrics = [Metric(k, float(v), t, 0) for k, v in sorted(record["metrics"].items())]
            if metrics:
                self.client.log_batch(run_id, metrics=metrics)
            for artifact in record["artifacts"]:  # relative paths keep their folder (method/...)
                parent = str(Path(artifact).parent)
                self.client.log_artifact(run_id, str(folder / artifact), None if parent == "." else parent)
        except BaseException:
            with suppress(Exception):
                self.client.set_terminated(run_id, status="FAILED")
            raise
        self.client.set_terminated(run_id, status=record["status"], end_time=record["end_time"])
        return run_id


class TrackedRun:
    """One MLflow run and the record of everything logged to it.

    If the store stops answering after the run has started (a tracking server killed
    mid-run), the run goes offline: later calls only add to the record, which
    ``spool`` writes next to the run's files for ``bench sync`` to replay later.
    """

    def __init__(self, tracker: Tracker, name: str, params: Mapping[str, Any], tags: Mapping[str, str],
                 run_id: str | None = None):
        self.client = tracker.client
        self.run_id: str | None = None
        self.error: str | None = None  # the first tracking failure; set means offline
        self.record: dict[str, Any] = {
            "name": name, "experiment": tracker.experiment, "tracking_uri": tracker.uri,
            "params": {k: str(v)[:MAX_PARAM_LENGTH] for k, v in flatten(params).items()},
            "tags": {k: str(v) for k, v in tags.items()}, "metrics": {}, "artifacts": [],
            "start_time": int(time.time() * 1000), "end_time": None, "status": "RUNNING",
        }
        self._call(lambda: self._start(tracker._experiment_id, run_id))

    def _start(self, experiment_id: str, run_id: str | None) -> None:
        from mlflow.entities import Param, RunTag

        rec = self.record
        logged: Mapping[str, str] = {}
        if run_id is None:
            self.run_id = self.client.create_run(experiment_id, run_name=rec["name"], tags=rec["tags"],
                                                 start_time=rec["start_time"]).info.run_id
        else:  # resumed: RUNNING again, tags updated, the params it lacks (killed while logging them) added
            self.run_id = run_id
            run = self.client.get_run(run_id)
            rec["start_time"], logged = run.info.start_time, run.data.params
            self.client.update_run(run_id, status="RUNNING")
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in rec["tags"].items()])
        items = [Param(k, v) for k, v in sorted(rec["params"].items()) if k not in logged]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    @property
    def offline(self) -> bool:
        return self.error is not None

    def _call(self, action: Callable[[], None]) -> None:
        if self.error is not None:
            return
        try:
            action()
        except Exception as exc:  # the store went away: keep the record, stop talking to the store
            self.error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"

    def log_metrics(self, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        kept = {k: float(v) for k, v in sorted(values.items()) if not math.isnan(float(v))}
        self.record["metrics"].update(kept)
        if kept:
            self._call(lambda: self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, 0) for k, v in kept.items()]))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        tags = {k: str(v) for k, v in tags.items()}
        self.record["tags"].update(tags)
        self._call(lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()]))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file; ``artifact_path`` (a folder in the run's artifacts) should mirror its place in the output
        folder, which is where `bench sync` puts it back."""
        self.record["artifacts"].append(str(Path(path).resolve()))
        self._call(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def end(self, status: str) -> None:
        self.record["status"] = status
        self.record["end_time"] = int(time.time() * 1000)
        self._call(lambda: self.client.set_terminated(self.run_id, status=status, end_time=self.record["end_time"]))

    def spool(self, folder: Path) -> Path:
        """Write the record to FOLDER/mlflow-pending.json (artifact paths relative to FOLDER)."""
        folder = folder.resolve()
        artifacts = []
        for a in self.record["artifacts"]:
            p = Path(a)
            artifacts.append(str(p.relative_to(folder)) if p.is_relative_to(folder) else str(p))
        record = {**self.record, "artifacts": artifacts, "partial_run_id": self.run_id, "error": self.error}
        path = folder / PENDING_RECORD
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return path
