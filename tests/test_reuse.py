"""Reuse across runs in one process (bench.reuse): loaded once, lent safely, reloaded when the files change, and
never a different number."""

import json
import os
import shutil

import pytest
import torch

from bench import reuse
from bench.cli.main import main
from bench.models import load_model, load_pixel_diffusion

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh():
    reuse.clear()
    yield
    reuse.clear()


def test_a_model_is_loaded_once_and_every_run_gets_its_own_copy():
    a = load_model("embedded-t2i")
    assert reuse.stats == {"hits": 0, "misses": 1}
    b = load_model("embedded-t2i")
    assert reuse.stats == {"hits": 1, "misses": 1}
    assert a is not b and a.unet is not b.unet
    assert b.pipeline.unet is b.unet and b.pipeline.vae is b.vae  # the copy keeps the pipeline's parts its own
    for (k, x), (_, y) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(x, y), k
    with torch.no_grad():  # what a fine-tuning method or a dtype move does to its model...
        next(a.unet.parameters()).add_(1.0)
    a.unet.to(torch.float64)
    c = load_model("embedded-t2i")  # ...the next run never sees
    assert next(c.unet.parameters()).dtype == torch.float32
    assert torch.equal(next(c.unet.parameters()), next(b.unet.parameters()))


def test_changed_weights_are_loaded_again(tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    first = load_pixel_diffusion(str(folder))
    assert load_pixel_diffusion(str(folder)).digest == first.digest and reuse.stats["hits"] == 1
    config = folder / "scheduler" / "scheduler_config.json"
    data = json.loads(config.read_text())
    data["beta_end"] = 0.03
    config.write_text(json.dumps(data))
    again = load_pixel_diffusion(str(folder))
    assert reuse.stats["misses"] == 2 and again.scheduler_config["beta_end"] == 0.03 and again.digest != first.digest


def test_reuse_off_loads_afresh(monkeypatch):
    monkeypatch.setenv("DIFFBENCH_REUSE", "0")
    load_model("embedded-ddpm")
    load_model("embedded-ddpm")
    assert reuse.stats == {"hits": 0, "misses": 0}


def test_runs_in_one_process_give_the_same_bytes_with_and_without_reuse(tmp_path, monkeypatch, capsys):
    """Two runs of the same model in one process (the second borrowing everything the first loaded) give the
    samples and metrics of a process that loads everything afresh."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    base = ["run", "--method", "ddim", "--steps", "4", "--num-samples", "128", "--batch-size", "64",
            "--metrics", "fid,kid", "--no-progress", "--tracking-uri", uri]
    results = {}
    for name, extra in (("first", ["--eta", "1.0"]), ("reused", []), ("afresh", [])):
        if name == "afresh":
            monkeypatch.setenv("DIFFBENCH_REUSE", "0")
        assert main([*base, *extra, "--output", str(tmp_path / name)]) == 0
        results[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert reuse.stats["hits"] >= 1  # the second run borrowed the first one's model
    a, b = results["reused"], results["afresh"]
    assert a["samples_sha256"] == b["samples_sha256"]
    for key in ("fid", "kid_mean", "kid_std", "nfe"):
        assert a["values"][key] == b["values"][key], key
    assert os.environ.get("DIFFBENCH_REUSE") == "0"
