"""The MLflow record: what a run stores, and that no run is ever left RUNNING."""

import pytest
from mlflow.tracking import MlflowClient

from bench.errors import BenchError
from bench.tracking import Tracker, flatten


def test_finished_run_records_params_tags_metrics_and_artifacts(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "t")
    tracker.check()
    art = tmp_path / "config.json"
    art.write_text("{}")
    with tracker.run("r", {"spec": {"method": "ddim", "method_args": {"eta": 0.5}}}, {"method": "ddim"}) as run:
        run.log_metrics({"fid": 1.5, "nan_is_skipped": float("nan")})
        run.log_artifact(art)
    client = MlflowClient(uri)
    r = client.get_run(run.run_id)
    assert r.info.status == "FINISHED"
    assert r.data.params["spec.method_args.eta"] == "0.5"
    assert r.data.tags["method"] == "ddim"
    assert r.data.metrics == {"fid": 1.5}
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["config.json"]


def test_failing_run_is_marked_failed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "t")
    with pytest.raises(RuntimeError):
        with tracker.run("r", {}, {}) as run:
            raise RuntimeError("boom")
    assert MlflowClient(uri).get_run(run.run_id).info.status == "FAILED"


def test_interrupted_run_is_marked_killed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "t")
    with pytest.raises(KeyboardInterrupt):
        with tracker.run("r", {}, {}) as run:
            raise KeyboardInterrupt
    assert MlflowClient(uri).get_run(run.run_id).info.status == "KILLED"


def test_unreachable_server_is_one_line():
    with pytest.raises(BenchError, match="unreachable") as info:
        Tracker("http://127.0.0.1:9", "t").check()
    assert "\n" not in str(info.value)


def test_unwritable_database_folder(tmp_path):
    with pytest.raises(BenchError, match="not a writable folder"):
        Tracker("sqlite:////proc/diffbench/mlflow.db", "t").check()
    Tracker(f"sqlite:///{tmp_path}/new/dir/mlflow.db", "t").check()  # a missing folder is made, as MLflow does


def test_flatten_nested_params():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": {}}) == {"a.b": 1, "a.c.d": 2, "e": {}}
