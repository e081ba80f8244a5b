"""Guided distillation (Meng et al. 2023): the w-conditioned loop against StableDiffusionPipeline, the adapter's bad
inputs, the recipe's stage-one loss and stage-two grid, the committed students."""

from __future__ import annotations

import json

import pytest
import torch

from bench.cli.main import main
from bench.denoiser import CountingDenoiser
from bench.distillation import Schedule, grid, with_guidance_input
from bench.interfaces import Batch
from bench.models import load_model
from bench.recipes import guided
from tests.tiny_t2i import TINY_UNET, save_tiny_t2i

PROMPTS = ["a small red circle on a black background", "a large blue square on a white background"]
SEEDS = [5, 6]
W_DIM = 32  # a tiny w-embedding (the recipe's is 256)


def w_student(folder):
    """The tiny folder's UNet with a w input whose projection is random (so that w changes the output)."""
    from diffusers import UNet2DConditionModel

    unet = with_guidance_input(UNet2DConditionModel.from_pretrained(folder / "unet"), W_DIM)
    torch.manual_seed(1)
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight.normal_(0, 1.0)
    return unet


def card(steps):
    return {"method": "guided-distillation", "steps": steps, "teacher": "tiny", "guidance": [0.0, 8.0],
            "budget": {"steps": 7, "seconds": 1.5}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from diffusers import DDIMScheduler

    root = tmp_path_factory.mktemp("guided")
    plain = save_tiny_t2i(root / "plain")
    unet = w_student(plain)
    stage_one = guided.save_student(root / "stage-one", plain, unet, None, card(None), {"model": "tiny"})
    scheduler = DDIMScheduler.from_config(guided.v_scheduler_config(json.loads(
        (plain / "scheduler" / "scheduler_config.json").read_text())))
    stage_two = guided.save_student(root / "stage-two", plain, unet, scheduler, card([4]), {"model": "tiny"})
    return {"plain": plain, "one": stage_one, "two": stage_two, "root": root}


def method(**args):
    from bench.catalog import METHODS

    cls = METHODS.get("guided-distillation")
    return cls(cls.parse_args(args))


def loop_and_pipeline(folder, guidance, steps):
    from diffusers.utils.torch_utils import randn_tensor

    model = load_model(str(folder))
    m = method(guidance=guidance)
    m.check(model, steps)
    denoiser = CountingDenoiser(model.unet, torch.device("cpu"))
    ours = m.generate(model, Batch(tuple(SEEDS), steps, prompts=tuple(PROMPTS)), denoiser)
    pipe = model.pipeline
    pipe.scheduler = m.make_scheduler(model)
    latents = randn_tensor((len(SEEDS), *model.latent_shape), generator=[torch.Generator().manual_seed(s) for s in SEEDS])
    reference = pipe(PROMPTS, num_inference_steps=steps, latents=latents, output_type="pt",
                     guidance_scale=guidance).images * 2 - 1
    return ours, reference, denoiser, model


@pytest.mark.parametrize("which,steps", [("one", 5), ("two", 4)])
def test_the_loop_equals_stable_diffusion_pipeline_with_the_w_embedding(folders, which, steps):
    ours, reference, denoiser, model = loop_and_pipeline(folders[which], 3.0, steps)
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()
    assert denoiser.calls == steps and denoiser.evaluations == steps * len(SEEDS)  # one branch: no CFG batch
    other, _, _, _ = loop_and_pipeline(folders[which], 6.0, steps)
    assert (other - ours).abs().max() > 1e-3  # w reaches the UNet
    if which == "two":
        assert model.scheduler_config["timestep_spacing"] == "trailing"
        assert model.scheduler_config["prediction_type"] == "v_prediction"


def test_the_adapter_records_the_students_budget(folders):
    model = load_model(str(folders["one"]))
    assert model.extra["distillation"]["method"] == "guided-distillation"
    assert method().prepare(model, None, folders["root"]) == {"pretrain_steps": 7.0, "pretrain_seconds": 1.5}


@pytest.mark.parametrize("which,extra,fragment", [
    ("plain", [], "no w-embedding"),
    ("two", ["--steps", "8"], "distilled for 4 step"),
    ("one", ["--guidance", "12"], "trained on w in [0, 8]"),
    ("one", ["--scheduler", "euler"], "samples with ddim"),
])
def test_bad_input_is_one_line_exit_2(folders, which, extra, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--method", "guided-distillation", "--model", str(folders[which]), "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db", "--num-samples", "128", "--no-progress", "--steps", "4", *extra]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("bench: error: "), err
    assert fragment in err[0], err[0]


# -- the recipe ---------------------------------------------------------------------------------------------------------
def test_stage_one_loss_is_zero_at_w_zero_at_step_zero():
    """with cond_proj zero the student is the teacher's conditional branch: the CFG target at w = 0 exactly (the
    teacher built in memory, whose time_cond_proj_dim is only a default: bench.distillation.with_guidance_input)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**TINY_UNET).eval()
    with torch.no_grad():
        teacher.conv_out.weight.mul_(50)  # guidance must visibly matter
    student = with_guidance_input(teacher, guided.W_DIM)
    z, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 990])
    cond, uncond = torch.randn(3, 77, 16), torch.randn(1, 77, 16)
    zero = guided.stage_one_loss(student, teacher, z, t, cond, uncond, torch.zeros(3))
    guided_w = guided.stage_one_loss(student, teacher, z, t, cond, uncond, torch.full((3,), 3.0))
    zero, guided_w = zero.item(), guided_w.item()
    assert zero < 1e-10 and guided_w > 1e-4, (zero, guided_w)


def test_stage_two_rounds_and_the_four_step_sampler():
    from diffusers import DDIMScheduler

    recipe = guided.ProgressiveRecipe(steps=100, first_round_share=0.4)
    assert recipe.rounds() == [(16, 40), (8, 30), (4, 30)]
    config = json.loads((guided.EMBEDDED_WEIGHTS / "t2i" / "scheduler" / "scheduler_config.json").read_text())
    scheduler = DDIMScheduler.from_config(guided.v_scheduler_config(config))
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == grid(4)[:-1] == [999, 749, 499, 249]
    assert scheduler.config.prediction_type == "v_prediction"
    schedule = Schedule.from_config(config, "v_prediction")
    assert float(scheduler.final_alpha_cumprod) == pytest.approx(schedule.final)


# -- the committed students ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,steps", [("embedded-guided-distillation", None),
                                        ("embedded-guided-distillation-4", [4])])
def test_the_committed_students_load(name, steps):
    model = load_model(name)
    student = model.extra["distillation"]
    assert student["method"] == "guided-distillation" and student["steps"] == steps
    assert student["teacher"] == "embedded-t2i" and student["budget"]["seconds"] > 0
    assert model.unet.config.time_cond_proj_dim == guided.W_DIM
    if steps:
        assert model.scheduler_config["_class_name"] == "DDIMScheduler"
        assert model.scheduler_config["timestep_spacing"] == "trailing"
        assert model.scheduler_config["prediction_type"] == "v_prediction"
