"""Every run is an MLflow run, written through ``MlflowClient`` (no global fluent state).

Store: ``MLFLOW_TRACKING_URI`` if set (or ``--tracking-uri``), else MLflow's default, a
SQLite file ``mlflow.db`` in the working directory. The store is checked before any
work starts; a run that raises is ended FAILED (KILLED on Ctrl-C), never left RUNNING.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from bench.errors import BenchError

MAX_PARAM_LENGTH = 6000


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    def __init__(self, uri: str | None = None, experiment: str = "diffbench"):
        # fail fast on an unreachable server instead of MLflow's minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri or mlflow.get_tracking_uri()
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri=self.uri)
        self._experiment_id: str | None = None

    def check(self) -> None:
        """Reach the store and find (or create) the experiment; one clear line if that fails."""
        if self.uri.startswith("sqlite:///"):
            db = Path(self.uri[len("sqlite:///"):])
            if not db.parent.is_dir() or not os.access(db.parent, os.W_OK):
                raise BenchError(f"cannot write the MLflow tracking database {db}: {db.parent} is not a writable folder")
        try:
            exp = self.client.get_experiment_by_name(self.experiment)
            self._experiment_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise BenchError(f"MLflow tracking store {self.uri} is unreachable: {first}") from None

    @contextmanager
    def run(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> Iterator["TrackedRun"]:
        from mlflow.entities import Param, RunTag

        if self._experiment_id is None:
            self.check()
        run = self.client.create_run(self._experiment_id, run_name=name, tags=dict(tags))
        run_id = run.info.run_id
        status = "FAILED"
        try:
            flat = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in flatten(params).items()}
            items = [Param(k, v) for k, v in sorted(flat.items())]
            for i in range(0, len(items), 100):
                self.client.log_batch(run_id, params=items[i : i + 100])
            tracked = TrackedRun(self.client, run_id)
            yield tracked
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            try:
                self.client.set_terminated(run_id, status=status)
            except Exception:  # the store went away mid-run: nothing more can be recorded there
                pass

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


class TrackedRun:
    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id

    def log_metrics(self, values: Mapping[str, float]) -> None:
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, 0) for k, v in sorted(values.items()) if not math.isnan(float(v))]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path) -> None:
        self.client.log_artifact(self.run_id, str(path))
