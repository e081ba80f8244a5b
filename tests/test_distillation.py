"""Few-step students of the pixel DDPM (issue 14): the distillation grid and target, progressive distillation and
consistency models against diffusers' own schedulers and pipelines, and the bad inputs a student refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import (CMStochasticIterativeScheduler, ConsistencyModelPipeline, DDIMScheduler, DDPMPipeline,
                       UNet2DModel)

from bench.cli.main import main
from bench.distillation import Schedule, check_grid_matches_ddim, distillation_target, grid, step_timesteps
from bench.embedded.pixel_ddpm import SCHEDULER_CONFIG
from bench.models import STUDENT_FILE, load_pixel_diffusion
from tests.conftest import TINY_UNET

pytestmark = pytest.mark.usefixtures("one_thread")


def toy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed smooth 'network' of (x, t)."""
    return torch.tanh(x) * 0.5 + 0.3 * t.float().reshape(-1, 1, 1, 1) / 1000


def test_grids_nest_and_equal_diffusers_trailing_ddim_where_it_divides():
    for n in (1, 2, 4, 8, 16, 32):
        assert grid(n)[::2] == grid(n // 2) if n > 1 else grid(1) == [999, -1]
    for n in (1, 2, 4, 8):
        s = DDIMScheduler.from_config({**SCHEDULER_CONFIG, "timestep_spacing": "trailing"})
        s.set_timesteps(n)
        assert s.timesteps.tolist() == grid(n)[:-1] and check_grid_matches_ddim(n)
    assert not check_grid_matches_ddim(16)  # 1000 / 16 is not an integer: DDIM's previous timestep is off the grid
    t, mid, nxt = step_timesteps(4, torch.tensor([1, 4]))
    assert t.tolist() == [999, 249] and mid.tolist() == [874, 124] and nxt.tolist() == [749, -1]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_on_the_grid_equals_diffusers_ddim_step(prediction):
    config = {**SCHEDULER_CONFIG, "prediction_type": prediction}
    schedule = Schedule.from_config(config)
    sched = DDIMScheduler.from_config({**config, "timestep_spacing": "trailing"})
    sched.set_timesteps(4)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    for t in sched.timesteps:
        x = sched.step(toy(x, t.repeat(2)), t, x).prev_sample
    points = grid(4)
    for a, b in zip(points[:-1], points[1:]):
        t = torch.tensor([a, a])
        x0, eps = schedule.split(toy(y, t), y, t)
        y = schedule.ddim(y, x0, eps, torch.tensor([b, b]))
    torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)


def test_the_target_makes_one_student_step_land_where_two_teacher_steps_land():
    """Salimans and Ho, eq. 8: DDIM from z with x0 = x~ reaches the teacher's two-step end (no clipping: the latent
    models' schedules do not clip)."""
    schedule = Schedule.from_config({**SCHEDULER_CONFIG, "clip_sample": False})
    z = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    t, mid, nxt = step_timesteps(4, torch.tensor([1, 2, 3]))
    target = distillation_target(schedule, toy, z, t, mid, nxt)
    x0, eps = schedule.split(toy(z, t), z, t)
    half = schedule.ddim(z, x0, eps, mid)
    x0, eps = schedule.split(toy(half, mid), half, mid)
    end = schedule.ddim(half, x0, eps, nxt)
    a = schedule.alpha_bar(t).reshape(-1, 1, 1, 1)
    landed = schedule.ddim(z, target, (z.double() - a.sqrt() * target) / (1 - a).sqrt(), nxt)
    torch.testing.assert_close(landed, end, atol=1e-5, rtol=1e-5)
    v = schedule.v_target(z, target, t)  # and v carries x~ back through the v parameterisation
    x0v, _ = Schedule(schedule.alphas_cumprod, schedule.final, "v_prediction").split(v, z, t)
    torch.testing.assert_close(x0v, target, atol=1e-4, rtol=1e-4)


# -- the students' folders ---------------------------------------------------------------------------------------------
def save_pd_student(folder: Path, steps: int) -> Path:
    from bench.recipes.distill import student_scheduler

    torch.manual_seed(0)
    DDPMPipeline(unet=UNet2DModel(**TINY_UNET), scheduler=student_scheduler(SCHEDULER_CONFIG)).save_pretrained(
        folder, safe_serialization=True)
    (folder / STUDENT_FILE).write_text(json.dumps({"method": "progressive-distillation", "steps": [steps],
                                                   "budget": {"steps": 7, "seconds": 1.5}}))
    return folder


def save_cm(folder: Path, card: bool = True) -> Path:
    torch.manual_seed(0)
    ConsistencyModelPipeline(unet=UNet2DModel(**TINY_UNET),
                             scheduler=CMStochasticIterativeScheduler(num_train_timesteps=18)).save_pretrained(
        folder, safe_serialization=True)
    if card:
        (folder / STUDENT_FILE).write_text(json.dumps({"method": "consistency-distillation", "steps": None}))
    return folder


@pytest.fixture(scope="module")
def pd2(tmp_path_factory):
    return save_pd_student(tmp_path_factory.mktemp("pd2"), 2)


@pytest.fixture(scope="module")
def cm(tmp_path_factory):
    return save_cm(tmp_path_factory.mktemp("cm"))


def test_a_student_loads_with_its_card_in_the_digest(pd2, tmp_path):
    model = load_pixel_diffusion(str(pd2))
    assert model.extra["distillation"]["steps"] == [2] and model.kind == "pixel-diffusion"
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    other = save_pd_student(tmp_path / "pd4", 4)
    assert load_pixel_diffusion(str(other)).digest != model.digest  # the same weights, another card


@pytest.mark.parametrize("steps", [1, 2])
def test_consistency_sampling_equals_consistency_model_pipeline(cm, steps):
    from bench.denoiser import CountingDenoiser
    from bench.interfaces import Batch
    from bench.sampling import cpu_noise, generators
    from methods.consistency import Consistency

    model = load_pixel_diffusion(str(cm))
    assert model.kind == "consistency"
    method = Consistency(Consistency.parse_args({}))
    method.check(model, steps)
    seeds = (3, 4)
    ours = method.generate(model, Batch(seeds, steps), CountingDenoiser(model.unet, torch.device("cpu")))
    pipe = ConsistencyModelPipeline.from_pretrained(cm)
    pipe.set_progress_bar_config(disable=True)
    gens = generators(seeds)  # drawn from as our loop draws: the initial noise, then each multistep's noise
    latents = cpu_noise(gens, model.sample_shape)  # the pipeline scales by init_noise_sigma itself
    theirs = pipe(batch_size=2, num_inference_steps=steps, latents=latents, generator=gens,
                  output_type="pt").images  # [0, 1]
    torch.testing.assert_close((ours + 1) / 2, theirs.clamp(0, 1), atol=1e-5, rtol=1e-5)


def test_the_recipes_consistency_function_is_what_the_sampler_denoises_with(cm):
    """Training's f(x, sigma) (bench/recipes/distill.py) equals CMStochasticIterativeScheduler's one-step denoised
    sample: the recipe trains the function the sampler runs."""
    from bench.recipes.distill import consistency_function

    model = load_pixel_diffusion(str(cm))
    sched = CMStochasticIterativeScheduler.from_config(model.scheduler_config)
    sched.set_timesteps(1)
    x = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(0)) * 0.3
    t = sched.timesteps[0]
    out = model.unet(sched.scale_model_input(x, t), t).sample
    denoised = sched.step(out, t, x, generator=torch.Generator().manual_seed(0)).prev_sample  # last step: no noise
    ours = consistency_function(model.unet, sched, x, torch.full((2,), float(sched.sigmas[0])))
    torch.testing.assert_close(ours.clamp(-1, 1), denoised, atol=1e-5, rtol=1e-5)


def test_the_teacher_as_a_sigma_denoiser_hits_its_integer_timesteps():
    from bench.distillation import VPDenoiser

    ac = Schedule.from_config(SCHEDULER_CONFIG).alphas_cumprod
    den = VPDenoiser(None, ac)
    sigmas = ((1 - ac[[0, 10, 500, 999]]) / ac[[0, 10, 500, 999]]).sqrt()
    torch.testing.assert_close(den.t_of(sigmas), torch.tensor([0.0, 10.0, 500.0, 999.0]), atol=1e-3, rtol=0)


# -- bad input: one line, exit 2, before sampling ----------------------------------------------------------------------
Q = ["--num-samples", "8", "--batch-size", "8", "--no-progress", "--metrics", "latency"]


def _refused(argv, capsys, fragment):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and fragment in err[0], err


def test_a_student_asked_for_another_step_count_is_refused(pd2, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused(["run", "--method", "progressive-distillation", "--model", str(pd2), "--steps", "4",
              "--tracking-uri", f"sqlite:///{tmp_path}/m.db", *Q], capsys, "distilled for 2 step(s)")


def test_progressive_distillation_on_a_model_that_is_no_student_is_refused(tiny_model_dir, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused(["run", "--method", "progressive-distillation", "--model", str(tiny_model_dir), "--steps", "2",
              "--tracking-uri", f"sqlite:///{tmp_path}/m.db", *Q], capsys, "no distillation.json")


def test_a_consistency_sampler_on_a_standard_model_is_refused(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused(["run", "--method", "consistency", "--model", str(tiny_model_dir), "--steps", "1",
              "--tracking-uri", f"sqlite:///{tmp_path}/m.db", *Q], capsys, "samples consistency models")


def test_a_solver_on_a_consistency_model_is_refused(cm, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused(["run", "--method", "ddim", "--model", str(cm), "--steps", "2",
              "--tracking-uri", f"sqlite:///{tmp_path}/m.db", *Q], capsys, "--method consistency")


def test_a_student_run_records_its_training_budget_and_evaluations(pd2, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/m.db"
    assert main(["run", "--method", "progressive-distillation", "--model", str(pd2), "--steps", "2",
                 "--tracking-uri", uri, *Q]) == 0
    client = MlflowClient(uri)
    [run] = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    m = run.data.metrics
    assert m["pretrain_steps"] == 7 and m["pretrain_seconds"] == 1.5
    assert m["nfe"] == 2 and m["evaluations_per_sample"] == 2


def test_the_committed_students_load():
    from bench.models import load_model

    for steps in (4, 2, 1):
        model = load_model(f"embedded-pd-{steps}")
        assert model.extra["distillation"]["steps"] == [steps]
    cd = load_model("embedded-cd")
    assert cd.kind == "consistency" and cd.extra["distillation"]["method"] == "consistency-distillation"
