"""Issue 21: the defects a hostile-input probe and a newcomer's run found, one test each (bad input: test_bad_input)."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.cli.main import main
from bench.errors import BenchError

QUICK = ["--num-samples", "128", "--batch-size", "64", "--steps", "2", "--no-progress"]


def float_options():
    from bench.catalog import METHODS

    for name in METHODS.names():
        for f in dataclasses.fields(METHODS.get(name).Args):
            if str(f.type).replace(" ", "").startswith("float"):
                yield name, f.name


FLOAT_OPTIONS = list(float_options())


# 1. the metric phase does not depend on the thread count
def test_metrics_of_the_same_samples_are_the_same_whatever_the_thread_count():
    """The runner's metric phase (bench.runner.evaluate) on the same samples, called with 1, 2 and 3 threads."""
    from types import SimpleNamespace

    from bench.datasets import load_dataset
    from bench.evaluation import SamplingTimings
    from bench.runner import evaluate
    from bench.spec import RunSpec
    from metrics.fidelity import FID, KID

    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (256, 16, 16, 3), dtype=np.uint8)
    spec = RunSpec(num_samples=256, dataset="shapes16", device="cpu")
    plan = SimpleNamespace(spec=spec, reference=load_dataset("shapes16"), prompts=None, targets=None, items=None,
                           metrics={"fid": FID(), "kid": KID()})
    values = []
    before = torch.get_num_threads()
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        try:
            values.append(evaluate(plan, samples, SamplingTimings(batch_calls=[2])))
            assert torch.get_num_threads() == threads  # restored after the metric phase
        finally:
            torch.set_num_threads(before)
    assert values[0] == values[1] == values[2]


def test_feature_extraction_runs_with_a_fixed_thread_count(monkeypatch):
    """Features are extracted under METRIC_THREADS threads whatever the caller set, and the caller's count is back."""
    import torch_fidelity.utils

    from bench.datasets import load_dataset
    from bench.evaluation import METRIC_THREADS, EvalContext
    from bench.spec import RunSpec

    seen = []
    real = torch_fidelity.utils.get_featuresdict_from_dataset

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_fidelity.utils, "get_featuresdict_from_dataset", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ctx = EvalContext(RunSpec(num_samples=8, dataset="shapes16", device="cpu"),
                          torch.zeros(8, 3, 16, 16, dtype=torch.uint8), load_dataset("shapes16"), torch.device("cpu"))
        ctx.sample_features("shapes-cnn16", "embedding")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [METRIC_THREADS]


# 2. every float option of every adapter refuses nan and inf, in one place (Method.parse_args)
def test_every_adapter_has_float_options_to_check():
    assert len(FLOAT_OPTIONS) >= 20


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("method,option", FLOAT_OPTIONS, ids=[f"{m}.{o}" for m, o in FLOAT_OPTIONS])
def test_non_finite_method_options_are_refused(method, option, value):
    from bench.catalog import METHODS

    with pytest.raises(BenchError, match="finite"):
        METHODS.get(method).parse_args({option: value})


# 3. a store the run cannot write to is refused before sampling, in one line
def test_read_only_store_is_refused_before_sampling(tmp_path_factory, tiny_model_dir):
    """A read-only mlflow.db (mode 0444), as a user who cannot write it: root runs the command as nobody."""
    import shutil
    import subprocess
    import sys
    import tempfile

    from bench.tracking import Tracker

    root = Path(tempfile.mkdtemp(prefix="diffbench-readonly-"))  # outside pytest's root-only folder
    try:
        os.chmod(root, 0o777)
        shutil.copytree(tiny_model_dir, root / "model")
        uri = f"sqlite:///{root}/mlflow.db"
        Tracker(uri, "diffbench").check()  # the store and its experiment exist
        os.chmod(root / "mlflow.db", 0o444)
        for p in root.rglob("*"):
            if p.is_dir():
                os.chmod(p, 0o777)
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        env = {**os.environ, "DIFFBENCH_CACHE": str(root / "cache"), "HOME": str(root),
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([*drop, sys.executable, "-m", "bench", "run", "--model", str(root / "model"),
                               "--tracking-uri", uri, "--output", str(root / "out"), *QUICK],
                              capture_output=True, text=True, env=env, cwd=root, timeout=300)
        assert done.returncode == 2, done.stderr[-3000:]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "mlflow.db" in lines[0] and "read-only" in lines[0], done.stderr[-3000:]
        assert not (root / "out").exists()  # nothing sampled, no pending record
    finally:
        shutil.rmtree(root, ignore_errors=True)


# 4. samples stream to their shards; a run too big for the disk says so before it starts; dead runs are repaired
def test_generated_batches_are_not_kept_in_memory(tmp_path, tiny_model_dir):
    from bench.runner import collect, generate_shards, plan_run
    from bench.spec import RunSpec

    plan = plan_run(RunSpec(model=str(tiny_model_dir), num_samples=128, batch_size=64, steps=2, device="cpu",
                            output=str(tmp_path / "out")))
    made = generate_shards(plan, [0, 1], progress=False)
    assert sorted(made) == [0, 1] and all(array is None for array, _ in made.values())  # records only
    samples, timings = collect(plan, made)  # read back from the shards
    assert samples.shape == (128, 16, 16, 3) and len(timings.batch_seconds) == 2


def test_run_too_big_for_the_disk_is_refused_before_it_starts(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1 << 30))  # 1 GiB free
    rc = main(["run", "--model", str(tiny_model_dir), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
               "--output", "out", "--num-samples", "10000000", "--batch-size", "64", "--steps", "2",
               "--metrics", "latency", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "10,000,000 samples of 3x16x16 need 7.7 GiB" in lines[0], err[-3000:]
    assert not (tmp_path / "out" / "samples").exists()


def test_long_run_warns_after_its_first_batch(capsys):
    from bench.runner import warn_if_long
    from bench.spec import RunSpec

    spec = RunSpec(num_samples=10_000_000, batch_size=64)
    warn_if_long(spec, first_batch_seconds=2.0, batches=156_250)
    assert "about 87 h of sampling" in capsys.readouterr().err
    warn_if_long(spec, first_batch_seconds=2.0, batches=10)
    assert capsys.readouterr().err == ""


def test_runs_repair_ends_runs_whose_process_is_gone(tmp_path, capsys):
    import platform
    import subprocess

    from bench.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "diffbench")
    tracker.check()
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid is free now: the run it "held" was SIGKILLed
    host = platform.node()
    dead = tracker.client.create_run(tracker._experiment_id, run_name="dead",
                                     tags={"diffbench_pid": str(gone.pid), "diffbench_host": host}).info.run_id
    live = tracker.client.create_run(tracker._experiment_id, run_name="live",
                                     tags={"diffbench_pid": str(os.getpid()), "diffbench_host": host}).info.run_id
    other = tracker.client.create_run(tracker._experiment_id, run_name="other",
                                      tags={"diffbench_pid": "1", "diffbench_host": "elsewhere"}).info.run_id
    assert main(["runs", "--tracking-uri", uri]) == 0  # lists, touches nothing
    out = capsys.readouterr().out
    assert "dead" in out and tracker.client.get_run(dead).info.status == "RUNNING"
    assert main(["runs", "--repair", "--tracking-uri", uri]) == 0
    status = {r: tracker.client.get_run(r).info.status for r in (dead, live, other)}
    assert status == {dead: "KILLED", live: "RUNNING", other: "RUNNING"}
    assert tracker.client.get_run(dead).data.tags["diffbench_repaired"]


# 5. one run at a time in an output folder
def test_second_run_into_a_folder_in_use_refuses_in_one_line(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Another run holds the folder's lock (as a running `bench run` does): this one refuses and writes nothing."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        held.write("pid 12345 on elsewhere\n")
        held.flush()
        rc = main(["run", "--model", str(tiny_model_dir), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                   "--output", str(out), *QUICK])
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "in use by another run (pid 12345 on elsewhere)" in lines[0], err[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no config, no run state, no shards
    # the lock is released with its holder: the same command now runs
    assert main(["run", "--model", str(tiny_model_dir), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                 "--output", str(out), *QUICK]) == 0
    assert (out / "results.json").exists()


# 10. `bench sweep --help` says 95%, not 95%%
def test_sweep_help_shows_a_single_percent_sign(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    out = capsys.readouterr().out
    assert "95%" in out and "%%" not in out
