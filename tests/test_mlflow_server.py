"""A real `mlflow server` (SQLite backend, artifact proxy): concurrent `bench run`s, and a server lost mid-run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bench.cli.main import main

ARTIFACTS = {"grid.png", "config.json", "results.json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(folder: Path):
    """`mlflow server` on 127.0.0.1 with a SQLite backend in FOLDER; yields (uri, process)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = open(folder / "server.log", "w")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
           "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not come up: {(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri, proc
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen) -> None:
    """End the server and its workers (its own process group, started above)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def warm_reference_features() -> None:
    """Compute the shapes16 reference features once, instead of in each of the concurrent runs."""
    import torch

    from bench.catalog import DATASETS
    from bench.evaluation import EvalContext
    from bench.spec import RunSpec
    from bench.extractors import extractor_for

    reference = DATASETS.get("shapes16")()
    info = extractor_for(reference)
    ctx = EvalContext(RunSpec(), torch.zeros(1, 3, 16, 16, dtype=torch.uint8), reference, torch.device("cpu"))
    ctx.reference_features(info.name, info.layer, info.digest())


@pytest.mark.slow  # about 130 CPU-seconds: 8 processes each import torch, diffusers and mlflow
def test_eight_concurrent_runs_against_one_server(tmp_path, tiny_model_dir):
    warm_reference_features()
    with mlflow_server(tmp_path / "server") as (uri, _):
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        procs = []
        start = time.perf_counter()
        for i in range(8):
            cmd = [sys.executable, "-m", "bench", "run", "--model", str(tiny_model_dir), "--method",
                   ("ddim", "ddpm")[i % 2], "--steps", "2", "--seed", str(i), "--num-samples", "128",
                   "--batch-size", "128", "--no-progress", "--output", str(tmp_path / f"run{i}")]
            procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        outputs = [p.communicate(timeout=900) for p in procs]
        print(f"8 concurrent runs took {time.perf_counter() - start:.1f} s")
        for p, (out, err) in zip(procs, outputs):
            assert p.returncode == 0 and "stopped answering" not in err, err[-2000:]
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("diffbench")
        runs = client.search_runs([exp.experiment_id], max_results=100)
        assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs)
        for run in runs:
            assert {a.path for a in client.list_artifacts(run.info.run_id)} == ARTIFACTS
            results = json.loads((Path(run.data.tags["output"]) / "results.json").read_text())
            assert results["run_id"] == run.info.run_id
            assert run.data.metrics["fid"] == pytest.approx(results["values"]["fid"])
        assert sorted(int(r.data.params["spec.seed"]) for r in runs) == list(range(8))
        local = Path(client.download_artifacts(runs[0].info.run_id, "grid.png", str(tmp_path)))
        assert local.read_bytes() == (Path(runs[0].data.tags["output"]) / "grid.png").read_bytes()


def test_server_lost_mid_run_keeps_results_and_sync_uploads_them(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import bench.runner

    monkeypatch.chdir(tmp_path)
    original = bench.runner.evaluate
    with mlflow_server(tmp_path / "first") as (uri, proc):

        def evaluate_after_server_died(*args, **kwargs):  # the run exists on the server; then it goes away
            stop(proc)
            return original(*args, **kwargs)

        monkeypatch.setattr(bench.runner, "evaluate", evaluate_after_server_died)
        rc = main(["run", "--model", str(tiny_model_dir), "--method", "ddim", "--steps", "3", "--num-samples", "128",
                   "--batch-size", "64", "--no-progress", "--tracking-uri", uri, "--run-name", "lost"])
        monkeypatch.setattr(bench.runner, "evaluate", original)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "stopped answering" in captured.err and "bench sync" in captured.err
    (pending,) = list((tmp_path / "bench-runs").rglob("mlflow-pending.json"))
    folder = pending.parent
    record = json.loads(pending.read_text())
    results = json.loads((folder / "results.json").read_text())
    assert record["status"] == "FINISHED" and record["partial_run_id"] and record["metrics"]["fid"] == results["values"]["fid"]
    assert len(list((folder / "samples").glob("shard-*.npy"))) == 2

    with mlflow_server(tmp_path / "second") as (uri2, _):
        assert main(["sync", "--dry-run", "--tracking-uri", uri2]) == 0
        assert "would upload" in capsys.readouterr().out
        assert main(["sync", "--tracking-uri", uri2]) == 0
        assert "synced" in capsys.readouterr().out
        client = MlflowClient(uri2)
        (run,) = client.search_runs([client.get_experiment_by_name("diffbench").experiment_id])
        assert run.info.status == "FINISHED" and run.info.run_name == "lost"
        assert run.data.tags["spooled"] == "true" and run.data.tags["samples_sha256"] == results["samples_sha256"]
        assert run.data.params["spec.steps"] == "3" and run.data.params["spec.method"] == "ddim"
        assert run.data.metrics["fid"] == pytest.approx(results["values"]["fid"])
        assert set(results["values"]) >= set(run.data.metrics)
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == ARTIFACTS
        assert json.loads((folder / "results.json").read_text())["run_id"] == run.info.run_id
        assert not pending.exists() and (folder / "mlflow-synced.json").exists()
        assert main(["sync", "--tracking-uri", uri2]) == 0  # nothing is uploaded twice
        assert "nothing to sync" in capsys.readouterr().out
        assert len(client.search_runs([client.get_experiment_by_name("diffbench").experiment_id])) == 1
