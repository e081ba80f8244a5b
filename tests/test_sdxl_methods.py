"""Editing and personalization on SDXL (issue 16): SDEdit and LoRA run on a tiny StableDiffusionXLPipeline folder
(tests/tiny_families.py) with SDXL's conditioning (both text encoders, the pooled embedding, add_time_ids): SDEdit
gives StableDiffusionXLImg2ImgPipeline's images and runs end to end through `bench run`; LoRA trains with
added_cond_kwargs in the loss and saves a file StableDiffusionXLPipeline.load_lora_weights reads; the methods that
do not take SDXL refuse it in one line before any work."""

from __future__ import annotations

import json

import pytest
import torch

from bench.catalog import METHODS
from bench.cli.main import main
from bench.denoiser import CountingDenoiser
from bench.editing import EmbeddedEdits
from bench.errors import BenchError
from bench.interfaces import Batch
from bench.models import load_sdxl
from bench.spec import RunSpec

pytestmark = pytest.mark.usefixtures("one_thread")
SEEDS = (5, 6)


def method(name, **args):
    cls = METHODS.get(name)
    return cls(cls.parse_args(args))


def run(model, m, steps=4, **batch):
    denoiser = CountingDenoiser(model.unet, torch.device("cpu"))
    return m.generate(model, Batch(SEEDS, steps, **batch), denoiser), denoiser


@pytest.fixture(scope="module")
def items():
    return EmbeddedEdits().edits(len(SEEDS))


# -- SDEdit --------------------------------------------------------------------------------------------------------------
def test_sdedit_on_sdxl_equals_the_sdxl_img2img_pipeline(sdxl_dir, items):
    """Noised to t0 = 0.6 T and denoised with guidance 3 through the project's loop: StableDiffusionXLImg2ImgPipeline's
    images for the same source latents, scheduler, noise and (default) micro-conditioning."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    model = load_sdxl(str(sdxl_dir))
    m = method("sdedit", strength=0.6, guidance=3.0)
    ours, denoiser = run(model, m, steps=10, edits=tuple(items))
    assert denoiser.calls == 6 and denoiser.evaluations == 6 * 2 * len(SEEDS)  # int(10 * 0.6) steps, CFG batched
    p = model.pipeline
    pipe = StableDiffusionXLImg2ImgPipeline(p.vae, p.text_encoder, p.text_encoder_2, p.tokenizer, p.tokenizer_2, p.unet,
                                            m.make_scheduler(model), requires_aesthetics_score=False,
                                            force_zeros_for_empty_prompt=p.config.force_zeros_for_empty_prompt)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        latents = m.encode_images(model, items)
    ref = pipe([it.target_prompt for it in items], image=latents, strength=0.6, num_inference_steps=10,
               guidance_scale=3.0, generator=[torch.Generator().manual_seed(s) for s in SEEDS],
               output_type="pt").images * 2 - 1
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_sdedit_on_sdxl_end_to_end_and_strength_changes_the_edit(sdxl_dir, tmp_path, capsys):
    from bench.runner import plan_run, sample

    rc = main(["run", "--method", "sdedit", "--model", str(sdxl_dir), "--steps", "4", "--num-samples", "2",
               "--batch-size", "2", "--metrics", "latency", "--no-progress", "--output", str(tmp_path / "run"),
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "NFE" in out.out and (tmp_path / "run" / "config.json").exists()

    def plan(strength):
        return plan_run(RunSpec(method="sdedit", method_args={"strength": strength}, model=str(sdxl_dir), steps=4,
                                num_samples=2, batch_size=2, metrics=("latency",),
                                output=str(tmp_path / f"run-{strength}")))

    low, high = plan(0.25), plan(0.75)
    assert low.spec.dataset == "embedded-edits"
    assert low.protocol["method"]["micro_conditioning"] == {
        "original_size": [32, 32], "crops_coords_top_left": [0, 0], "target_size": [32, 32]}
    assert low.protocol_hash != high.protocol_hash
    a, b = sample(low, progress=False)[0], sample(high, progress=False)[0]
    assert a.shape == b.shape == (2, 32, 32, 3)
    assert abs(a.astype(int) - b.astype(int)).max() > 8


def test_sdedit_protocol_on_sd_is_unchanged(tmp_path):
    """The SDXL micro-conditioning enters SDXL runs only: an SD-1.x edit records the scheduler alone (old hashes)."""
    from bench.runner import plan_run
    from tests.tiny_t2i import save_tiny_t2i

    sd = save_tiny_t2i(tmp_path / "sd")
    plan = plan_run(RunSpec(method="sdedit", model=str(sd), steps=4, num_samples=2, batch_size=2, metrics=("latency",),
                            output=str(tmp_path / "run")))
    assert "micro_conditioning" not in plan.protocol["method"] and "scheduler" in plan.protocol["method"]


def test_sdedit_inversions_refuse_sdxl_in_one_line(sdxl_dir):
    model = load_sdxl(str(sdxl_dir))
    for inversion in ("ddim", "null-text"):
        with pytest.raises(BenchError, match=f"--inversion {inversion} runs on SD-1.x models only") as info:
            method("sdedit", inversion=inversion).check(model, 4)
        assert "\n" not in str(info.value)
    method("sdedit").check(model, 4)


# -- LoRA ----------------------------------------------------------------------------------------------------------------
def lora_parameters(unet, rank):
    """r (in + out) for every attention projection of the UNet, counted from the architecture."""
    attention = [m for m in unet.modules() if type(m).__name__ == "Attention"]
    return sum(rank * (lin.in_features + lin.out_features)
               for m in attention for lin in (m.to_q, m.to_k, m.to_v, m.to_out[0]))


def test_lora_on_sdxl_trains_and_saves_a_file_the_sdxl_pipeline_loads(sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from methods.lora import LORA_FILE

    model = load_sdxl(str(sdxl_dir))
    # prior preservation on: the class images are the SDXL model's own samples (the text-to-image loop)
    m = method("lora", train_steps=3, drift_samples=0, learning_rate=1e-2, guidance=3.0, train_batch_size=2,
               prior_preservation=True, num_class_images=2)
    m.check(model, 2)
    values = m.prepare(model, RunSpec(method="lora", dataset="embedded-concepts", steps=2), tmp_path)
    assert values["train_steps"] == 2 * 3 and values["train_params"] == lora_parameters(model.unet, 4) > 0
    folder = tmp_path / "diamond"
    assert (folder / LORA_FILE).is_file()
    diamond = m.subjects["diamond"]
    prompts = ["a large <diamond> on a black background", "a large <diamond> on a white background"]
    ours, _ = run(model, m, steps=2, prompts=tuple(prompts))

    # the user's path: a fresh StableDiffusionXLPipeline and its own LoRA loader give the same images
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = m.make_scheduler(model)
    texts = [p.replace(diamond.token, m.phrase(diamond)) for p in prompts]

    def reference():
        from diffusers.utils.torch_utils import randn_tensor

        latents = randn_tensor((len(SEEDS), *model.latent_shape),
                               generator=[torch.Generator().manual_seed(s) for s in SEEDS])
        return pipe(texts, num_inference_steps=2, guidance_scale=3.0, latents=latents, output_type="pt").images * 2 - 1

    untouched = reference()
    pipe.load_lora_weights(str(folder), weight_name=LORA_FILE)
    loaded = reference()
    assert torch.allclose(ours, loaded, atol=1e-4), (ours - loaded).abs().max()
    assert (loaded - untouched).abs().max() > 1e-3  # the LoRA changes the output
    report = json.loads((tmp_path / "budget.json").read_text())
    assert set(report["subjects"]) == {"diamond", "orange"}


# -- the others refuse SDXL ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["p2p", "diffedit", "dreambooth", "hyperdreambooth", "vera", "textual-inversion"])
def test_methods_without_sdxl_refuse_it_in_one_line_before_any_work(name, sdxl_dir, tmp_path):
    from bench.runner import plan_run

    with pytest.raises(BenchError, match=rf"method '{name}' needs a model of kind text-to-image, .* is "
                                         r"text-to-image-xl") as info:
        plan_run(RunSpec(method=name, model=str(sdxl_dir), steps=2, num_samples=2, batch_size=2, metrics=("latency",),
                         output=str(tmp_path / "run")))
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()
