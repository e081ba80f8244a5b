"""`bench leaderboard`: one row per configuration, CIs over seeds, grouping, and refusing mixed protocols."""

from __future__ import annotations

import io
import math
import re

import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from scipy import stats

from bench.cli.main import main
from bench.interfaces import Metric as BenchMetric
from bench.outputs import Output


def make_run(client: MlflowClient, experiment: str = "diffbench", *, method: str = "ddim", steps: int = 10,
             seed: int = 0, fid: float = 10.0, nfe: float | None = None, latency: float = 5.0, n: int = 256,
             dataset: str = "shapes16", device: str = "cpu", model: str = "embedded-ddpm",
             args: dict | None = None, status: str = "FINISHED", eval_hash: str | None = None,
             run_name: str | None = None, extra_metrics: dict | None = None) -> str:
    """An MLflow run shaped like the ones bench/runner.py records (tags, spec.* and protocol.* params)."""
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    eval_hash = eval_hash or f"{dataset}-{n}-{device}".ljust(16, "0")
    tags = {"method": method, "model": model, "dataset": dataset, "device": device, "device_name": f"{device} box",
            "eval_protocol_hash": eval_hash, "protocol_hash": f"{method}{steps}{seed}{eval_hash}"[:16],
            "torch_version": "2.x", "diffusers_version": "0.x", "diffbench_git_sha": "abc123", "output": ""}
    run = client.create_run(exp_id, run_name=run_name or f"{method}-{steps}-{seed}", tags=tags)
    params = {"spec.method": method, "spec.steps": steps, "spec.seed": seed, "spec.dtype": "float32",
              "spec.num_samples": n, "spec.model": model,
              "protocol.metrics.fid.num_samples": n, "protocol.metrics.fid.reference.name": dataset,
              "protocol.metrics.fid.feature_extractor": "shapes-cnn16",
              "protocol.metrics.latency.device": device, "protocol.metrics.latency.batch_size": 256}
    params.update({f"spec.method_args.{k}": v for k, v in (args or {"eta": 0.0}).items()})
    metrics = {"fid": fid, "nfe": float(nfe if nfe is not None else steps), "latency_per_image_ms": latency,
               **(extra_metrics or {})}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return uri, MlflowClient(uri)


def board_csv(capsys, uri: str, *args: str) -> pd.DataFrame:
    rc = main(["leaderboard", "--tracking-uri", uri, "--format", "csv", *args])
    out = capsys.readouterr().out
    assert rc == 0, out
    return pd.read_csv(io.StringIO(out))


def test_one_row_per_configuration_with_t_interval_over_seeds(store, capsys):
    uri, client = store
    for seed, fid in enumerate([10.0, 11.0, 12.0]):
        make_run(client, seed=seed, fid=fid)
    for seed, fid in enumerate([20.0, 22.0]):
        make_run(client, steps=5, seed=seed, fid=fid)
    make_run(client, steps=5, seed=1, fid=22.0)  # the same seed again: counts once
    make_run(client, steps=5, seed=7, fid=1.0, status="FAILED")  # never ranked
    make_run(client, args={"eta": 1.0}, fid=15.0)
    board = board_csv(capsys, uri)
    assert list(board["config"]) == ["ddim", "ddim(eta=1.0)", "ddim"]
    assert list(board["rank"]) == [1, 2, 3] and list(board["steps"]) == [10, 10, 5]
    best = board.iloc[0]
    assert best["seeds"] == 3 and best["fid"] == pytest.approx(11.0)
    assert best["fid_ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3))
    assert board.iloc[2]["seeds"] == 2 and board.iloc[2]["fid"] == pytest.approx(21.0)
    assert math.isnan(board.iloc[1]["fid_ci95"])  # one seed: no interval
    assert board.iloc[0]["nfe"] == 10 and board.iloc[0]["latency_per_image_ms"] == pytest.approx(5.0)


def test_table_and_markdown_formats(store, capsys):
    uri, client = store
    make_run(client, fid=3.0)
    make_run(client, method="ddpm", steps=20, fid=4.0, args={"variance_type": "fixed_large"})
    assert main(["leaderboard", "--tracking-uri", uri]) == 0
    table = capsys.readouterr().out
    assert "rank  method" in table and "ddpm(variance_type=fixed_large)" in table and "on cpu" in table
    assert main(["leaderboard", "--tracking-uri", uri, "--format", "md"]) == 0
    md = re.sub(r" +", " ", capsys.readouterr().out)  # pandas' to_markdown pads the columns
    assert "| rank | method | steps | NFE | seeds | FID |" in md and "| 1 | ddim | 10 | 10 | 1 | 3.000 |" in md


def test_grouped_by_device_and_ranked_within_each(store, capsys):
    uri, client = store
    make_run(client, fid=5.0, device="cpu", latency=50.0)
    make_run(client, method="ddpm", fid=6.0, device="cpu", latency=40.0)
    make_run(client, fid=5.1, device="cuda", latency=1.0)
    board = board_csv(capsys, uri, "--metric", "latency_per_image_ms")
    assert sorted(zip(board["device"], board["rank"], board["method"])) == [
        ("cpu", 1, "ddpm"), ("cpu", 2, "ddim"), ("cuda", 1, "ddim")]


def test_refuses_to_rank_across_metric_protocols_and_says_which_fields(store, capsys):
    uri, client = store
    make_run(client, n=256, fid=10.0)
    make_run(client, n=1000, fid=8.0)
    rc = main(["leaderboard", "--tracking-uri", uri])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "refusing to rank fid" in err and "--protocol" in err
    assert re.search(r"differing in fid\.num_samples \((256 \| 1000|1000 \| 256)\)", err)
    # narrowing to one protocol (a hash prefix) ranks again
    board = board_csv(capsys, uri, "--protocol", "shapes16-1000")
    assert len(board) == 1 and board.iloc[0]["fid"] == 8.0


def test_dataset_narrows_and_other_metric_families_are_not_refused(store, capsys):
    uri, client = store
    make_run(client, dataset="shapes16", fid=10.0)
    make_run(client, dataset="cifar10", model="google/ddpm-cifar10-32", fid=4.0)
    assert main(["leaderboard", "--tracking-uri", uri]) == 2
    assert "fid.reference.name (cifar10 | shapes16)" in capsys.readouterr().err
    board = board_csv(capsys, uri, "--dataset", "cifar10")
    assert list(board["model"]) == ["google/ddpm-cifar10-32"]
    # NFE's protocol (the latency settings) is the same on both data sets: ranking by it is allowed
    assert len(board_csv(capsys, uri, "--metric", "nfe")) == 2


def test_bad_selection_is_one_line(store, capsys):
    uri, client = store
    assert main(["leaderboard", "--tracking-uri", uri]) == 2
    assert "no FINISHED diffbench runs" in capsys.readouterr().err
    make_run(client)
    assert main(["leaderboard", "--tracking-uri", uri, "--metric", "clip_score"]) == 2
    err = capsys.readouterr().err
    assert "no run of the selection has the metric 'clip_score'" in err and "fid" in err
    assert main(["leaderboard", "--tracking-uri", uri, "--experiment", "nope"]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err


class ToySharpness(BenchMetric):
    """A new metric is one file: a class that declares its outputs, and one register call."""

    name = "toy-sharpness"
    summary = "a toy metric: declared higher-is-better, one decimal, its own label"
    outputs = (Output("toy_sharpness", "sharpness (toy)", "higher", ".1f", "toy-sharpness", 0.2),)

    def compute(self, ctx):
        return {"toy_sharpness": 1.0}


def test_a_new_metric_declares_its_direction_label_and_format(store, capsys, monkeypatch):
    """Registered through the registry API: the leaderboard ranks, labels and formats it from its declaration."""
    from bench import outputs
    from bench.catalog import METRICS
    from bench.leaderboard import metric_family

    monkeypatch.setattr(METRICS, "_entries", dict(METRICS._entries))  # the registration ends with the test
    monkeypatch.setattr(METRICS, "_loaded", dict(METRICS._loaded))
    METRICS.register("toy-sharpness", "tests.test_leaderboard:ToySharpness", ToySharpness.summary)
    out = outputs.lookup("toy_sharpness")
    assert out is not None and out.label == "sharpness (toy)" and not outputs.lower_is_better("toy_sharpness")
    assert metric_family("toy_sharpness") == "toy-sharpness" and outputs.tolerance("toy_sharpness") == 0.2
    uri, client = store
    make_run(client, fid=3.0, extra_metrics={"toy_sharpness": 0.25})
    make_run(client, method="ddpm", fid=4.0, extra_metrics={"toy_sharpness": 0.75}, args={"variance_type": "fixed_large"})
    assert main(["leaderboard", "--tracking-uri", uri, "--metric", "toy_sharpness", "--format", "md"]) == 0
    md = re.sub(r" +", " ", capsys.readouterr().out)
    assert "| rank | method | steps | NFE | seeds | sharpness (toy) |" in md
    assert "| 1 | ddpm(variance_type=fixed_large) | 10 | 10 | 1 | 0.8 |" in md  # higher first, ".1f"
    assert "| 2 | ddim | 10 | 10 | 1 | 0.2 |" in md and "higher is better" in md


def test_an_undeclared_metric_value_is_refused():
    from bench.errors import BenchError
    from bench.runner import checked_values

    toy = ToySharpness()
    assert checked_values(toy, {"toy_sharpness": 1.0, "toy_sharpness/part": 2.0}) == {"toy_sharpness": 1.0,
                                                                                      "toy_sharpness/part": 2.0}
    with pytest.raises(BenchError, match="returned toy_blur, which it does not declare"):
        checked_values(toy, {"toy_sharpness": 1.0, "toy_blur": 0.5})
