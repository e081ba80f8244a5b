"""Every bad input the project refuses, in one table: the command, and the exit code it must end with.

Bad input is exit 2 with one line on stderr (``bench: error: ...``), no traceback, no MLflow run, nothing
sampled. Each row runs `bench` in this process (``main([...])``); ``{model}``, ``{files}`` and ``{uri}`` stand for
the tiny checkpoint, a folder of prepared bad files and the module's MLflow store.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bench.cli.main import main

Q = ["--num-samples", "128", "--batch-size", "64", "--no-progress"]
RUN = ["run", "--model", "{model}", "--tracking-uri", "{uri}", "--steps", "2", *Q]
CFG = ["run", "--model", "{model}", "--tracking-uri", "{uri}", *Q]  # steps from the file
T2I = ["run", "--model", "embedded-t2i", "--tracking-uri", "{uri}", *Q]
SWEEP = ["sweep", "--tracking-uri", "{uri}", "--model", "{model}", *Q]


def write_files(d: Path, model_dir: Path) -> None:
    """The bad files the table refers to as {files}/NAME."""
    import argparse
    import shutil

    import torch

    (d / "big.json").write_text(json.dumps({"run_name": "x" * (2 << 20)}))
    (d / "folder.json").mkdir()
    (d / "method-list.yaml").write_text("method: [ddim]\n")
    (d / "list.json").write_text("[1, 2]\n")
    (d / "broken.yaml").write_text("steps: [1,\n")
    (d / "unknown-field.yaml").write_text("stepz: 5\n")
    (d / "steps-text.yaml").write_text("steps: ten\n")
    (d / "metrics-number.yaml").write_text("metrics: 5\n")
    (d / "seed-float.yaml").write_text("seed: 1.5\n")
    (d / "seed-huge.yaml").write_text(f"seed: {2**64}\n")
    (d / "method-args-list.yaml").write_text("method_args: [1]\n")
    (d / "device-number.yaml").write_text("device: 7\n")
    (d / "guidance-inf.yaml").write_text("method: cfg\nmethod_args: {guidance: .inf}\n")
    (d / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    suites = {
        "seeds-negative": {"seeds": -2, "grid": [{"method": "ddim", "steps": 2}]},
        "seeds-zero": {"seeds": 0, "grid": [{"method": "ddim", "steps": 2}]},
        "seeds-duplicate": {"seeds": [1, 1], "grid": [{"method": "ddim", "steps": 2}]},
        "seeds-text": {"seeds": "three", "grid": [{"method": "ddim", "steps": 2}]},
        "grid-mapping": {"grid": {"method": "ddim", "steps": 2}},
        "grid-empty": {"grid": []},
        "grid-missing": {"seeds": 1},
        "grid-entry-text": {"grid": ["ddim"]},
        "grid-steps-zero": {"grid": [{"method": "ddim", "steps": 0}]},
        "grid-method-list-of-lists": {"grid": [{"method": [["ddim"]], "steps": 2}]},
        "grid-unknown-key": {"grid": [{"method": "ddim", "steps": 2, "eta": 1}]},
        "defaults-list": {"defaults": [1], "grid": [{"method": "ddim", "steps": 2}]},
        "unknown-key": {"gird": [], "grid": [{"method": "ddim", "steps": 2}]},
        "regression-negative": {"regression": {"fid": -1}, "grid": [{"method": "ddim", "steps": 2}]},
        "executor-text": {"executor": "ray", "grid": [{"method": "ddim", "steps": 2}]},
        "executor-unknown-key": {"executor": {"dask": {}}, "grid": [{"method": "ddim", "steps": 2}]},
        "executor-unknown-option": {"executor": {"slurm": {"queue": "gpu"}}, "grid": [{"method": "ddim", "steps": 2}]},
        "executor-time-zero": {"executor": {"slurm": {"time": 0}}, "grid": [{"method": "ddim", "steps": 2}]},
        "executor-retries-text": {"executor": {"retries": "many"}, "grid": [{"method": "ddim", "steps": 2}]},
        "executor-cluster-unknown": {"executor": {"slurm": {"cluster": "pbs"}}, "grid": [{"method": "ddim", "steps": 2}]},
        "ok": {"grid": [{"method": "ddim", "steps": 2}]},
    }
    for name, body in suites.items():
        (d / f"suite-{name}.yaml").write_text(json.dumps(body))  # JSON is YAML
    (d / "a-file").write_text("not a folder\n")
    # a model folder whose weights are a pickle .bin (refused unread by weights_only=True)
    pickled = d / "pickle-model"
    shutil.copytree(model_dir, pickled)
    for p in (pickled / "unet").glob("*.safetensors"):
        p.unlink()
    torch.save({"x": argparse.Namespace(evil=True)}, pickled / "unet" / "diffusion_pytorch_model.bin")
    (d / "no-config-model").mkdir()
    # run folders for `bench evaluate`
    for name, text in {"eval-list": "[1, 2]", "eval-broken": "{", "eval-no-spec": '{"protocol_hash": "x"}',
                       "eval-spec-list": '{"spec": [], "protocol": {}, "protocol_hash": "x"}'}.items():
        (d / name).mkdir()
        (d / name / "config.json").write_text(text)
    # pending records for `bench sync`
    good = {"name": "r", "experiment": "e", "tracking_uri": "sqlite:///x.db", "status": "FINISHED", "params": {},
            "tags": {}, "metrics": {"fid": 1.0}, "artifacts": [], "start_time": 1, "end_time": 2}
    records = {"sync-status": {**good, "status": "BOGUS"}, "sync-list": [1], "sync-metrics": {**good, "metrics": {"fid": "x"}},
               "sync-no-name": {k: v for k, v in good.items() if k != "name"}, "sync-params": {**good, "params": [1]},
               "sync-artifact": {**good, "artifacts": ["missing.png"]}, "sync-time": {**good, "start_time": "now"}}
    for name, body in records.items():
        (d / name).mkdir()
        (d / name / "mlflow-pending.json").write_text(json.dumps(body))
    (d / "sync-broken").mkdir()
    (d / "sync-broken" / "mlflow-pending.json").write_text("{")
    (d / "report-folder").mkdir()


# (id, argv, expected exit code, a fragment of the one line on stderr)
CASES = [
    # bench itself
    ("no-command", [], 2, ""),
    ("unknown-command", ["frobnicate"], 2, "invalid choice"),
    ("unknown-option", [*RUN, "--frobnicate"], 2, "unrecognized"),
    # names
    ("method-typo", [*RUN, "--method", "ddmi"], 2, "did you mean"),
    ("method-case", [*RUN, "--method", "DDIM"], 2, "did you mean 'ddim'"),
    ("method-case-mixed", [*RUN, "--method", "DPMSolver++"], 2, "did you mean 'dpmsolver++'"),
    ("dataset-typo", [*RUN, "--dataset", "shapes"], 2, "did you mean 'shapes"),
    ("dataset-case", [*RUN, "--dataset", "SHAPES16"], 2, "did you mean 'shapes16'"),
    ("metric-typo", [*RUN, "--metrics", "fid,kdi"], 2, "did you mean 'kid'"),
    ("metric-empty", [*RUN, "--metrics", ","], 2, "at least one"),
    ("metric-needs-prompts", [*RUN, "--metrics", "clip-score"], 2, "needs prompts"),
    # numbers
    ("steps-zero", [*RUN, "--steps", "0"], 2, "positive integer"),
    ("steps-negative", [*RUN, "--steps", "-1"], 2, "positive integer"),
    ("steps-text", [*RUN, "--steps", "ten"], 2, "positive integer"),
    ("num-samples-zero", [*RUN, "--num-samples", "0"], 2, "positive integer"),
    ("batch-size-zero", [*RUN, "--batch-size", "0"], 2, "positive integer"),
    ("warmup-negative", [*RUN, "--warmup-batches", "-1"], 2, "non-negative"),
    ("seed-negative", [*RUN, "--seed", "-1"], 2, "non-negative"),
    ("seed-2**64", [*RUN, "--seed", str(2**64)], 2, "seed must be an integer in [0, 2**63 - 1]"),
    ("seed-2**63", [*RUN, "--seed", str(2**63)], 2, "seed must be an integer in [0, 2**63 - 1]"),
    # devices and kernels
    ("device-cuda-negative", [*RUN, "--device", "cuda:-1"], 2, "device must be"),
    ("device-cuda-text", [*RUN, "--device", "cuda:x"], 2, "device must be"),
    ("device-unknown", [*RUN, "--device", "tpu"], 2, "device must be"),
    ("dtype-unknown", [*RUN, "--dtype", "float64"], 2, "invalid choice"),
    ("dtype-float16-cpu", [*RUN, "--dtype", "float16", "--device", "cpu"], 2, "not supported on the CPU"),
    ("attention-unknown", [*RUN, "--attention", "flash9"], 2, "invalid choice"),
    # method options: bad values, non-finite floats (every float option of every adapter; see also test_reliability)
    ("bool-option-maybe", [*RUN, "--method", "ddim", "--rescale-betas-zero-snr", "maybe"], 2, "true or false"),
    ("int-option-text", [*RUN, "--method", "deis", "--solver-order", "two"], 2, "invalid int value"),
    ("float-option-text", [*RUN, "--method", "ddim", "--eta", "lots"], 2, "invalid float value"),
    ("ddim-eta-nan", [*RUN, "--method", "ddim", "--eta", "nan"], 2, "finite"),
    ("ddim-eta-inf", [*RUN, "--method", "ddim", "--eta", "inf"], 2, "finite"),
    ("cfg-guidance-inf", [*T2I, "--method", "cfg", "--guidance", "inf"], 2, "finite"),
    ("edict-mixing-zero", [*T2I, "--method", "edict", "--mixing", "0"], 2, "--mixing must be"),
    ("edict-pixel-model", [*RUN, "--method", "edict"], 2, "needs a model of kind text-to-image"),
    ("blended-latent-blend-level", [*T2I, "--method", "blended-latent", "--blend-level", "middle"], 2,
     "--blend-level must be one of"),
    ("cfg-guidance-minus-inf", [*T2I, "--method", "cfg", "--guidance=-inf"], 2, "finite"),
    ("freeu-b1-inf", [*T2I, "--method", "freeu", "--b1", "inf"], 2, "finite"),
    ("classifier-scale-nan", [*RUN, "--method", "classifier-guidance", "--classifier-scale", "nan"], 2, "finite"),
    ("config-guidance-inf", [*T2I, "--config", "{files}/guidance-inf.yaml"], 2, "finite"),
    ("pnp-feature-injection-above-1", [*T2I, "--method", "pnp", "--feature-injection", "1.5"], 2, "--feature-injection"),
    ("pnp-feature-layer-text", [*T2I, "--method", "pnp", "--feature-layer", "layer4"], 2, "--feature-layer"),
    ("pix2pix-zero-xattn-nan", [*T2I, "--method", "pix2pix-zero", "--xattn-guidance", "nan"], 2, "finite"),
    ("vera-rank-zero", [*T2I, "--method", "vera", "--rank", "0"], 2, "--rank"),
    ("vera-d-initial-zero", [*T2I, "--method", "vera", "--d-initial", "0"], 2, "--d-initial"),
    ("loha-alpha-negative", [*T2I, "--method", "loha", "--alpha=-1"], 2, "--alpha"),
    ("lokr-decompose-factor-zero", [*T2I, "--method", "lokr", "--decompose-factor", "0"], 2, "--decompose-factor"),
    # restoration (DDNM): a data set without operators, a model it cannot run on, bad options, a metric off its data
    ("ddnm-on-edits", [*RUN, "--method", "ddnm", "--dataset", "embedded-edits"], 2, "no degradation operators"),
    ("ddnm-on-t2i", [*T2I, "--method", "ddnm"], 2, "needs a model of kind pixel-diffusion"),
    ("ddnm-eta-nan", [*RUN, "--method", "ddnm", "--eta", "nan"], 2, "finite"),
    ("ddnm-update-unknown", [*RUN, "--method", "ddnm", "--update", "ddrm"], 2, "--update"),
    ("restoration-metric-no-edits", [*RUN, "--method", "ddim", "--metrics", "restoration"], 2, "needs an editing run"),
    ("asyrp-strength-inf", [*RUN, "--method", "asyrp", "--edit-strength", "inf"], 2, "finite"),
    ("asyrp-t-edit-beyond", [*RUN, "--method", "asyrp", "--t-edit", "1000"], 2, "--t-edit"),
    ("asyrp-optimizer-unknown", [*RUN, "--method", "asyrp", "--optimizer", "lbfgs"], 2, "--optimizer"),
    ("asyrp-no-training-split", [*RUN, "--method", "asyrp", "--dataset", "shapes16"], 2, "training split"),
    # --config files
    ("config-dev-zero", [*RUN, "--config", "/dev/zero"], 2, "not a regular file"),
    ("config-dev-urandom", [*RUN, "--config", "/dev/urandom"], 2, "not a regular file"),
    ("config-folder", [*RUN, "--config", "{files}/folder.json"], 2, "a folder"),
    ("config-missing", [*RUN, "--config", "{files}/missing.yaml"], 2, "cannot read"),
    ("config-too-big", [*RUN, "--config", "{files}/big.json"], 2, "bytes"),
    ("config-binary", [*RUN, "--config", "{files}/binary.json"], 2, "UTF-8"),
    ("config-method-list", [*CFG, "--config", "{files}/method-list.yaml"], 2, "method must be"),
    ("config-json-list", [*CFG, "--config", "{files}/list.json"], 2, "mapping"),
    ("config-invalid-yaml", [*CFG, "--config", "{files}/broken.yaml"], 2, "not valid YAML"),
    ("config-unknown-field", [*CFG, "--config", "{files}/unknown-field.yaml"], 2, "unknown fields"),
    ("config-steps-text", [*CFG, "--config", "{files}/steps-text.yaml"], 2, "positive integer"),
    ("config-metrics-number", [*CFG, "--config", "{files}/metrics-number.yaml"], 2, "metrics must be"),
    ("config-seed-float", [*CFG, "--config", "{files}/seed-float.yaml"], 2, "seed must be"),
    ("config-seed-huge", [*CFG, "--config", "{files}/seed-huge.yaml"], 2, "seed must be"),
    ("config-method-args-list", [*CFG, "--config", "{files}/method-args-list.yaml"], 2, "method_args must be"),
    ("config-device-number", [*CFG, "--config", "{files}/device-number.yaml"], 2, "device must be"),
    # models
    ("model-missing-folder", ["run", "--model", "{files}/no-such-model", "--tracking-uri", "{uri}", *Q], 2, "model"),
    ("model-no-config", ["run", "--model", "{files}/no-config-model", "--tracking-uri", "{uri}", *Q], 2, "config.json"),
    ("model-pickle-bin", ["run", "--model", "{files}/pickle-model", "--tracking-uri", "{uri}", *Q], 2, "cannot load"),
    # the store and the output folder
    ("experiment-1000-chars", [*RUN, "--experiment", "e" * 1000], 2, "1000 characters"),
    ("experiment-empty", [*RUN, "--experiment", ""], 2, "experiment must be"),
    ("store-under-a-file", ["run", "--model", "{model}", "--tracking-uri", "sqlite:///{files}/a-file/mlflow.db", *Q],
     2, "MLflow tracking database"),
    ("output-is-a-file", [*RUN, "--output", "{files}/a-file"], 2, "is a file"),
    ("output-under-a-file", [*RUN, "--output", "{files}/a-file/out"], 2, "not writable"),
    ("output-in-proc", [*RUN, "--output", "/proc/diffbench-out"], 2, "not writable"),
    # bench sweep and suites
    ("sweep-no-method", ["sweep", "--tracking-uri", "{uri}"], 2, "needs --method"),
    ("sweep-suite-and-method", [*SWEEP, "--suite", "{files}/suite-grid-empty.yaml", "--method", "ddim"], 2, "--suite"),
    ("sweep-seeds-zero", [*SWEEP, "--method", "ddim", "--seeds", "0"], 2, "positive integer"),
    ("sweep-steps-zero", [*SWEEP, "--method", "ddim", "--steps", "2,0"], 2, "positive integer"),
    ("sweep-method-typo", [*SWEEP, "--method", "ddim,ddmp"], 2, "did you mean"),
    ("sweep-guidance-nan", ["sweep", "--tracking-uri", "{uri}", "--method", "cfg", "--guidance", "1,nan",
                            "--model", "embedded-t2i", *Q], 2, "finite"),
    ("sweep-out-a-file", [*SWEEP, "--method", "ddim", "--out", "{files}/a-file"], 2, "is a file"),
    ("sweep-suite-missing", [*SWEEP, "--suite", "{files}/missing.yaml"], 2, "cannot read"),
    ("sweep-suite-dev-zero", [*SWEEP, "--suite", "/dev/zero"], 2, "not a regular file"),
    ("sweep-suite-too-big", [*SWEEP, "--suite", "{files}/big.json"], 2, "bytes"),
    *[(f"suite-{name}", [*SWEEP, "--suite", f"{{files}}/suite-{name}.yaml"], 2, fragment) for name, fragment in [
        ("seeds-negative", "seeds must be"), ("seeds-zero", "seeds must be"), ("seeds-duplicate", "seeds must be"),
        ("seeds-text", "seeds must be"), ("grid-mapping", "'grid' must be"), ("grid-empty", "'grid' must be"),
        ("grid-missing", "'grid'"), ("grid-entry-text", "must be a mapping"), ("grid-steps-zero", "steps must be"),
        ("grid-method-list-of-lists", "method must be"), ("grid-unknown-key", "takes method, steps"),
        ("defaults-list", "'defaults' must be"), ("unknown-key", "unknown keys"), ("regression-negative", "regression"),
        ("executor-text", "'executor' must be a mapping"), ("executor-unknown-key", "unknown executor keys"),
        ("executor-unknown-option", "'executor.slurm' takes"), ("executor-time-zero", "positive integer"),
        ("executor-retries-text", "non-negative integer"), ("executor-cluster-unknown", "must be one of"),
    ]],
    # executors (bench/executors.py): the choice and its options, checked before anything is planned
    ("sweep-executor-unknown", [*SWEEP, "--method", "ddim", "--executor", "dask"], 2, "invalid choice"),
    ("sweep-retries-negative", [*SWEEP, "--method", "ddim", "--retries", "-1"], 2, "non-negative"),
    ("sweep-ray-cpus-zero", [*SWEEP, "--method", "ddim", "--executor", "ray", "--ray-cpus", "0"], 2, "positive integer"),
    ("sweep-slurm-time-text", [*SWEEP, "--method", "ddim", "--executor", "slurm", "--slurm-time", "1h"], 2,
     "positive integer"),
    ("sweep-slurm-cluster-unknown", [*SWEEP, "--method", "ddim", "--executor", "slurm", "--slurm-cluster", "pbs"], 2,
     "invalid choice"),
    ("sweep-slurm-option-on-local", [*SWEEP, "--method", "ddim", "--slurm-partition", "gpu"], 2,
     "--slurm-partition is an option of --executor slurm"),
    ("sweep-ray-option-on-slurm", [*SWEEP, "--method", "ddim", "--executor", "slurm", "--cpus-per-cell", "2"], 2,
     "--cpus-per-cell is an option of --executor ray"),
    ("sweep-ray-address-unreachable", [*SWEEP, "--method", "ddim", "--executor", "ray", "--ray-address",
                                       "127.0.0.1:1"], 2, "nothing answers at the Ray address"),
    ("sweep-ray-address-no-port", [*SWEEP, "--method", "ddim", "--executor", "ray", "--ray-address", "head"], 2,
     "HOST:PORT"),
    ("sweep-ray-address-empty", [*SWEEP, "--method", "ddim", "--executor", "ray", "--ray-address", " "], 2,
     "non-empty"),
    ("nightly-ray-option-on-local", ["nightly", "--suite", "{files}/suite-ok.yaml", "--tracking-uri", "{uri}",
                                     "--ray-address", "auto"], 2, "is an option of --executor ray"),
    ("claims-slurm-option-on-ray", ["claims", "--method", "ddim", "--tracking-uri", "{uri}", "--executor", "ray",
                                    "--slurm-time", "5"], 2, "is an option of --executor slurm"),
    # bench evaluate
    ("evaluate-missing", ["evaluate", "{files}/no-such-run"], 2, "not a run folder"),
    ("evaluate-config-list", ["evaluate", "{files}/eval-list"], 2, "not a run's config"),
    ("evaluate-config-broken", ["evaluate", "{files}/eval-broken"], 2, "not a run folder"),
    ("evaluate-config-no-spec", ["evaluate", "{files}/eval-no-spec"], 2, "not a run's config"),
    ("evaluate-config-spec-list", ["evaluate", "{files}/eval-spec-list"], 2, "not a run's config"),
    # bench report
    ("report-out-folder", ["report", "--tracking-uri", "{uri}", "--out", "{files}/report-folder"], 2, "is a folder"),
    ("report-out-under-a-file", ["report", "--tracking-uri", "{uri}", "--out", "{files}/a-file/r.html"], 2, "is a file"),
    ("report-out-unwritable", ["report", "--tracking-uri", "{uri}", "--out", "/proc/diffbench/r.html"], 2,
     "not writable"),
    ("report-format", ["report", "--tracking-uri", "{uri}", "--format", "pdf"], 2, "invalid choice"),
    # bench sync
    ("sync-status", ["sync", "{files}/sync-status"], 2, "'status'"),
    ("sync-list", ["sync", "{files}/sync-list"], 2, "not a JSON object"),
    ("sync-broken", ["sync", "{files}/sync-broken"], 2, "invalid JSON"),
    ("sync-metrics", ["sync", "{files}/sync-metrics"], 2, "'metrics'"),
    ("sync-no-name", ["sync", "{files}/sync-no-name"], 2, "'name'"),
    ("sync-params", ["sync", "{files}/sync-params"], 2, "'params'"),
    ("sync-artifact", ["sync", "{files}/sync-artifact"], 2, "missing.png"),
    ("sync-time", ["sync", "{files}/sync-time"], 2, "'start_time'"),
    ("sync-no-record", ["sync", "{files}/report-folder"], 2, "no mlflow-pending.json"),
    ("sync-root-missing", ["sync", "--output-root", "{files}/no-such-root"], 2, "not a folder"),
    # issue 18 (diffusionclip): a --finetuned that is not a UNet2DConditionModel folder, one not downloaded, a data
    # set without the recolor's source domain
    ("diffusionclip-finetuned-not-unet", [*T2I, "--method", "diffusionclip", "--finetuned", "{model}"], 2,
     "is not a UNet2DConditionModel folder"),
    ("diffusionclip-finetuned-offline", [*T2I, "--method", "diffusionclip", "--finetuned", "nobody/no-such-unet"], 2,
     "hf download nobody/no-such-unet"),
    ("diffusionclip-no-source-domain", [*T2I, "--method", "diffusionclip", "--dataset", "embedded-edits"], 2,
     "no source domain"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("bad-input")
    files = root / "files"
    files.mkdir()
    write_files(files, tiny_model_dir)
    return {"model": str(tiny_model_dir), "files": str(files), "uri": f"sqlite:///{root}/mlflow.db", "root": root}


def test_the_table_has_at_least_60_kinds():
    assert len({case[0] for case in CASES}) == len(CASES) >= 60


@pytest.mark.parametrize("name,argv,code,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line(name, argv, code, fragment, places, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    argv = [a.format(**places) for a in argv]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == code, (rc, err[-2000:])
    lines = err.strip().splitlines()
    if name != "no-command":  # the bare `bench` prints its help instead
        assert len(lines) == 1 and lines[0].startswith("bench: error: "), err[-2000:]
        assert fragment in lines[0], lines[0]
    assert not any(tmp_path.iterdir()), sorted(p.name for p in tmp_path.iterdir())  # nothing written here
    db = Path(places["uri"][len("sqlite:///"):])
    if db.exists():  # no run was created for bad input
        client = MlflowClient(places["uri"])
        assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
