"""LCM and LCM-LoRA (issue 14): the adapters against diffusers' pipelines on tiny random models, the distillation
loss at step 0 against diffusers' schedulers, the bad inputs, the committed students."""

from __future__ import annotations

import json

import pytest
import torch

from bench.cli.main import main
from bench.denoiser import CountingDenoiser
from bench.errors import BenchError
from bench.interfaces import Batch
from bench.models import EMBEDDED_WEIGHTS, load_model

PROMPTS = ["a small red circle on a black background", "a large blue square and a small green triangle on a white "
           "background", "a small yellow triangle on a gray background"]
SEEDS = [11, 22, 33]
CARD = {"method": "lcm", "steps": None, "teacher": "tiny", "guidance": [2.0, 14.0],
        "budget": {"steps": 3, "batch_size": 2, "seconds": 1.5}}


def method(name, **args):
    from bench.catalog import METHODS

    cls = METHODS.get(name)
    return cls(cls.parse_args(args))


@pytest.fixture(scope="module")
def lcm_dir(tiny_dir, tmp_path_factory):
    """A tiny random LatentConsistencyModelPipeline folder: the tiny UNet with a w-embedding (cond_proj random, so
    that w matters), LCMScheduler as the recipe configures it, and a distillation.json."""
    from diffusers import StableDiffusionPipeline
    from diffusers import LatentConsistencyModelPipeline

    from bench.distillation import with_guidance_input
    from bench.recipes.lcm import Recipe, lcm_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    torch.manual_seed(1)
    unet = with_guidance_input(pipe.unet, 256)
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("tiny-lcm")
    LatentConsistencyModelPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet,
                                   scheduler=lcm_scheduler(pipe.scheduler.config, Recipe()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    (folder / "distillation.json").write_text(json.dumps(CARD))
    return folder


@pytest.fixture(scope="module")
def lora_dir(tiny_dir, tmp_path_factory):
    """A tiny random LoRA (B not zero) on the tiny UNet, written by StableDiffusionPipeline.save_lora_weights."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(2)
    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]))
    folder = tmp_path_factory.mktemp("tiny-lora")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(
        get_peft_model_state_dict(unet)), safe_serialization=True)
    (folder / "distillation.json").write_text(json.dumps({**CARD, "method": "lcm-lora"}))
    return folder


def generate(model, m, steps=4):
    denoiser = CountingDenoiser(model.unet, torch.device("cpu"))
    return m.generate(model, Batch(tuple(SEEDS), steps, prompts=tuple(PROMPTS)), denoiser), denoiser


def reference(pipe, steps=4, **call):
    """The pipeline's own call on the same initial latents and the same per-sample generators (LCMScheduler draws
    its noise between steps from them, as the loop does)."""
    from diffusers.utils.torch_utils import randn_tensor

    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    shape = (len(SEEDS), pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    latents = randn_tensor(shape, generator=gens)
    return pipe(PROMPTS, num_inference_steps=steps, latents=latents, generator=gens, output_type="pt",
                **call).images * 2 - 1


def test_lcm_equals_latent_consistency_model_pipeline(lcm_dir):
    model = load_model(str(lcm_dir))
    assert type(model.pipeline).__name__ == "LatentConsistencyModelPipeline"
    ours, denoiser = generate(model, method("lcm", guidance=6.0))
    theirs = reference(model.pipeline, guidance_scale=6.0)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    assert denoiser.calls == 4 and denoiser.evaluations == 4 * len(SEEDS)  # one forward pass per step, no CFG batch
    other, _ = generate(model, method("lcm", guidance=2.0))  # the w-embedding is used
    assert not torch.allclose(ours, other, atol=1e-3)


def test_lcm_lora_equals_pipeline_with_load_lora_weights_and_lcm_scheduler(tiny_dir, lora_dir):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    model = load_model(str(tiny_dir))
    m = method("lcm-lora", lora=str(lora_dir))
    m.check(model, 4)
    ours, denoiser = generate(model, m)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(lora_dir)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    theirs = reference(pipe, guidance_scale=1.0)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    assert denoiser.evaluations == 4 * len(SEEDS)
    base, _ = generate(load_model(str(tiny_dir)), method("cfg", guidance=1.0, scheduler="lcm"))  # no LoRA
    assert not torch.allclose(ours, base, atol=1e-3)
    assert m.prepare(model, None, None) == {"pretrain_steps": 3.0, "pretrain_batch_size": 2.0,
                                            "pretrain_seconds": 1.5}
    assert m.protocol(model)["lora"]["sha256"]


def test_lcm_records_the_student_budget(lcm_dir):
    model = load_model(str(lcm_dir))
    m = method("lcm")
    m.check(model, 4)
    assert m.prepare(model, None, None)["pretrain_seconds"] == 1.5
    assert m.args.guidance == 8.5  # LatentConsistencyModelPipeline's default


def test_lcm_distillation_loss_at_step_0_is_the_algorithm(tiny_dir):
    """Luo et al. Algorithm 1 at step 0 (student = target = teacher), recomputed with diffusers' own pieces: the
    noise by DDPMScheduler.add_noise, the teacher's guided step by DDIMScheduler.step on the 50-step trailing grid
    (which steps t -> t - 20, alpha-bar at t = 0 past the end: SD's set_alpha_to_one false), the boundary
    conditions written out (sigma_data 0.5, timestep scaling 10)."""
    import copy

    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

    from bench.distillation import Schedule, with_guidance_input
    from bench.recipes.lcm import Recipe, lcd_loss, lcm_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    teacher = pipe.unet.eval().requires_grad_(False)
    recipe = Recipe()
    student = with_guidance_input(teacher, recipe.guidance_dim)
    b = 8
    torch.manual_seed(0)
    x0, cond, uncond = torch.randn(b, 4, 8, 8), torch.randn(b, 77, 16), torch.randn(1, 77, 16).expand(b, -1, -1)
    loss = lcd_loss(recipe, student, copy.deepcopy(student), teacher, lcm_scheduler(pipe.scheduler.config, recipe),
                    Schedule.from_config(pipe.scheduler.config), x0, cond, uncond,
                    torch.Generator().manual_seed(5), w_input=True)

    gen = torch.Generator().manual_seed(5)  # the same draws, in the loss's order
    n = torch.randint(0, 50, (b,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    w = 2.0 + 12.0 * torch.rand(b, generator=gen)
    t = 20 * n + 19
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    ddim = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    ddim.set_timesteps(50)
    x_t = ddpm.add_noise(x0, noise, t)
    ac = ddpm.alphas_cumprod

    def f(out, x, tt):  # the consistency function: c_skip x + c_out x0
        c_skip = 0.25 / ((10.0 * tt) ** 2 + 0.25)
        c_out = 10.0 * tt / ((10.0 * tt) ** 2 + 0.25) ** 0.5
        return c_skip * x + c_out * (x - (1 - ac[tt]).sqrt() * out) / ac[tt].sqrt()

    total = 0.0
    for i in range(b):
        ti = int(t[i])
        e_u = teacher(x_t[i:i + 1], ti, encoder_hidden_states=uncond[i:i + 1]).sample
        e_c = teacher(x_t[i:i + 1], ti, encoder_hidden_states=cond[i:i + 1]).sample
        guided = e_u + (1 + w[i]) * (e_c - e_u)
        x_prev = ddim.step(guided, ti, x_t[i:i + 1]).prev_sample
        pred = f(teacher(x_t[i:i + 1], ti, encoder_hidden_states=cond[i:i + 1]).sample, x_t[i:i + 1], ti)
        tp = max(ti - 20, 0)
        goal = f(teacher(x_prev, tp, encoder_hidden_states=cond[i:i + 1]).sample, x_prev, tp)
        total = total + (torch.sqrt((pred - goal) ** 2 + 1e-6) - 1e-3).mean()
    assert torch.allclose(loss, total / b, rtol=1e-4, atol=1e-7), (float(loss), float(total / b))


# -- bad input: one line, exit 2, before sampling ----------------------------------------------------------------------
def bad(argv, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    rc = main(["run", *argv, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--steps", "4", "--num-samples",
               "4", "--batch-size", "4", "--metrics", "latency", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("bench: error: "), err
    assert not (tmp_path / "runs").exists()
    return err[0]


def test_lcm_refuses_a_model_without_the_w_embedding(tiny_dir, capsys, monkeypatch, tmp_path):
    assert "is not an LCM" in bad(["--method", "lcm", "--model", str(tiny_dir)], capsys, monkeypatch, tmp_path)


def test_lcm_refuses_a_student_of_another_method(lcm_dir, tmp_path, capsys, monkeypatch):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(lcm_dir, other)
    (tmp_path / "cwd").mkdir()
    (other / "distillation.json").write_text(json.dumps({**CARD, "method": "guided-distillation"}))
    line = bad(["--method", "lcm", "--model", str(other)], capsys, monkeypatch, tmp_path / "cwd")
    assert "guided-distillation" in line


@pytest.mark.parametrize("lora,fragment", [
    ("{tmp}/missing.safetensors", "does not exist"),
    ("{tmp}/weights.bin", "not a .safetensors file"),
    ("{tmp}", "has no pytorch_lora_weights.safetensors"),
    ("latent-consistency/lcm-lora-sdv1-5", "hf download latent-consistency/lcm-lora-sdv1-5"),
])
def test_lcm_lora_refuses_a_lora_that_is_not_there(tiny_dir, lora, fragment, capsys, monkeypatch, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"not a pickle either")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    line = bad(["--method", "lcm-lora", "--model", str(tiny_dir), "--lora", lora.format(tmp=tmp_path)], capsys,
               monkeypatch, cwd)
    assert fragment in line, line


def test_lcm_lora_refuses_a_lora_of_another_unet(tiny_dir, tmp_path):
    from safetensors.torch import save_file

    save_file({"unet.nowhere.lora_A.weight": torch.zeros(2, 3), "unet.nowhere.lora_B.weight": torch.zeros(3, 2)},
              str(tmp_path / "pytorch_lora_weights.safetensors"))
    with pytest.raises(BenchError, match="cannot load LoRA") as info:
        method("lcm-lora", lora=str(tmp_path)).check(load_model(str(tiny_dir)), 4)
    assert "\n" not in str(info.value)


def test_a_public_lcm_offline_is_one_line_saying_what_to_download(capsys, monkeypatch, tmp_path):
    line = bad(["--method", "lcm", "--model", "SimianLuo/LCM_Dreamshaper_v7"], capsys, monkeypatch, tmp_path)
    assert "hf download SimianLuo/LCM_Dreamshaper_v7" in line


# -- the committed students --------------------------------------------------------------------------------------------
@pytest.mark.skipif(not (EMBEDDED_WEIGHTS / "lcm" / "distillation.json").exists(), reason="embedded-lcm not trained")
def test_committed_lcm_loads_with_its_card():
    model = load_model("embedded-lcm")
    card = model.extra["distillation"]
    assert card["method"] == "lcm" and card["teacher"] == "embedded-t2i" and card["steps"] is None
    assert model.unet.config.time_cond_proj_dim == 256
    assert model.scheduler_config["_class_name"] == "LCMScheduler"
    assert model.scheduler_config["original_inference_steps"] == 50
    m = method("lcm")
    m.check(model, 4)
    assert m.prepare(model, None, None)["pretrain_steps"] == card["budget"]["steps"]


@pytest.mark.skipif(not (EMBEDDED_WEIGHTS / "lcm-lora" / "pytorch_lora_weights.safetensors").exists(),
                    reason="the embedded LCM-LoRA not trained")
def test_committed_lcm_lora_loads_on_the_base_model():
    model = load_model("embedded-t2i")
    m = method("lcm-lora")
    m.check(model, 4)
    assert "lcm-lora" in model.unet.peft_config
    assert m.lora_card()["method"] == "lcm-lora" and m.lora_card()["teacher"] == "embedded-t2i"
    assert m.prepare(model, None, None)["pretrain_steps"] == m.lora_card()["budget"]["steps"]
