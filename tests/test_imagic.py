"""Imagic (methods/imagic.py) on a tiny random StableDiffusionPipeline in the real layout: checks that can fail.

Stage A at zero steps is e_tgt; the fine-tune changes a copy, never the run's model; eta = 1 with zero steps of A
and B is diffusers' StableDiffusionPipeline (guided DDIM of the target prompt) from the same noise; a fit depends on
its image and seed alone and is reused from the cache; bad options and a missing public checkpoint are one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from bench.cli.main import main
from bench.denoiser import CountingDenoiser, sample_seed
from bench.editing import EmbeddedEdits
from bench.errors import BenchError
from bench.interfaces import Batch
from methods.imagic import Imagic

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(embedding_steps=3, embedding_lr=0.05, finetune_steps=3, finetune_lr=1e-2)


def make(**args) -> Imagic:
    return Imagic(Imagic.parse_args(args))


@pytest.fixture(scope="module")
def items():
    return EmbeddedEdits().edits(3)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def edit(model, m, items, steps=4, seeds=None):
    seeds = tuple(seeds or (sample_seed(0, i) for i in range(len(items))))
    denoiser = CountingDenoiser(model.unet, torch.device("cpu"))
    return m.generate(model, Batch(seeds, steps, edits=tuple(items)), denoiser), denoiser


def test_stage_a_at_zero_steps_is_the_target_embedding(tiny, items, cache):
    m = make(embedding_steps=0, finetune_steps=0)
    fit = m.fit(tiny, items[0], 5)
    e_tgt, _ = m.encode_text(tiny, [items[0].target_prompt])
    assert torch.equal(fit.e_opt, e_tgt) and torch.equal(fit.e_tgt, e_tgt)
    moved = make(**SMALL).fit(tiny, items[0], 5)
    assert torch.equal(moved.e_tgt, e_tgt) and (moved.e_opt - e_tgt).abs().max() > 1e-3


def test_fine_tuning_changes_a_copy_never_the_runs_model(tiny, items, cache):
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    flags = [p.requires_grad for p in tiny.unet.parameters()]
    training = tiny.unet.training
    m = make(**SMALL)
    _, denoiser = edit(tiny, m, items[:2])
    for k, v in tiny.unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in tiny.unet.parameters())
    assert [p.requires_grad for p in tiny.unet.parameters()] == flags and tiny.unet.training == training
    assert denoiser.model is tiny.unet  # the counting denoiser is handed back its model
    assert denoiser.calls == 2 * 4  # 4 guided steps per image, both branches in one call
    fit = m.fit(tiny, items[0], sample_seed(0, 0))
    assert fit.unet is not tiny.unet
    assert any(not torch.equal(v, before[k]) for k, v in fit.unet.state_dict().items())


def test_eta_1_without_stages_is_stable_diffusion_pipeline(tiny, items, cache):
    from diffusers import StableDiffusionPipeline

    from bench import sampling

    m = make(eta=1.0, guidance=3.0, embedding_steps=0, finetune_steps=0)
    seeds = [5, 6, 7]
    ours, _ = edit(tiny, m, items, steps=6, seeds=seeds)
    p = tiny.pipeline
    pipe = StableDiffusionPipeline(p.vae, p.text_encoder, p.tokenizer, p.unet, m.make_scheduler(tiny), None, None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = sampling.cpu_noise(sampling.generators(seeds), tiny.latent_shape)
    ref = pipe([it.target_prompt for it in items], num_inference_steps=6, guidance_scale=3.0, latents=latents,
               height=32, width=32, output_type="pt").images * 2 - 1
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    other, _ = edit(tiny, make(eta=0.0, guidance=3.0, **SMALL), items, steps=6, seeds=seeds)
    assert (other - ours).abs().max() > 1e-2  # the stages and eta matter


def test_fits_are_per_image_deterministic_and_reused_from_the_cache(tiny, items, cache, monkeypatch):
    m = make(**SMALL)
    both, _ = edit(tiny, m, items[:2])
    alone, _ = edit(tiny, make(**SMALL), items[1:2], seeds=[sample_seed(0, 1)])
    assert torch.allclose(both[1:], alone, atol=1e-5), (both[1:] - alone).abs().max()
    first = m.fit(tiny, items[0], sample_seed(0, 0))
    entries = sorted(p.name for p in (cache / "imagic").iterdir())
    assert len(entries) == 2

    def no_training(*args, **kwargs):
        raise AssertionError("an optimizer step on a cached fit")

    monkeypatch.setattr(torch.optim.Adam, "step", no_training)
    again, _ = edit(tiny, make(**SMALL, eta=0.2), items[:2])  # another eta: the same fits, no optimizer step
    assert (again - both).abs().max() > 1e-3
    assert sorted(p.name for p in (cache / "imagic").iterdir()) == entries
    monkeypatch.undo()
    monkeypatch.setenv("DIFFBENCH_CACHE", str(cache.parent / "fresh"))
    refit = make(**SMALL).fit(tiny, items[0], sample_seed(0, 0))  # from nothing again: the same fit
    assert torch.equal(refit.e_opt, first.e_opt)
    for k, v in first.unet.state_dict().items():
        assert torch.equal(v, refit.unet.state_dict()[k]), k
    assert make(**SMALL).fit_key(tiny, items[0], 1) != make(**SMALL).fit_key(tiny, items[0], 2)
    assert make(**SMALL).fit_key(tiny, items[0], 1) == make(**SMALL, eta=0.1, guidance=2.0).fit_key(tiny, items[0], 1)


def test_bench_run_prepares_every_edit_and_writes_its_outputs(tiny_dir, tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc = main(["run", "--method", "imagic", "--model", str(tiny_dir), "--num-samples", "2", "--steps", "2",
               "--embedding-steps", "2", "--finetune-steps", "1", "--metrics", "latency", "--tracking-uri", uri,
               "--output", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    assert (tmp_path / "out" / "grid.png").is_file() and (tmp_path / "out" / "method" / "budget.json").is_file()
    client = MlflowClient(uri)
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert run.info.status == "FINISHED" and run.data.metrics["train_steps"] == 2 * 3
    assert len(list((cache / "imagic").iterdir())) == 2


@pytest.mark.parametrize("argv,fragment", [
    (["--eta", "2.5"], "--eta"), (["--eta", "nan"], "finite"), (["--embedding-steps", "-1"], "--embedding-steps"),
    (["--finetune-steps", "-3"], "--finetune-steps"), (["--finetune-lr", "0"], "--finetune-lr"),
    (["--model", "runwayml/stable-diffusion-v1-5"], "hf download runwayml/stable-diffusion-v1-5"),
    (["--model", "{pixel}"], "text-to-image"),
])
def test_bad_input_is_one_line_exit_2_and_no_run(argv, fragment, tiny_dir, tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    model = [] if "--model" in argv else ["--model", str(tiny_dir)]
    argv = [a.format(pixel=tiny_model_dir) for a in argv]
    rc = main(["run", "--method", "imagic", *model, *argv, "--num-samples", "2", "--steps", "2", "--tracking-uri",
               uri, "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("bench: error: ") and fragment in err[0], err
    assert not (tmp_path / "out").exists()
    if Path(tmp_path / "mlflow.db").exists():
        client = MlflowClient(uri)
        assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_the_claims_are_declared_along_eta():
    ids = {c.id for c in Imagic.claims}
    assert ids == {"eta-trades-fidelity", "eta-grows-the-edit", "edit-absent-at-eta-0", "edit-present-at-eta-0.7"}
    for claim in Imagic.claims:
        for _, arm in claim.arms:
            Imagic.parse_args({**arm.options, **arm.quick_options})
            assert arm.dataset == "embedded-edits" and arm.model == "embedded-t2i"
    with pytest.raises(BenchError, match="--eta"):
        Imagic.parse_args({"eta": -0.1})
