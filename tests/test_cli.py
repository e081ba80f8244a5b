"""`bench` end to end on a tiny checkpoint: the table, the MLflow record, determinism and bad input."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from bench.cli.main import main

QUICK = ["--num-samples", "128", "--batch-size", "64", "--steps", "3", "--no-progress"]


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def all_runs(workdir):
    db = workdir / "mlflow.db"
    if not db.exists():
        return []
    client = MlflowClient(f"sqlite:///{db}")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_run_prints_table_and_records_mlflow_run(workdir, tiny_model_dir, capsys):
    rc = main(["run", "--model", str(tiny_model_dir), "--method", "ddim", "--eta", "0.5", *QUICK])
    out = capsys.readouterr().out
    assert rc == 0, out
    for label in ("FID [shapes-cnn16, shapes16]", "KID [shapes-cnn16, shapes16]", "latency / image", "latency / denoiser call",
                  "NFE", "samples", "device", "MLflow run", "protocol hash"):
        assert label in out
    (run,) = all_runs(workdir)
    assert run.info.status == "FINISHED" and run.info.run_id in out
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    for key in ("method", "paper", "model", "dataset", "protocol_hash", "device_name", "diffbench_git_sha",
                "torch_version", "diffusers_version", "samples_sha256", "eval_protocol_hash"):
        assert tags.get(key), key
    assert tags["paper"].startswith("Song et al.")
    assert params["spec.method_args.eta"] == "0.5" and params["spec.steps"] == "3"
    assert params["protocol.method.scheduler._class_name"] == "DDIMScheduler"
    assert params["protocol.metrics.fid.feature_extractor"] == "shapes-cnn16"
    for key in ("fid", "kid_mean", "kid_std", "latency_per_image_ms", "latency_per_call_ms", "nfe", "num_samples"):
        assert key in metrics, key
    assert metrics["nfe"] == 3 and metrics["num_samples"] == 128
    artifacts = {a.path for a in MlflowClient(f"sqlite:///{workdir}/mlflow.db").list_artifacts(run.info.run_id)}
    assert {"grid.png", "config.json", "results.json"} <= artifacts
    output = Path(tags["output"])
    shards = sorted((output / "samples").glob("shard-*.npy"))
    assert len(shards) == 2 and np.load(shards[0], allow_pickle=False).shape == (64, 16, 16, 3)


def test_same_command_twice_gives_identical_bytes_and_values(workdir, tiny_model_dir, capsys):
    args = ["run", "--model", str(tiny_model_dir), "--method", "ddpm", *QUICK]
    outputs = []
    for i in range(2):
        assert main(args + ["--output", f"out{i}"]) == 0
        outputs.append(workdir / f"out{i}")
    for a, b in zip(sorted((outputs[0] / "samples").iterdir()), sorted((outputs[1] / "samples").iterdir())):
        assert a.read_bytes() == b.read_bytes()
    r0, r1 = (json.loads((o / "results.json").read_text()) for o in outputs)
    assert r0["samples_sha256"] == r1["samples_sha256"] and r0["protocol_hash"] == r1["protocol_hash"]
    for key in ("fid", "kid_mean", "kid_std", "nfe"):
        assert r0["values"][key] == r1["values"][key]
    c0 = json.loads((outputs[0] / "config.json").read_text())
    c1 = json.loads((outputs[1] / "config.json").read_text())
    assert c0["protocol"] == c1["protocol"]


BAD_INPUTS = [
    (["--method", "ddmi"], "did you mean"),
    (["--dataset", "shapes"], "did you mean 'shapes"),
    (["--metrics", "fid,kdi"], "did you mean 'kid'"),
    (["--steps", "0"], "positive integer"),
    (["--steps", "-3"], "positive integer"),
    (["--steps", "abc"], "positive integer"),
    (["--num-samples", "50"], "at least 128 samples"),
    (["--steps", "2000"], "exceeds the model's 1000 training timesteps"),
    (["--eta", "3"], "eta must be a finite number in"),
    (["--output", "/proc/diffbench-cannot-write"], "not writable"),
    (["--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
    (["--dataset", "cifar10"], "InceptionV3 weights are not at"),
    (["--config", "missing.yaml"], "cannot read config file"),
    (["--device", "cuda:7"], "cuda"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_no_running_run(workdir, tiny_model_dir, capsys, extra, message):
    rc = main(["run", "--model", str(tiny_model_dir), "--num-samples", "128", "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("bench: error: ") and "Traceback" not in err
    assert all(r.info.status != "RUNNING" for r in all_runs(workdir))
    assert not all_runs(workdir)  # bad input is caught before an MLflow run exists


def test_unknown_model_and_corrupt_weights(workdir, tiny_model_dir, capsys):
    assert main(["run", "--model", "embeded-ddpm", *QUICK]) == 2
    assert "did you mean 'embedded-ddpm'" in capsys.readouterr().err
    broken = workdir / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"not a safetensors file")
    assert main(["run", "--model", str(broken), *QUICK]) == 2
    err = capsys.readouterr().err
    assert "cannot load model" in err and err.count("\n") == 1


def test_internal_error_is_exit_1_and_run_failed_with_samples_kept(workdir, tiny_model_dir, capsys, monkeypatch):
    import metrics.fidelity

    def boom(self, ctx):
        raise RuntimeError("feature extractor exploded")

    monkeypatch.setattr(metrics.fidelity.FID, "compute", boom)
    rc = main(["run", "--model", str(tiny_model_dir), "--output", "kept", *QUICK])
    err = capsys.readouterr().err
    assert rc == 1 and "internal error: RuntimeError: feature extractor exploded" in err and err.count("\n") == 1
    (run,) = all_runs(workdir)
    assert run.info.status == "FAILED"
    assert len(list((workdir / "kept" / "samples").glob("shard-*.npy"))) == 2  # nothing computed is lost


def test_subprocess_entry_points():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bad = subprocess.run([sys.executable, "-m", "bench", "run", "--steps", "abc"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    bench = Path(sys.executable).with_name("bench")  # the console script installed beside this interpreter
    ls = subprocess.run([str(bench), "ls", "methods"], capture_output=True, text=True, env=env)
    assert ls.returncode == 0 and "ddim" in ls.stdout and "Song et al." in ls.stdout
    help_ = subprocess.run([sys.executable, "-m", "bench", "run", "--method", "ddpm", "--help"], capture_output=True,
                           text=True, env=env)
    assert help_.returncode == 0 and "--variance-type" in help_.stdout


def test_sweep_writes_table_plot_and_one_run_per_cell(workdir, tiny_model_dir, capsys):
    rc = main(["sweep", "--model", str(tiny_model_dir), "--method", "ddim,ddpm", "--steps", "2,4", "--seeds", "2",
               "--num-samples", "128", "--batch-size", "128", "--metrics", "fid,latency", "--no-progress",
               "--out", "sw"])
    out = re.sub(r" +", " ", capsys.readouterr().out)  # pandas' to_markdown pads the columns
    assert rc == 0
    assert "| method | steps | NFE | seeds | FID | ms / image |" in out
    table = (workdir / "sw" / "table.md").read_text()
    assert table.count("\n") == 2 + 4 and "+-" in table  # 4 configurations, intervals over 2 seeds
    assert (workdir / "sw" / "fid_vs_nfe.png").stat().st_size > 1000
    assert (workdir / "sw" / "samples.png").stat().st_size > 1000  # a strip of samples per cell
    runs = all_runs(workdir)
    assert len(runs) == 8 and all(r.info.status == "FINISHED" and r.data.tags["sweep"] == "sweep" for r in runs)


def test_sweep_suite_file(workdir, tiny_model_dir, capsys):
    (workdir / "suite.yaml").write_text(
        f"name: mini\ndefaults: {{model: '{tiny_model_dir}', num_samples: 128, batch_size: 128, metrics: [fid]}}\n"
        "seeds: 1\ngrid:\n  - {method: ddim, steps: [2], method_args: {eta: 1.0}}\n  - {method: ddpm, steps: [3]}\n"
    )
    assert main(["sweep", "--suite", "suite.yaml", "--no-progress", "--out", "s"]) == 0
    table = re.sub(r" +", " ", (workdir / "s" / "table.md").read_text())
    assert "ddim(eta=1.0)" in table and "| ddpm | 3 | 3 |" in table


def test_sweep_suite_entry_with_its_own_model(workdir, tiny_model_dir, tmp_path, capsys):
    """A grid entry's model replaces the suite's for its cells (a reflowed or distilled model beside its base); the
    row and the run say which model made it."""
    from tests.conftest import save_tiny_ddpm

    other = save_tiny_ddpm(tmp_path / "other", seed=1)
    (workdir / "suite.yaml").write_text(
        f"name: two-models\ndefaults: {{model: '{tiny_model_dir}', num_samples: 128, batch_size: 128, metrics: [fid]}}\n"
        f"seeds: 1\ngrid:\n  - {{method: ddim, steps: [2]}}\n  - {{method: ddim, steps: [2], model: '{other}'}}\n")
    assert main(["sweep", "--suite", "suite.yaml", "--no-progress", "--out", "s"]) == 0
    assert f"ddim@{other}" in (workdir / "s" / "table.csv").read_text()
    import pandas as pd

    runs = pd.read_csv(workdir / "s" / "runs.csv")
    assert sorted(runs["model"]) == sorted([str(tiny_model_dir), str(other)])
    (workdir / "bad.yaml").write_text("name: bad\nseeds: 1\ngrid:\n  - {method: ddim, steps: [2], model: ''}\n")
    assert main(["sweep", "--suite", "bad.yaml", "--no-progress", "--out", "b"]) == 2
    assert "model must be a model name" in capsys.readouterr().err


def test_evaluate_recomputes_metrics_from_saved_samples(workdir, tiny_model_dir, capsys):
    assert main(["run", "--model", str(tiny_model_dir), "--output", "r", "--metrics", "fid,kid", *QUICK]) == 0
    capsys.readouterr()
    assert main(["evaluate", "r"]) == 0
    out = capsys.readouterr().out
    assert out.count("same") == 3 and "DIFFERENT" not in out  # fid, kid_mean, kid_std
    (workdir / "r" / "samples" / "shard-00001.npy").write_bytes(b"garbage")
    assert main(["evaluate", "r"]) == 2
    assert "unreadable" in capsys.readouterr().err


def test_method_options_convert_by_their_resolved_types():
    """Options come from the Args dataclass's type hints (typing.get_type_hints), not from the text of field.type."""
    import argparse
    import dataclasses
    from typing import Literal, Optional

    from bench.cli.options import converter, method_option_types

    @dataclasses.dataclass(frozen=True)
    class Args:
        steps: Optional[int] = None  # the text "typing.Optional[int]" read as a string option before
        scale: "float | None" = None
        guided: bool = True
        mode: Literal["ddim", "null-text"] = "ddim"
        order: Literal[1, 2, 3] = 2
        name: str = "x"

    types = method_option_types(Args)
    assert types["steps"]("4") == 4 and types["scale"]("0.5") == 0.5 and types["name"]("7") == "7"
    assert types["guided"]("false") is False and types["guided"]("1") is True
    assert types["mode"]("null-text") == "null-text" and types["order"]("3") == 3
    for kind, text in (("guided", "maybe"), ("mode", "sdedit"), ("order", "4")):
        with pytest.raises(argparse.ArgumentTypeError):
            types[kind](text)
    assert converter(list[int]) is str  # anything else stays text


def test_method_option_types_of_every_registered_method():
    import dataclasses

    from bench.catalog import METHODS
    from bench.cli.options import method_option_types, parse_bool

    for name in METHODS.names():
        args = METHODS.get(name).Args
        types = method_option_types(args)
        assert set(types) == {f.name for f in dataclasses.fields(args)}
        for f in dataclasses.fields(args):
            if isinstance(f.default, bool):
                assert types[f.name] is parse_bool, (name, f.name)
            elif isinstance(f.default, (int, float)):
                assert types[f.name] is type(f.default), (name, f.name)
