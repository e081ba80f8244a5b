"""Personalization: the data sets, the four adapters' contracts, DreamBench's metrics and the papers' claims.

Contract tests train for a few steps on the tiny random pipeline (tests/tiny_t2i.py); the budget-trend test
reads the embedded model's real counts and file sizes without training (they do not depend on the values);
the learned-concept claims train the embedded model with the methods' real budgets and are marked slow.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from bench.interfaces import Batch

from bench.errors import BenchError
from bench.spec import RunSpec
from tests.tiny_t2i import save_tiny_t2i

FIXTURE = Path(__file__).parent / "fixtures" / "dreambench" / "dataset"
METHOD_NAMES = ("textual-inversion", "dreambooth", "lora", "custom-diffusion", "vera", "loha", "lokr")
PEFT_NAMES = ("lora", "vera", "loha", "lokr")


def method(name: str, **args):
    from bench.catalog import METHODS

    cls = METHODS.get(name)
    return cls(cls.parse_args(args))


def module_of(name: str):
    import importlib

    from bench.catalog import METHODS

    return importlib.import_module(METHODS.get(name).__module__)


def generate(m, model, prompts, seeds, steps=4):
    from bench.denoiser import CountingDenoiser

    return m.generate(model, Batch(tuple(seeds), steps, prompts=tuple(prompts)), CountingDenoiser(model.unet, torch.device("cpu")))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_t2i(tmp_path_factory.mktemp("tiny-t2i"))


def tiny(tiny_dir):
    from bench.models import load_model

    return load_model(str(tiny_dir))


# -- data sets --------------------------------------------------------------------------------------------------------------
def test_dreambench_layout_loads():
    from bench.personalization import DreamBench

    ds = DreamBench(FIXTURE)
    ds.resolution = 16
    subjects = {s.name: s for s in ds.subjects()}
    assert set(subjects) == {"red_mug", "dog9"}
    mug, dog = subjects["red_mug"], subjects["dog9"]
    assert (mug.class_noun, mug.live, dog.class_noun, dog.live) == ("mug", False, "dog", True)
    assert mug.prompts == ("a {} on a wooden table", "a {} in the snow", "a purple {}")
    assert dog.prompts == ("a {} in the snow", "a {} wearing a hat")
    assert mug.images.shape == (3, 16, 16, 3) and dog.images.shape == (2, 16, 16, 3)
    assert mug.images[:, :, 0, 2].max() < 120  # the blue side bands are cropped away
    prompts = ds.prompts(7)
    assert [p.text for p in prompts[:4]] == ["a <red_mug> on a wooden table", "a <red_mug> in the snow",
                                             "a purple <red_mug>", "a <dog9> in the snow"]
    assert prompts[5].text == prompts[0].text  # prompt i mod len
    assert prompts[2].attributes == {"subject": "red_mug", "clip_t_text": "a purple mug"}


def test_dreambench_missing_or_broken_is_one_line(tmp_path):
    from bench.personalization import DreamBench

    with pytest.raises(BenchError, match="github.com/google/dreambooth"):
        DreamBench(tmp_path).subjects()
    (tmp_path / "prompts_and_classes.txt").write_text("Classes\n\nsubject_name,class\nx,cat\n")
    with pytest.raises(BenchError, match="Object Prompts"):
        DreamBench(tmp_path).subjects()


def test_embedded_concepts_show_the_held_out_values():
    from bench.personalization import EmbeddedConcepts
    from metrics.attribute_accuracy import predict
    from bench.embedded.feature_extractor import WEIGHTS_DIR32, load_network

    ds = EmbeddedConcepts()
    diamond, orange = ds.subjects()
    assert (diamond.name, diamond.class_noun, orange.name, orange.class_noun) == ("diamond", "square", "orange", "circle")
    assert diamond.images.shape == (5, 32, 32, 3) and diamond.digest() == ds.subjects()[0].digest()
    net = load_network(WEIGHTS_DIR32)
    assert (predict(net, diamond.images_tensor())["shape"] == 3).all()  # ALL_SHAPES[3] == "diamond"
    assert (predict(net, orange.images_tensor())["color"] == 6).all()  # ALL_COLORS' 7th is orange
    p = ds.prompts(13)
    assert p[0].text == "a large <diamond> on a black background" and p[12].text == p[0].text
    assert p[6].attributes["clip_t_text"] == "a large circle on a black background"
    assert p[6].attributes["objects"] == [{"shape": "circle", "color": "orange", "size": "large"}]
    images, captions = ds.class_reference(diamond, 8, 9)
    assert images.shape == (8, 32, 32, 3) and all(" square " in c for c in captions)


# -- the shared fine-tuning pieces ----------------------------------------------------------------------------------------
def test_diffusion_loss_is_the_t2i_training_loss(tiny_dir):
    """bench.finetune.diffusion_loss draws and computes exactly what bench/embedded/t2i.py's loop did inline."""
    import torch.nn.functional as F

    from bench.finetune import diffusion_loss, encode_prompts, training_scheduler

    model = tiny(tiny_dir)
    sched = training_scheduler(model)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    hidden = encode_prompts(model, ["a red circle", "a", ""])
    ours = diffusion_loss(model.unet, sched, latents, hidden, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, sched.config.num_train_timesteps, (3,), generator=gen)
    inline = F.mse_loss(model.unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=hidden).sample, noise)
    assert torch.equal(ours, inline)
    per_sample = diffusion_loss(model.unet, sched, latents, hidden, torch.Generator().manual_seed(5), reduction="none")
    assert per_sample.shape == (3,) and torch.allclose(per_sample.mean(), ours)


def test_budget_meter_and_parameter_count():
    from bench.finetune import Budget, BudgetMeter, trainable_parameters

    lin = torch.nn.Linear(3, 2)
    lin.bias.requires_grad_(False)
    assert trainable_parameters([lin.weight, lin.bias, lin.weight]) == 6
    with BudgetMeter("cpu") as meter:
        torch.zeros(1 << 20).sum()
    b = meter.budget(steps=7, params=6, saved=10)
    assert b.seconds > 0 and b.peak_memory_bytes > 0 and b.memory_source
    total = b.add(Budget(3, 4, 1.0, 1, "", "cpu", 5))
    assert (total.steps, total.params, total.saved_bytes) == (10, 6, 15)
    assert set(total.metrics()) == {"train_steps", "train_params", "train_seconds", "train_peak_memory_bytes",
                                    "train_saved_bytes"}


# -- the adapters' contract (tiny random pipeline, a few steps) -----------------------------------------------------------
def expected_params(name: str, model) -> int:
    """What each paper trains, counted from the architecture (not from the adapter)."""
    unet = model.unet
    if name == "textual-inversion":
        return model.text_encoder.config.hidden_size
    if name == "dreambooth":
        return sum(p.numel() for p in unet.parameters())
    attention = [m for m in unet.modules() if type(m).__name__ == "Attention"]
    if name == "custom-diffusion":
        cross = [m for m in attention if m.is_cross_attention]
        return sum(m.to_k.weight.numel() + m.to_v.weight.numel() for m in cross) + model.text_encoder.config.hidden_size
    from tests.test_peft_adapters import adapter_params

    layers = [lin for m in attention for lin in (m.to_q, m.to_k, m.to_v, m.to_out[0])]
    return adapter_params(name, [(lin.in_features, lin.out_features) for lin in layers])


def file_digests(folder: Path) -> dict[str, str]:
    """Saved files by content: safetensors by their tensors and metadata (diffusers' LoRA writer orders the header's
    metadata keys differently from call to call), other files by their bytes."""
    from safetensors import safe_open

    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name == "budget.json":
            continue
        h = hashlib.sha256()
        if p.suffix == ".safetensors":
            with safe_open(str(p), "pt") as f:
                h.update(json.dumps(f.metadata(), sort_keys=True).encode())
                for k in sorted(f.keys()):
                    h.update(k.encode() + f.get_tensor(k).numpy().tobytes())
        else:
            h.update(p.read_bytes())
        out[str(p.relative_to(folder))] = h.hexdigest()
    return out


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_adapter_trains_saves_reloads_and_restores(name, tiny_dir, tmp_path):
    from methods.cfg import CFG

    spec = RunSpec(method=name, dataset="embedded-concepts", steps=4, num_samples=4)
    args = {"train_steps": 3, "drift_samples": 0, "learning_rate": 1e-2}
    if name in ("dreambooth", "custom-diffusion") + PEFT_NAMES:
        args.update(prior_preservation=True, num_class_images=4)
    model = tiny(tiny_dir)
    m = method(name, **args)
    class_prompt = ["a small red square on a gray background"] * 2
    base_class = generate(CFG(CFG.parse_args({})), model, class_prompt, [5, 6])
    values = m.prepare(model, spec, tmp_path / "a")

    # the budget: what the paper trains, counted independently; steps over both subjects; the files' size
    assert values["train_params"] == expected_params(name, model)
    assert values["train_steps"] == 2 * 3
    saved = sum(p.stat().st_size for p in (tmp_path / "a").rglob("*") if p.is_file() and p.name != "budget.json")
    assert values["train_saved_bytes"] == saved > 0
    assert values["train_seconds"] > 0 and values["train_peak_memory_bytes"] > 0
    report = json.loads((tmp_path / "a" / "budget.json").read_text())
    assert set(report["subjects"]) == {"diamond", "orange"}

    # prompts without a subject see the untouched model; the subject's prompts do not
    assert torch.equal(generate(m, model, class_prompt, [5, 6]), base_class)
    prompts = ["a large <diamond> on a black background", "a large <diamond> on a white background"]
    ours = generate(m, model, prompts, [1, 2])

    # the saved files, loaded into a fresh pipeline by diffusers' loaders, give the same images
    fresh = tiny(tiny_dir)
    diamond = m.subjects["diamond"]
    module_of(name).load(fresh.pipeline, tmp_path / "a" / "diamond")
    texts = [p.replace(diamond.token, m.phrase(diamond)) for p in prompts]
    reloaded = generate(CFG(CFG.parse_args({})), fresh, texts, [1, 2])
    assert torch.allclose(ours, reloaded, atol=1e-5), (ours - reloaded).abs().max()
    assert not torch.allclose(ours, generate(CFG(CFG.parse_args({})), tiny(tiny_dir), texts, [1, 2]), atol=1e-4)

    # same seed, same weights
    m2 = method(name, **args)
    m2.prepare(tiny(tiny_dir), spec, tmp_path / "b")
    assert file_digests(tmp_path / "a") == file_digests(tmp_path / "b")


def test_custom_diffusion_merge_meets_its_constraints_at_least_change():
    """Eq. 5: W C^T = V holds, and no other W meeting it changes the regularization outputs less."""
    from methods.custom_diffusion import merge_weights

    g = torch.Generator().manual_seed(0)
    w0, c, creg = torch.randn(6, 8, generator=g), torch.randn(3, 8, generator=g), torch.randn(40, 8, generator=g)
    v = torch.randn(6, 3, generator=g)
    w = merge_weights(w0, c, v, creg)
    assert torch.allclose(w @ c.T, v, atol=1e-3)
    objective = lambda x: float(((x - w0) @ creg.T).norm())  # noqa: E731
    null = torch.eye(8) - c.T @ torch.linalg.solve(c @ c.T, c)  # directions that keep W C^T
    for k in range(5):
        delta = 0.1 * torch.randn(6, 8, generator=g) @ null
        assert torch.allclose((w + delta) @ c.T, v, atol=1e-3)
        assert objective(w + delta) > objective(w)


def test_custom_diffusion_merged_model_serves_both_subjects(tiny_dir, tmp_path):
    m = method("custom-diffusion", train_steps=3, drift_samples=0, learning_rate=1e-2, prior_preservation=False,
               merge=True)
    model = tiny(tiny_dir)
    values = m.prepare(model, RunSpec(method="custom-diffusion", dataset="embedded-concepts", steps=4), tmp_path)
    assert values["merge_seconds"] > 0 and (tmp_path / "merged" / "pytorch_custom_diffusion_weights.safetensors").is_file()
    c, _, owner = m.merge_inputs
    assert set(owner) == {"diamond", "orange"}
    for name in m.merged:
        proc = m.merged[name]
        if not getattr(proc, "train_kv", False):
            continue
        for attr in ("to_k_custom_diffusion", "to_v_custom_diffusion"):
            merged_out = getattr(proc, attr).weight @ c.T
            own = torch.stack([getattr(m.procs[o][name], attr).weight @ c[j] for j, o in enumerate(owner)], 1)
            assert torch.allclose(merged_out, own, atol=1e-3 * float(own.abs().max()))


# -- runner, metrics --------------------------------------------------------------------------------------------------------
def test_personalization_runs_need_a_subject_data_set(tmp_path):
    from bench.runner import plan_run

    with pytest.raises(BenchError, match="personalization data set"):
        plan_run(RunSpec(method="dreambooth", dataset="shapes32", metrics=("latency",), output=str(tmp_path / "o"),
                         num_samples=4))
    with pytest.raises(BenchError, match="clip-i needs a personalization data set"):
        plan_run(RunSpec(method="cfg", dataset="shapes32", metrics=("clip-i",), output=str(tmp_path / "o"), num_samples=4))
    plan = plan_run(RunSpec(method="lora", dataset="embedded-concepts", output=str(tmp_path / "o"), num_samples=4,
                            method_args={"train_steps": 1}))
    assert plan.prompts[0].text == "a large <diamond> on a black background"
    assert plan.protocol["prompts"]["dataset"]["subjects"]["diamond"]  # the subject images are hashed


def test_subject_fidelity_metrics_rank_the_right_subject():
    """CLIP-I and DINO: a subject's own renders score above the other subject's; *_real is their ceiling."""
    from bench.evaluation import EvalContext
    from bench.personalization import EmbeddedConcepts
    from metrics.personalization import CLIPI, CLIPT, DINO

    ds = EmbeddedConcepts()
    diamond, orange = ds.subjects()
    samples = torch.cat([diamond.images_tensor(), orange.images_tensor()])

    def values(subjects):
        targets = [{"subject": s, "clip_t_text": "a large square on a white background"} for s in subjects]
        ctx = EvalContext(spec=RunSpec(), samples=samples, reference=ds, device=torch.device("cpu"),
                          prompts=["x"] * len(samples), targets=targets)
        return {**CLIPI().compute(ctx), **DINO().compute(ctx), **CLIPT().compute(ctx)}

    right = values(["diamond"] * 5 + ["orange"] * 5)
    wrong = values(["orange"] * 5 + ["diamond"] * 5)
    sim = "subject_sim_shapes_cnn32"  # the embedded world's key names the network (not DINO) that computed it
    assert "dino" not in right and f"{sim}_real" in right
    assert right["clip_i"] > wrong["clip_i"] + 0.3 and right[sim] > wrong[sim] + 0.05
    assert right["clip_i"] > right["clip_i_real"]  # samples equal to the real images (self-pairs included)
    assert -1 <= right["clip_t"] <= 1


def test_prior_drift_is_zero_for_the_same_samples_and_grows_with_change():
    from bench.embedded.shapes import WorldConfig, render_set
    from metrics.personalization import frechet_distance, heldout_rate

    images, _ = render_set(7, range(256), WorldConfig(32, 1, "train"))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    other, _ = render_set(7, range(256), WorldConfig(32, 1, "all"))
    y = torch.from_numpy(other).permute(0, 3, 1, 2).contiguous()
    assert frechet_distance(x[:128], x[:128], "shapes-cnn32") < 1e-6
    assert frechet_distance(x[:128], y[:128], "shapes-cnn32") > frechet_distance(x[:128], x[128:], "shapes-cnn32")
    truth = {"objects": [{"shape": "diamond", "color": "green"}]}
    assert heldout_rate(x, truth) < 0.02 < heldout_rate(y, truth)
    with pytest.raises(BenchError, match="at least 128"):
        frechet_distance(x[:10], x[:10], "shapes-cnn32")


def test_budget_trend_lora_and_custom_diffusion_against_full_fine_tuning(tmp_path):
    """Trained parameters and file sizes on the embedded model (they do not depend on the trained values)."""
    from bench.models import load_model

    spec = RunSpec(dataset="embedded-concepts", steps=4)
    budget = {}
    for name in ("dreambooth", "lora", "custom-diffusion", "textual-inversion"):
        m = method(name, train_steps=0, drift_samples=0, **({} if name == "textual-inversion" else
                                                            {"prior_preservation": False}))
        budget[name] = m.prepare(load_model("embedded-t2i"), spec.replace(method=name), tmp_path / name)
    full = budget["dreambooth"]
    assert full["train_params"] == 2_220_820  # every UNet weight
    for name in ("lora", "custom-diffusion"):
        assert budget[name]["train_params"] < 0.05 * full["train_params"]
        assert budget[name]["train_saved_bytes"] < 0.05 * full["train_saved_bytes"]
    assert budget["textual-inversion"]["train_params"] == 64


# -- the papers' claims on the embedded world (the methods' real budgets) -------------------------------------------------
SUITE = Path(__file__).resolve().parent.parent / "suites" / "personalization.yaml"


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """suites/personalization.yaml through `bench sweep`, at 4 images per prompt (48 samples): {cell: row}."""
    import os

    import pandas as pd

    from bench.cli.main import main

    out = tmp_path_factory.mktemp("personalization-suite")
    cwd = os.getcwd()
    os.chdir(out)  # the runs' output folders (bench-runs/...) go there
    try:
        code = main(["sweep", "--suite", str(SUITE), "-n", "48", "--batch-size", "48", "--out", str(out / "table"),
                     "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}", "--no-progress"])
    finally:
        os.chdir(cwd)
    if code != 0:  # not an AssertionError: the strict xfail below expects only its own assertion to fail
        pytest.fail(f"bench sweep --suite {SUITE} exited with {code}")
    rows = pd.read_csv(out / "table" / "runs.csv")
    return {r["cell"]: r for _, r in rows.iterrows()}


@pytest.mark.slow
@pytest.mark.timeout(3000)  # the first test also runs the suite (10 trainings; the first 7 took about 12 minutes on 2 busy cores)
@pytest.mark.parametrize("cell", ["textual-inversion-25steps", "dreambooth-25steps", "lora-25steps",
                                  "custom-diffusion-25steps", "custom-diffusion-merged"])
def test_each_method_learns_its_concept(suite, cell):
    """CLIP-I and the feature similarity rise well above the untuned model's (a third of the way to the real images'
    similarity among themselves, at least); the feature network sees the subject's held-out shape and color."""
    untuned, tuned = suite["untuned"], suite[cell]
    for key in ("clip_i", "subject_sim_shapes_cnn32"):
        gap = untuned[f"{key}_real"] - untuned[key]
        assert tuned[key] > untuned[key] + gap / 3, (key, tuned[key], untuned[key])
    assert tuned["attr_acc_all"] > untuned["attr_acc_all"] + 0.3


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_prior_preservation_reduces_prior_drift(suite):
    with_prior, without = suite["dreambooth-25steps"], suite["dreambooth-no-prior"]
    assert with_prior["prior_drift"] < without["prior_drift"]
    assert with_prior["prior_heldout_rate"] < without["prior_heldout_rate"]
    assert suite["textual-inversion-25steps"]["prior_drift"] == 0.0  # nothing the class prompts read has changed


@pytest.mark.slow
@pytest.mark.timeout(3000)
@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="does not hold on the embedded concepts: each is one attribute value (a shape, a color), "
                   "what one word embedding can express, and Textual Inversion matches or beats DreamBooth there "
                   "(docs/personalization.md: CLIP-I and shapes-cnn32 subject similarity); DreamBench's subjects carry detail "
                   "beyond a word")
def test_dreambooth_beats_textual_inversion_in_subject_fidelity(suite):
    db, ti = suite["dreambooth-25steps"], suite["textual-inversion-25steps"]
    assert db["subject_sim_shapes_cnn32"] > ti["subject_sim_shapes_cnn32"] and db["clip_i"] > ti["clip_i"]
