"""Few-step students of the embedded pixel DDPM (issue 14): ``bench embedded train progressive-distillation`` and
``bench embedded train consistency-distillation``.

Progressive distillation (Salimans and Ho 2022, Algorithm 2): a chain of students, each initialised from its
teacher and trained so that one of its DDIM steps lands where two of the teacher's land (bench.distillation's
target), halving the steps per round from the teacher's ``teacher_steps`` down to one; the students predict v
(the paper's parameterisation: epsilon fails where alpha is near 0, at the first step from t = T), the first one
from the epsilon teacher's weights. Each round has the same number of updates with the learning rate decaying
linearly to 0 (the paper's schedule per round). The students at 4, 2 and 1 steps are saved as DDPMPipeline folders
whose scheduler is a DDIMScheduler on the trailing grid (the grid the chain was distilled on, exactly), with a
distillation.json saying which step count each was distilled for.

Consistency distillation (Song et al. 2023, Algorithm 2): a consistency function f(x, sigma) = c_skip x + c_out F
with F a UNet2DModel (initialised from the teacher's weights) on EDM's sigma scale and the conditioning of
diffusers' ``CMStochasticIterativeScheduler`` (input x / sqrt(sigma^2 + sigma_data^2), timestep 250 log sigma,
boundary c_skip / c_out at sigma_min); pairs of adjacent sigmas on its Karras grid (N = 18, the paper's CIFAR-10
setting), the teacher's probability-flow ODE solved one step from sigma_{n+1} to sigma_n by Heun's method (the
paper's solver), the squared L2 distance (the paper's L2 metric; LPIPS has no weights here), and the target network
an EMA of the student (mu). The student is saved as a ConsistencyModelPipeline folder (unet/, scheduler/), the
layout of openai/diffusers-cd_imagenet64_l2.

The pixel teacher is epsilon-parameterised on the VP schedule; as a denoiser on the sigma scale (Karras et al.
2022, section 2 and appendix C) D(x, sigma) = x - sigma eps(x / sqrt(1 + sigma^2), t(sigma)), with t(sigma) the
fractional timestep whose sigma_t = sqrt((1 - alpha-bar) / alpha-bar) is sigma (interpolated in log sigma as
k-diffusion's DiscreteEpsDDPMDenoiser does; bench.distillation.VPDenoiser, which the edm sampler uses too).
"""

from __future__ import annotations

import copy
import json
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, DDIMScheduler, DDPMPipeline
from tqdm.auto import tqdm

from bench.distillation import Schedule, VPDenoiser, distillation_target, step_timesteps
from bench.embedded.pixel_ddpm import TRAIN_SEED
from bench.embedded.shapes import WorldConfig, render_set
from bench.models import EMBEDDED_WEIGHTS, STUDENT_FILE, load_pixel_diffusion
from bench.recipes.joint import lr_lambda


@dataclass(frozen=True)
class PDRecipe:
    teacher_steps: int = 64  # the teacher's DDIM steps the chain starts from (the paper: 1024 or 8192)
    steps: int = 500  # updates per round (`bench embedded train ... --steps` sets this)
    batch_size: int = 64
    lr: float = 2e-4
    seed: int = 0
    threads: int = 2
    data_seed: int = TRAIN_SEED
    resolution: int = 16
    save_steps: tuple[int, ...] = (4, 2, 1)  # the students committed (the chain's others are intermediates)
    name: str = "progressive-distillation"


@dataclass(frozen=True)
class CDRecipe:
    steps: int = 2500
    batch_size: int = 64
    lr: float = 1e-4
    warmup_steps: int = 100
    grid: int = 18  # N: the Karras grid of CMStochasticIterativeScheduler (the paper's CIFAR-10 N)
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    mu: float = 0.95  # the target network's EMA decay (the paper's CD setting on ImageNet and LSUN; LCM's too)
    ema_decay: float = 0.999  # the saved student: an EMA of the online network
    seed: int = 0
    threads: int = 2
    data_seed: int = TRAIN_SEED
    resolution: int = 16
    name: str = "consistency-distillation"


def _machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _images(recipe, start: int) -> torch.Tensor:
    images, _ = render_set(recipe.data_seed, range(start, start + recipe.batch_size), WorldConfig(recipe.resolution))
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _teacher():
    return load_pixel_diffusion(str(EMBEDDED_WEIGHTS / "pixel-ddpm"), name="embedded-ddpm", embedded=True)


def student_scheduler(config) -> DDIMScheduler:
    """The students' sampler: DDIM on the trailing grid, v-prediction, the teacher's betas and clipping."""
    return DDIMScheduler.from_config({**config, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
                                      "set_alpha_to_one": True})


def _write_json(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=2) + "\n")


# -- progressive distillation ------------------------------------------------------------------------------------------
def train_progressive(out_dir: Path, recipe: PDRecipe = PDRecipe(), progress: bool = True) -> dict:
    """The chain teacher_steps -> ... -> 1; saves the students of ``save_steps`` to ``out_dir``/steps-N."""
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    teacher_model = _teacher()
    config = dict(teacher_model.scheduler_config)
    teacher = teacher_model.unet.eval()
    teacher_schedule = Schedule.from_config(config)  # epsilon, clipped
    student_schedule = replace(teacher_schedule, prediction_type="v_prediction")
    gen = torch.Generator().manual_seed(recipe.seed)
    out_dir = Path(out_dir)
    rounds, t0, n, data_at = [], time.time(), recipe.teacher_steps // 2, 0
    schedule = teacher_schedule
    while n >= 1:
        student = copy.deepcopy(teacher).train().requires_grad_(True)
        opt = torch.optim.Adam(student.parameters(), lr=recipe.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / recipe.steps)  # linear to 0 per round
        losses, r0 = [], time.time()
        bar = tqdm(range(recipe.steps), desc=f"distill {2 * n} -> {n} steps", disable=not progress)
        for _ in bar:
            x0 = _images(recipe, data_at)
            data_at += recipe.batch_size
            k = torch.randint(1, n + 1, (len(x0),), generator=gen)
            t, t_mid, t_next = step_timesteps(n, k)
            noise = torch.randn(x0.shape, generator=gen)
            a = student_schedule.alpha_bar(t).float().reshape(-1, 1, 1, 1)
            z = a.sqrt() * x0 + (1 - a).sqrt() * noise
            target_x0 = distillation_target(schedule, lambda x, tt: teacher(x, tt).sample, z, t, t_mid, t_next)
            target = student_schedule.v_target(z, target_x0, t)
            loss = torch.nn.functional.mse_loss(student(z, t).sample, target)  # v: SNR + 1 weighting (paper D)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        rounds.append({"steps": n, "updates": recipe.steps, "seconds": round(time.time() - r0, 1),
                       "final_loss_mean_last_50": float(np.mean(losses[-50:]))})
        teacher, schedule = student.eval().requires_grad_(False), student_schedule
        if n in recipe.save_steps:
            folder = out_dir / f"steps-{n}"
            DDPMPipeline(unet=teacher, scheduler=student_scheduler(config)).save_pretrained(
                folder, safe_serialization=True)
            done = len(rounds)
            _write_json(folder / STUDENT_FILE, {
                "method": "progressive-distillation", "steps": [n], "teacher": "embedded-ddpm",
                "teacher_steps": recipe.teacher_steps, "rounds": done, "parameterisation": "v",
                "budget": {"steps": done * recipe.steps, "seconds": round(time.time() - t0, 1)},
                "command": "bench embedded train progressive-distillation"})
        n //= 2
    wall = time.time() - t0
    record = {"model": "progressive-distillation", "command": "bench embedded train progressive-distillation",
              "recipe": asdict(recipe), "rounds": rounds, "parameters": sum(p.numel() for p in teacher.parameters()),
              "wall_time_s": round(wall, 1), "machine": _machine(),
              "saved": [f"steps-{s}" for s in recipe.save_steps]}
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "RECIPE.json", record)
    return record


# -- consistency distillation ------------------------------------------------------------------------------------------
def consistency_function(unet, scheduler: CMStochasticIterativeScheduler, x: torch.Tensor,
                         sigma: torch.Tensor) -> torch.Tensor:
    """f(x, sigma) = c_skip x + c_out F(c_in x, 250 log sigma), the conditioning ConsistencyModelPipeline samples
    with (CMStochasticIterativeScheduler's scale_model_input, sigma_to_t, get_scalings_for_boundary_condition)."""
    sd, smin = scheduler.config.sigma_data, scheduler.config.sigma_min
    s = sigma.reshape(-1, 1, 1, 1).float()
    c_skip = sd**2 / ((s - smin) ** 2 + sd**2)
    c_out = (s - smin) * sd / (s**2 + sd**2) ** 0.5
    t = 1000 * 0.25 * torch.log(sigma.float() + 1e-44)
    return c_skip * x + c_out * unet(x / (s**2 + sd**2) ** 0.5, t).sample


def train_consistency(out_dir: Path, recipe: CDRecipe = CDRecipe(), progress: bool = True) -> dict:
    """Consistency distillation of the pixel DDPM; saves a ConsistencyModelPipeline folder to ``out_dir``."""
    from diffusers.training_utils import EMAModel

    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    teacher_model = _teacher()
    unet = teacher_model.unet.eval()
    teacher = VPDenoiser(lambda x, t: unet(x, t).sample,
                         Schedule.from_config(teacher_model.scheduler_config).alphas_cumprod)
    scheduler = CMStochasticIterativeScheduler(num_train_timesteps=recipe.grid, sigma_min=recipe.sigma_min,
                                               sigma_max=recipe.sigma_max, sigma_data=recipe.sigma_data,
                                               rho=recipe.rho)
    sigmas = scheduler.sigmas.flip(0).float()  # ascending: sigma_1 = sigma_min ... sigma_N = sigma_max
    student = copy.deepcopy(teacher_model.unet).train().requires_grad_(True)
    target = copy.deepcopy(student).eval().requires_grad_(False)
    ema = EMAModel(student.parameters(), decay=recipe.ema_decay, use_ema_warmup=True)
    opt = torch.optim.Adam(student.parameters(), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe.warmup_steps, recipe.steps))
    gen = torch.Generator().manual_seed(recipe.seed)
    losses, t0 = [], time.time()
    bar = tqdm(range(recipe.steps), desc="consistency distillation", disable=not progress)
    for step in bar:
        x0 = _images(recipe, step * recipe.batch_size)
        n = torch.randint(0, recipe.grid - 1, (len(x0),), generator=gen)  # the pair (sigma_n, sigma_{n+1}), 0-based
        s_lo, s_hi = sigmas[n], sigmas[n + 1]
        x_hi = x0 + s_hi.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
        with torch.no_grad():  # one Heun step of the teacher's probability-flow ODE, sigma_{n+1} -> sigma_n
            d = (x_hi - teacher(x_hi, s_hi)) / s_hi.reshape(-1, 1, 1, 1)
            x_euler = x_hi + (s_lo - s_hi).reshape(-1, 1, 1, 1) * d
            d2 = (x_euler - teacher(x_euler, s_lo)) / s_lo.reshape(-1, 1, 1, 1)
            x_lo = x_hi + (s_lo - s_hi).reshape(-1, 1, 1, 1) * (d + d2) / 2
            aim = consistency_function(target, scheduler, x_lo, s_lo)
        loss = torch.nn.functional.mse_loss(consistency_function(student, scheduler, x_hi, s_hi), aim)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():  # the target network: theta^- <- mu theta^- + (1 - mu) theta
            for p_t, p in zip(target.parameters(), student.parameters()):
                p_t.mul_(recipe.mu).add_(p, alpha=1 - recipe.mu)
        ema.step(student.parameters())
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.5f}")
    wall = time.time() - t0
    ema.copy_to(student.parameters())
    out_dir = Path(out_dir)
    ConsistencyModelPipeline(unet=student.eval(), scheduler=scheduler).save_pretrained(out_dir, safe_serialization=True)
    _write_json(out_dir / STUDENT_FILE, {
        "method": "consistency-distillation", "steps": None, "teacher": "embedded-ddpm", "solver": "heun",
        "metric": "l2", "budget": {"steps": recipe.steps, "seconds": round(wall, 1)},
        "command": "bench embedded train consistency-distillation"})
    record = {"model": "consistency-distillation", "command": "bench embedded train consistency-distillation",
              "recipe": asdict(recipe), "parameters": sum(p.numel() for p in student.parameters()),
              "wall_time_s": round(wall, 1), "final_loss_mean_last_200": float(np.mean(losses[-200:])),
              "machine": _machine()}
    _write_json(out_dir / "RECIPE.json", record)
    return record


# `bench embedded train NAME` calls module.train(out, recipe): one entry point, the recipe's type says which
def train(out_dir: Path, recipe, progress: bool = True) -> dict:
    if isinstance(recipe, PDRecipe):
        return train_progressive(out_dir, recipe, progress)
    return train_consistency(out_dir, recipe, progress)
