"""Streamed sample features: extracted as each batch is made, stored with its shard, read by the metric phase.

Small runs (the tiny DDPM, 128 samples of shapes16, FID and KID on the 64-d embedding) with an extractor batch of 20,
so that each shard of 48 is extracted in chunks 20, 20, 8 and the per-shard chunking shows.
"""

import json
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest
import torch

from bench.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_SAMPLES, BATCH = 128, 48  # shards of 48, 48 and 32
SHARDS = 3
RUN = ["run", "--method", "ddim", "--steps", "2", "--num-samples", str(NUM_SAMPLES), "--batch-size", str(BATCH),
       "--metrics", "fid,kid", "--no-progress"]
SAMPLE_METRICS = ("fid", "kid_mean", "kid_std")


@pytest.fixture(scope="module", autouse=True)
def small_extractor_batches():
    import bench.evaluation

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench.evaluation, "FEATURE_BATCH_SIZE", 20)
        yield


@pytest.fixture
def extracted(monkeypatch):
    """The samples each feature extraction saw (its dataset's length) and the thread it ran on, in call order."""
    import bench.evaluation

    calls = []
    real = bench.evaluation.extract_features

    def counting(dataset, extractor, layer, device):
        calls.append((len(dataset), threading.current_thread().name))
        return real(dataset, extractor, layer, device)

    monkeypatch.setattr(bench.evaluation, "extract_features", counting)
    return calls


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, small_extractor_batches):
    """One MLflow store for the module and the uninterrupted reference run."""
    root = tmp_path_factory.mktemp("streamed")
    args = [*RUN, "--model", str(tiny_model_dir), "--tracking-uri", f"sqlite:///{root}/mlflow.db"]
    assert main([*args, "--output", str(root / "single")]) == 0
    return {"root": root, "args": args, "reference": root / "single"}


def plan_for(world, folder: Path):
    """The reference run's plan, its output ``folder`` (a run folder that is not the reference's)."""
    from bench.runner import plan_run
    from bench.spec import RunSpec

    spec = json.loads((world["reference"] / "config.json").read_text())["spec"]
    spec = RunSpec(**{**spec, "metrics": tuple(spec["metrics"]), "output": str(folder)})
    return plan_run(spec)


def files(folder: Path, sub: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / sub).glob("shard-*"))}


def values(folder: Path) -> dict[str, float]:
    return json.loads((folder / "results.json").read_text())["values"]


def test_streamed_features_are_the_per_shard_features_of_the_samples(world, extracted):
    from bench.evaluation import EvalContext
    from bench.runner import collect, collect_features, evaluate

    ref = world["reference"]
    assert sorted(files(ref, "samples-features")) == [f"shard-{k:05d}.safetensors" for k in range(SHARDS)]
    for k in range(SHARDS):  # each features file is the one its sidecar names
        record = json.loads((ref / "samples-index" / f"shard-{k:05d}.json").read_text())
        assert len(record["features_sha256"]) == 64

    plan = plan_for(world, ref)
    samples, timings = collect(plan)
    streamed = collect_features(plan, samples)
    assert extracted == []  # read from the files, not extracted again
    (key,) = plan.sample_features
    assert key == ("shapes-cnn16", "embedding") and streamed[key].dtype == torch.float64

    # the metric phase without them extracts the same chunks (20, 20, 8 within each shard): the same bytes
    ctx = EvalContext(plan.spec, samples, plan.reference, torch.device("cpu"))
    assert torch.equal(ctx.sample_features(*key), streamed[key])
    assert [n for n, _ in extracted] == [20, 20, 8, 20, 20, 8, 20, 12]
    recomputed = evaluate(plan, samples, timings)
    for name in SAMPLE_METRICS:
        assert recomputed[name] == values(ref)[name], name


def test_resumed_run_extracts_only_the_shards_it_makes_and_equals_the_uninterrupted_run(world, extracted,
                                                                                         monkeypatch, capsys):
    import bench.runner

    generate = bench.runner._generate_batch

    def terminated_at_batch_2(plan, indices, seeds, denoiser):
        if indices.start == 2 * BATCH:
            os.kill(os.getpid(), signal.SIGTERM)
        return generate(plan, indices, seeds, denoiser)

    out = world["root"] / "resumed"
    monkeypatch.setattr(bench.runner, "_generate_batch", terminated_at_batch_2)
    assert main([*world["args"], "--output", str(out)]) == 143
    assert sorted(files(out, "samples-features")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    monkeypatch.setattr(bench.runner, "_generate_batch", generate)
    extracted.clear()
    assert main([*world["args"], "--output", str(out), "--resume"]) == 0, capsys.readouterr().err[-3000:]
    assert [n for n, _ in extracted] == [NUM_SAMPLES - 2 * BATCH]  # shard 2 alone, when it was made
    for sub in ("samples", "samples-features"):
        assert files(out, sub) == files(world["reference"], sub), sub
    for name in SAMPLE_METRICS:
        assert values(out)[name] == values(world["reference"])[name], name


def test_damaged_missing_or_old_features_files_are_recomputed_not_trusted(world, extracted, tmp_path):
    from bench.runner import collect, collect_features, evaluate

    out = tmp_path / "damaged"
    shutil.copytree(world["reference"], out)
    blob = bytearray((out / "samples-features" / "shard-00000.safetensors").read_bytes())
    blob[-1] ^= 0xFF  # same size, one feature byte wrong: still a valid safetensors file
    (out / "samples-features" / "shard-00000.safetensors").write_bytes(bytes(blob))
    (out / "samples-features" / "shard-00001.safetensors").unlink()
    sidecar = out / "samples-index" / "shard-00002.json"
    record = json.loads(sidecar.read_text())
    del record["features_sha256"]  # a sidecar written before features were streamed
    sidecar.write_text(json.dumps(record))

    plan = plan_for(world, out)
    samples, timings = collect(plan)  # the shards themselves are complete: the old sidecar still reads
    features = collect_features(plan, samples)
    assert [n for n, _ in extracted] == [BATCH, BATCH, NUM_SAMPLES - 2 * BATCH]  # every shard again, from its samples
    plan_of_reference = plan_for(world, world["reference"])
    reference = collect_features(plan_of_reference, collect(plan_of_reference)[0])
    assert torch.equal(features[("shapes-cnn16", "embedding")], reference[("shapes-cnn16", "embedding")])
    got = evaluate(plan, samples, timings, features)
    for name in SAMPLE_METRICS:
        assert got[name] == values(world["reference"])[name], name


def test_overlapped_extraction_on_a_thread_writes_the_same_bytes_as_inline(world, extracted, tmp_path):
    from bench.runner import generate_shards

    batches = list(range(SHARDS))
    inline, overlapped = plan_for(world, tmp_path / "inline"), plan_for(world, tmp_path / "overlapped")
    generate_shards(inline, batches, progress=False, overlap=False)
    assert {thread for _, thread in extracted} == {threading.current_thread().name}
    extracted.clear()
    generate_shards(overlapped, batches, progress=False, overlap=True)
    assert len(extracted) == SHARDS and all(thread.startswith("bench-features") for _, thread in extracted)
    for sub in ("samples", "samples-features", "samples-index"):
        a, b = files(tmp_path / "inline", sub), files(tmp_path / "overlapped", sub)
        assert len(a) == SHARDS and a.keys() == b.keys(), sub
        if sub == "samples-index":  # the sidecars differ in their timings only
            a = {k: json.loads(v)["features_sha256"] for k, v in a.items()}
            b = {k: json.loads(v)["features_sha256"] for k, v in b.items()}
        assert a == b, sub


def test_overlapped_run_interrupted_while_sampling_keeps_the_batch_in_flight(world, monkeypatch, tmp_path):
    import bench.runner

    generate = bench.runner._generate_batch

    def failing_at_batch_2(plan, indices, seeds, denoiser):
        if indices.start == 2 * BATCH:
            raise KeyboardInterrupt
        return generate(plan, indices, seeds, denoiser)

    monkeypatch.setattr(bench.runner, "_generate_batch", failing_at_batch_2)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        bench.runner.generate_shards(plan_for(world, out), list(range(SHARDS)), progress=False, overlap=True)
    # batch 1's features were still being extracted when batch 2 failed: its shard is written all the same
    assert sorted(files(out, "samples-index")) == ["shard-00000.json", "shard-00001.json"]
    assert files(out, "samples-features") == {k: v for k, v in files(world["reference"], "samples-features").items()
                                              if k in ("shard-00000.safetensors", "shard-00001.safetensors")}
