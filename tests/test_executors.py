"""Executors of multi-run commands: local, Ray (a local 2-CPU instance) and submitit's local executor give the same
summary with one MLflow run per cell; a cell killed mid-run is retried and resumed; a cell that always fails is
reported and the others complete."""

import csv
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bench.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")

# 2 methods x 1 step count x 2 seeds; 8 batches per cell leave time to kill one mid-run
SWEEP = ["sweep", "--method", "ddim,ddpm", "--steps", "10", "--seeds", "2", "--num-samples", "128",
         "--batch-size", "16", "--metrics", "fid", "--no-progress"]
CELLS = [("ddim-10steps", "0"), ("ddim-10steps", "1"), ("ddpm-10steps", "0"), ("ddpm-10steps", "1")]
# one thread per submitit job: four jobs share this machine's two cores
SUBMITIT = ["--executor", "slurm", "--slurm-cluster", "local", "--slurm-cpus-per-task", "1"]


def sweep(folder: Path, model: Path, *extra: str) -> int:
    """`bench sweep` run from ``folder`` (its default MLflow store, sqlite:///mlflow.db, is there)."""
    os.chdir(folder)
    return main([*SWEEP, "--model", str(model), "--out", "out", *extra])


def runs_of(folder: Path):
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def cells_of(folder: Path) -> list[tuple[str, str]]:
    with open(folder / "out" / "runs.csv") as fh:
        return [(row["cell"], row["seed"]) for row in csv.DictReader(fh)]


def assert_same_summary(folder: Path, reference: Path) -> None:
    for name in ("table.md", "table.csv"):
        assert (folder / "out" / name).read_text() == (reference / "out" / name).read_text(), name
    assert cells_of(folder) == CELLS  # rows in cell order, whatever order the cells ended in


def assert_one_finished_run_per_cell(folder: Path) -> None:
    runs = runs_of(folder)
    cells = sorted((r.data.tags["sweep_cell"], r.data.params["spec.seed"]) for r in runs)
    assert cells == sorted(CELLS), cells  # no cell twice: retries reopened their run
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """The sweep with the local executor (the default), from its own folder."""
    cwd = os.getcwd()
    folder = tmp_path_factory.mktemp("local")
    try:
        assert sweep(folder, tiny_model_dir) == 0
    finally:
        os.chdir(cwd)
    return folder


@pytest.fixture()
def here(tmp_path):
    cwd = os.getcwd()
    yield tmp_path
    os.chdir(cwd)


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance with 2 CPUs for the module (starting one costs seconds); the executor uses it."""
    import logging

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield
    ray.shutdown()


def test_local_sweep_rows_in_cell_order_one_run_per_cell(reference):
    assert cells_of(reference) == CELLS
    assert_one_finished_run_per_cell(reference)
    assert not (reference / "out" / "failures.csv").exists()


def test_ray_sweep_gives_the_local_summary(reference, ray_instance, tiny_model_dir, here, capsys):
    assert sweep(here, tiny_model_dir, "--executor", "ray") == 0
    assert "4 tasks submitted to Ray" in capsys.readouterr().out
    assert_same_summary(here, reference)
    assert_one_finished_run_per_cell(here)


def test_submitit_local_sweep_gives_the_local_summary(reference, tiny_model_dir, here):
    assert sweep(here, tiny_model_dir, *SUBMITIT) == 0
    assert_same_summary(here, reference)
    assert_one_finished_run_per_cell(here)
    assert list((here / "out" / "slurm").glob("*_submitted.pkl"))  # the jobs went through submitit


@pytest.mark.parametrize("executor", ["slurm", "ray"])
def test_cell_killed_mid_run_is_retried_resumed_and_the_sweep_completes(executor, reference, tiny_model_dir, here,
                                                                        request):
    """SIGKILL the process of the first cell that wrote a shard (a submitit job, a Ray worker); the job is submitted
    again (Ray retries the task), and the new attempt resumes the cell: its shards kept, its MLflow run reopened."""
    if executor == "ray":
        request.getfixturevalue("ray_instance")
    args = SUBMITIT if executor == "slurm" else ["--executor", "ray"]
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", sweep(here, tiny_model_dir, *args)))
    thread.start()
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        for shard in here.glob("bench-runs/*/samples-index/shard-00000.json"):
            pid = int((shard.parent.parent / ".lock").read_text().split()[1])  # "pid N on host"
            assert pid != os.getpid()  # a job's process, not this one
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # that cell had ended already
                continue
            killed = shard.parent.parent.resolve()
            break
        time.sleep(0.002)
    thread.join(timeout=600)
    assert killed is not None, "no cell wrote a shard in time"
    assert result.get("rc") == 0
    assert_same_summary(here, reference)
    assert_one_finished_run_per_cell(here)
    (run,) = [r for r in runs_of(here) if r.data.tags["output"] == str(killed)]
    assert run.data.tags.get("resumed") == "true"
    assert json.loads((killed / "executor.json").read_text())["attempts"] == 2


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_cell_that_always_fails_is_reported_and_the_others_complete(executor, tiny_model_dir, here, capsys, request):
    """A file where the cell's samples folder goes: planning passes, every attempt fails at its first shard."""
    from bench.runner import plan_run
    from bench.spec import RunSpec
    from bench.sweep import Cell, cell_spec

    os.chdir(here)
    base = RunSpec(model=str(tiny_model_dir), num_samples=128, batch_size=16, metrics=("fid",), steps=10)
    broken = plan_run(cell_spec(base, Cell("ddpm", 10, 1), "sweep")).output.resolve()
    (broken / "samples").write_text("not a folder\n")

    if executor == "ray":
        request.getfixturevalue("ray_instance")
    assert sweep(here, tiny_model_dir, "--retries", "1", "--executor", executor) == 1
    out, err = capsys.readouterr()
    (line,) = [x for x in err.splitlines() if x.startswith("bench: cell")]
    assert "ddpm 10 steps, seed 1 failed after 2 attempt(s)" in line and "samples" in line
    with open(here / "out" / "failures.csv") as fh:
        (failure,) = list(csv.DictReader(fh))
    assert (failure["cell"], failure["seed"], failure["attempts"]) == ("ddpm-10steps", "1", "2")
    assert "samples" in failure["error"] and failure["output"] == str(broken)
    assert cells_of(here) == [c for c in CELLS if c != ("ddpm-10steps", "1")]
    table = re.sub(r" +", " ", (here / "out" / "table.md").read_text())  # pandas pads the columns
    assert "| ddim | 10 | 10 | 2 |" in table and "| ddpm | 10 | 10 | 1 |" in table  # the cells that finished
    runs = runs_of(here)
    assert len(runs) == 4  # the failed cell's one run, reopened by its retry
    failed = [r.info.status for r in runs if (r.data.tags["sweep_cell"], r.data.params["spec.seed"]) == CELLS[3]]
    assert failed == ["FAILED"]
    assert "1 of 4 runs failed" in out


def test_missing_package_is_one_line(tiny_model_dir, here, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if it were not installed
    assert sweep(here, tiny_model_dir, "--executor", "slurm") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'diffbench[scale]'" in err
    assert not (here / "out").exists()


def test_claims_make_their_runs_through_an_executor(ray_instance, here):
    """bench claims: reuse is looked up here, the runs to make go to Ray, their claims are decided from them."""
    from bench.claims import execute_plan, judge, plan_claims, select_claims
    from bench.executors import ExecutorConfig, RayExecutor
    from bench.spec import RunSpec
    from bench.tracking import Tracker

    os.chdir(here)
    refs = [r for r in select_claims(["cfg-rescale"]) if r.claim.id == "zero-terminal-snr-reaches-darker"]
    plan = plan_claims(refs, quick=True, base=RunSpec(device="cpu"), num_samples=16, seeds=(0, 1))
    tracker = Tracker("sqlite:///mlflow.db", "claims-test")  # relative: the workers get it made absolute
    tracker.check()
    done = execute_plan(plan, tracker, progress=False, log=lambda line: None,
                        executor=RayExecutor(ExecutorConfig(name="ray"), log=lambda line: None))
    assert not done.errors and done.made == len(plan.runs) == 4
    assert judge(plan, done.results, done.errors, done.run_ids)[0].verdict != "not measured"
    again = execute_plan(plan, tracker, progress=False, log=lambda line: None)
    assert again.made == 0 and again.reused == 4  # the Ray workers' runs are in the command's store and experiment


def test_suite_options_under_the_command_line_and_one_warning_for_a_file_store_on_a_cluster(here, capsys):
    from bench.executors import ExecutorConfig, absolute_uri, executor_config, suite_options, warn_if_local_store

    suite = suite_options({"retries": 3, "slurm": {"partition": "gpu", "time": 60}, "ray": {"cpus_per_cell": 4}}, "s")
    config = executor_config({"name": "slurm", "slurm_time": 30}, suite)
    assert (config.retries, config.slurm_partition, config.slurm_time, config.cpus_per_cell) == (3, "gpu", 30, 4)

    os.chdir(here)
    assert absolute_uri("sqlite:///mlflow.db") == f"sqlite:///{here.resolve()}/mlflow.db"
    assert absolute_uri("http://mlflow.internal:5000") == "http://mlflow.internal:5000"
    for name, cluster, uri, warned in [("slurm", None, "sqlite:///mlflow.db", True),
                                       ("slurm", None, "http://mlflow.internal:5000", False),
                                       ("slurm", "local", "sqlite:///mlflow.db", False),
                                       ("ray", None, "sqlite:///mlflow.db", False)]:  # a local Ray instance
        warn_if_local_store(ExecutorConfig(name=name, slurm_cluster=cluster), uri)
        err = capsys.readouterr().err
        assert (err.count("docs/tracking.md") == 1) == warned, (name, cluster, uri, err)


def test_a_task_carries_its_plan_only_in_this_process_and_only_once(tmp_path):
    """The local executor runs the driver's plan; a pickled task (a Ray or Slurm worker's) leaves the plan and its
    model behind, and a retry plans afresh."""
    import pickle

    from bench.executors import task_for
    from bench.runner import plan_run
    from bench.spec import RunSpec
    from bench.tracking import Tracker

    plan = plan_run(RunSpec(method="ddim", steps=2, num_samples=128, output=str(tmp_path / "run")))
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "x")
    assert task_for(plan, "k", "k", tracker, "t").plan is None  # by default a task is only its spec
    task = task_for(plan, "k", "k", tracker, "t", keep_plan=True)
    assert task.plan is not None and task.plan.model is plan.model
    shipped = pickle.loads(pickle.dumps(task))
    assert shipped.plan is None and shipped.spec == task.spec and shipped.protocol_hash == plan.protocol_hash
    assert task.take_plan() is not None and task.take_plan() is None
