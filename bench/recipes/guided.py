"""``bench embedded train guided-distillation`` and ``guided-distillation-4``: Meng et al. 2023, "On Distillation of
Guided Diffusion Models" (CVPR 2023), on the embedded text-to-image model (latent space, as the paper's latent
experiments).

- ``guided-distillation`` (``Recipe``, stage one): a student that takes the guidance weight w as an input (the
  teacher's UNet with ``time_cond_proj_dim`` = 256, diffusers' w-embedding: ``bench.distillation.with_guidance_input``,
  initialised from the teacher with the new projection zero) learns the teacher's classifier-free-guided prediction
  in one forward pass: ``eps^w = (1 + w) eps_c - w eps_u`` (the paper's x^w = (1 + w) x_c - w x_u, eq. 5, in epsilon
  form: the same x at a given z_t). The loss is the epsilon-space MSE, which is the paper's x-space loss with the
  weight omega(lambda_t) = SNR(t) = alpha_t^2 / sigma_t^2 (x - x' = (sigma_t / alpha_t)(eps - eps')), Ho et al.'s
  L_simple. w ~ U[w_min, w_max] per sample, t uniform over the 1000 training timesteps, z_t from the frozen VAE's
  latents of the teacher's training scenes, the captions through the frozen text encoder (the unconditional
  branch: the empty prompt, as the teacher was trained with 10% dropout to it).
- ``guided-distillation-4`` (``ProgressiveRecipe``, stage two): progressive distillation (Salimans and Ho 2022,
  Algorithm 2, ``bench.distillation.distillation_target``) of the stage-one student, w given to both teacher and
  student, rounds halving the steps on the nested trailing grid (32 -> 16 -> 8 -> 4). The students are in
  v-prediction (the paper's parameterisation; the first round's teacher is the stage-one epsilon student), trained
  on ``Schedule.v_target`` of the two-teacher-step target with an MSE in v, which is the x-space loss with
  Salimans and Ho's "SNR + 1" weight. Each round's student starts from its teacher's weights, with a fresh
  optimizer and EMA. The 4-step student samples through ``DDIMScheduler(timestep_spacing="trailing",
  prediction_type="v_prediction")`` exactly (its folder's scheduler config).

Both save a StableDiffusionPipeline folder (the teacher's VAE, text encoder and tokenizer files copied byte for
byte, the student's UNet) with ``distillation.json`` (bench.models.read_student) beside model_index.json and the
recipe record in unet/RECIPE.json.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from bench.distillation import (Schedule, check_grid_matches_ddim, distillation_target, guidance_embedding, step_timesteps,
                                uniform_steps, with_guidance_input)
from bench.embedded.pool import scene_pool
from bench.embedded.t2i import T2I_SEED, WORLD
from bench.embedded.tokenizer import tokenize
from bench.models import EMBEDDED_WEIGHTS, STUDENT_FILE
from bench.recipes.joint import fit, lr_lambda, posterior
from bench.recipes.t2i import _machine

METHOD = "guided-distillation"  # the adapter that samples both students (methods/guided_distillation.py)
TEACHER = "embedded-t2i"
W_DIM = 256  # time_cond_proj_dim: the w-embedding's width (diffusers' LCM and guided-distillation UNets)


@dataclass(frozen=True)
class Recipe:
    steps: int = 2500  # sized to about 10 minutes on the 2-core machine (0.26 s a step: unet/RECIPE.json)
    batch_size: int = 64
    lr: float = 2e-4
    warmup_steps: int = 50
    ema_decay: float = 0.999
    w_min: float = 0.0
    w_max: float = 8.0  # the paper's pixel range is [0, 4]; 8 keeps the claims' s = 2, 4, 8 (w = 1, 3, 7) inside
    seed: int = 0
    threads: int = 2
    data_seed: int = T2I_SEED
    pool_size: int = 20_000
    teacher: str = "t2i"  # weights folder of the teacher (embedded-t2i)
    name: str = "guided-distillation"


@dataclass(frozen=True)
class ProgressiveRecipe:
    steps: int = 1750  # about 8 minutes (0.27 s a step: unet/RECIPE.json), over all rounds: the first round (the switch to v-prediction) gets ``first_round_share``
    first_round_share: float = 0.4
    batch_size: int = 64
    lr: float = 1e-4
    warmup_steps: int = 20
    ema_decay: float = 0.995
    start_steps: int = 32  # the stage-one student's DDIM steps the first round distills
    final_steps: int = 4
    w_min: float = 0.0
    w_max: float = 8.0
    seed: int = 1
    threads: int = 2
    data_seed: int = T2I_SEED
    pool_size: int = 20_000
    base: str = "guided-distillation"  # the stage-one student's weights folder
    name: str = "guided-distillation-4"

    def rounds(self) -> list[tuple[int, int]]:
        """(student steps, training steps) of each round: start/2, start/4, ... final."""
        sizes = []
        n = self.start_steps // 2
        while n >= self.final_steps:
            sizes.append(n)
            n //= 2
        if not sizes or sizes[-1] != self.final_steps:
            raise ValueError(f"start_steps {self.start_steps} does not halve to final_steps {self.final_steps}")
        first = int(round(self.steps * self.first_round_share)) if len(sizes) > 1 else self.steps
        rest = self.steps - first
        others = [rest // (len(sizes) - 1) + (1 if i < rest % (len(sizes) - 1) else 0)
                  for i in range(len(sizes) - 1)] if len(sizes) > 1 else []
        return list(zip(sizes, [first, *others]))


# -- the data both stages draw z_t from -----------------------------------------------------------------------------
@dataclass
class Data:
    mean: torch.Tensor  # the frozen VAE's posterior of every pool image
    std: torch.Tensor
    scaling: float
    hidden: torch.Tensor  # text embeddings of the distinct captions
    caption: torch.Tensor  # pool index -> row of ``hidden``
    empty: torch.Tensor  # [1, L, D]: the unconditional branch (the empty prompt)

    def batch(self, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 latents, caption embeddings) of ``size`` pool images drawn with ``gen``."""
        idx = torch.randint(0, len(self.mean), (size,), generator=gen)
        x0 = (self.mean[idx] + self.std[idx] * torch.randn(self.mean[idx].shape, generator=gen)) * self.scaling
        return x0, self.hidden[self.caption[idx]]


@torch.no_grad()
def load_data(pipe: StableDiffusionPipeline, recipe) -> Data:
    pool, scenes = scene_pool(recipe.data_seed, recipe.pool_size, WORLD)
    mean, std = posterior(pipe.vae, pool)
    ids = tokenize(pipe.tokenizer, [s.caption for s in scenes])
    distinct, caption = torch.unique(ids, dim=0, return_inverse=True)
    hidden = torch.cat([pipe.text_encoder(distinct[a:a + 500])[0] for a in range(0, len(distinct), 500)])
    empty = pipe.text_encoder(tokenize(pipe.tokenizer, [""]))[0]
    return Data(mean, std, float(pipe.vae.config.scaling_factor), hidden, caption, empty)


def draw_w(recipe, size: int, gen: torch.Generator) -> torch.Tensor:
    return recipe.w_min + (recipe.w_max - recipe.w_min) * torch.rand(size, generator=gen)


def frozen_pipeline(folder: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                   use_safetensors=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval().requires_grad_(False)
    return pipe


# -- stage one: the guided prediction in one forward pass ------------------------------------------------------------------
def guided_target(teacher, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                  w: torch.Tensor) -> torch.Tensor:
    """The teacher's classifier-free-guided epsilon (1 + w) eps_c - w eps_u, both branches in one batched call."""
    with torch.no_grad():
        eps = teacher(torch.cat([z, z]), torch.cat([t, t]),
                      encoder_hidden_states=torch.cat([uncond.expand_as(cond), cond])).sample
        eps_u, eps_c = eps.chunk(2)
    w = w.view(-1, 1, 1, 1)
    return (1 + w) * eps_c - w * eps_u


def stage_one_loss(student, teacher, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                   w: torch.Tensor) -> torch.Tensor:
    """Meng et al. 2023, stage one: || eps_student(z_t, c, w) - eps^w_teacher(z_t, c) ||^2 (the x-space loss with
    weight SNR(t)). At initialisation (``cond_proj`` zero) the student is the teacher's conditional branch: zero
    loss at w = 0."""
    target = guided_target(teacher, z, t, cond, uncond, w)
    out = student(z, t, encoder_hidden_states=cond, timestep_cond=guidance_embedding(w, W_DIM).to(z.dtype)).sample
    return F.mse_loss(out.float(), target.float())


def train_stage_one(out_dir: Path, recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    out_dir = Path(out_dir)
    teacher_dir = EMBEDDED_WEIGHTS / recipe.teacher
    t0 = time.time()
    pipe = frozen_pipeline(teacher_dir)
    data = load_data(pipe, recipe)
    alphas_cumprod = Schedule.from_config(pipe.scheduler.config).alphas_cumprod.float()
    prep_s = time.time() - t0

    teacher = pipe.unet
    student = with_guidance_input(teacher, W_DIM).train()
    opt = torch.optim.AdamW(student.parameters(), lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe.warmup_steps, recipe.steps))
    gen = torch.Generator().manual_seed(recipe.seed)

    def step_loss() -> torch.Tensor:
        x0, cond = data.batch(recipe.batch_size, gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, len(alphas_cumprod), (recipe.batch_size,), generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        z = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return stage_one_loss(student, teacher, z, t, cond, data.empty, draw_w(recipe, recipe.batch_size, gen))

    losses, train_s = fit(step_loss, [student], opt, sched, recipe, progress)
    wall = time.time() - t0
    record = _record(recipe, losses, train_s, prep_s, wall, student,
                     trains=f"the UNet of {TEACHER} with a w input (time_cond_proj_dim {W_DIM}, cond_proj zero at "
                            f"step 0) on the teacher's CFG epsilon (1 + w) eps_c - w eps_u, w ~ U[{recipe.w_min:g}, "
                            f"{recipe.w_max:g}]; VAE and text encoder frozen (copied)")
    card = {"method": METHOD, "steps": None, "teacher": TEACHER, "guidance": [recipe.w_min, recipe.w_max],
            "stage": 1, "loss": "epsilon-space MSE (the paper's x-space loss with weight SNR(t))",
            "budget": {"steps": recipe.steps, "batch_size": recipe.batch_size, "seconds": round(wall, 1)}}
    save_student(out_dir, teacher_dir, student.eval(), None, card, record)
    return record


# -- stage two: progressive distillation with w -----------------------------------------------------------------------------
def progressive_loss(student, teacher: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: Schedule,
                     x0: torch.Tensor, noise: torch.Tensor, n: int, k: torch.Tensor, context: dict,
                     teacher_prediction: str) -> torch.Tensor:
    """Salimans and Ho 2022, Algorithm 2 for an ``n``-step student at its steps ``k``: z_t from data, the x~ of two
    teacher DDIM steps, the student's v against v(z_t, x~)."""
    t, t_mid, t_next = step_timesteps(n, k, schedule.train_steps)
    a = schedule.alpha_bar(t).float().view(-1, 1, 1, 1)
    z = a.sqrt() * x0 + (1 - a).sqrt() * noise
    x_target = distillation_target(schedule, teacher, z, t, t_mid, t_next, teacher_prediction)
    v_target = schedule.v_target(z, x_target, t)
    v = student(z, t, **context).sample
    return F.mse_loss(v.float(), v_target.float())


def v_scheduler_config(config) -> dict:
    """The 4-step student's sampler: DDIM on the trailing grid in v-prediction, the teacher's betas and end."""
    ddim = {k: v for k, v in DDIMScheduler.from_config(dict(config)).config.items() if not k.startswith("_")}
    return {**ddim, "timestep_spacing": "trailing", "prediction_type": "v_prediction", "clip_sample": False}


def train_stage_two(out_dir: Path, recipe: ProgressiveRecipe = ProgressiveRecipe(), progress: bool = True) -> dict:
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    out_dir = Path(out_dir)
    base_dir = EMBEDDED_WEIGHTS / recipe.base
    if not check_grid_matches_ddim(recipe.final_steps):
        raise ValueError(f"{recipe.final_steps} steps do not fall on DDIMScheduler's trailing grid")
    base_card = json.loads((base_dir / STUDENT_FILE).read_text())
    t0 = time.time()
    pipe = frozen_pipeline(base_dir)
    data = load_data(pipe, recipe)
    schedule = Schedule.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    prep_s = time.time() - t0
    gen = torch.Generator().manual_seed(recipe.seed)

    teacher, teacher_prediction = pipe.unet, "epsilon"  # round one: the stage-one student (epsilon)
    losses: list[float] = []
    rounds = []
    for n, steps in recipe.rounds():
        student = UNet2DConditionModel.from_config(teacher.config)
        student.load_state_dict(teacher.state_dict())
        student.train().requires_grad_(True)
        opt = torch.optim.AdamW(student.parameters(), lr=recipe.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe.warmup_steps, steps))

        def step_loss(student=student, teacher=teacher, n=n, teacher_prediction=teacher_prediction) -> torch.Tensor:
            x0, cond = data.batch(recipe.batch_size, gen)
            noise = torch.randn(x0.shape, generator=gen)
            k = uniform_steps(recipe.batch_size, n, gen)
            context = {"encoder_hidden_states": cond,
                       "timestep_cond": guidance_embedding(draw_w(recipe, recipe.batch_size, gen), W_DIM)}

            def teacher_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return teacher(x.float(), t, **context).sample

            return progressive_loss(student, teacher_fn, schedule, x0, noise, n, k, context, teacher_prediction)

        spec = SimpleNamespace(steps=steps, ema_decay=recipe.ema_decay, name=f"{recipe.name} {2 * n}->{n}")
        round_losses, round_s = fit(step_loss, [student], opt, sched, spec, progress)
        losses += round_losses
        rounds.append({"teacher_steps": 2 * n, "student_steps": n, "train_steps": steps, "seconds": round(round_s, 1),
                       "final_loss_mean_last_50": float(np.mean(round_losses[-50:]))})
        teacher, teacher_prediction = student.eval().requires_grad_(False), "v_prediction"
    wall = time.time() - t0
    record = _record(recipe, losses, sum(r["seconds"] for r in rounds), prep_s, wall, teacher,
                     trains=f"progressive distillation (Salimans and Ho 2022, Algorithm 2) of {recipe.base} with w "
                            f"given to teacher and student, {recipe.start_steps} -> {recipe.final_steps} steps on the "
                            f"trailing grid, v-prediction; VAE and text encoder frozen (copied)")
    record["rounds"] = rounds
    base_budget = base_card.get("budget", {})
    card = {"method": METHOD, "steps": [recipe.final_steps], "teacher": TEACHER, "base": recipe.base,
            "guidance": [recipe.w_min, recipe.w_max], "stage": 2, "prediction_type": "v_prediction",
            "rounds": [[r["teacher_steps"], r["student_steps"]] for r in rounds],
            # the 4-step student's whole cost: stage one's budget plus this stage's
            "budget": {"steps": recipe.steps + int(base_budget.get("steps", 0)), "batch_size": recipe.batch_size,
                       "seconds": round(wall + float(base_budget.get("seconds", 0.0)), 1)},
            "stage_budget": {"steps": recipe.steps, "seconds": round(wall, 1)}}
    scheduler = DDIMScheduler.from_config(v_scheduler_config(pipe.scheduler.config))
    save_student(out_dir, base_dir, teacher, scheduler, card, record)
    return record


# -- the folders -----------------------------------------------------------------------------------------------------------
def _record(recipe, losses, train_s, prep_s, wall, unet, trains: str) -> dict:
    return {
        "model": recipe.name,
        "command": f"bench embedded train {recipe.name}",
        "paper": "Meng et al. 2023, On Distillation of Guided Diffusion Models (CVPR 2023)",
        "trains": trains,
        "recipe": asdict(recipe),
        "parameters": {"unet": sum(p.numel() for p in unet.parameters())},
        "wall_time_s": round(wall, 1),
        "train_loop_s": round(train_s, 1),
        "prepare_s": round(prep_s, 1),
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "machine": _machine().split(";")[0],
    }


def save_student(out_dir: Path, source_dir: Path, unet, scheduler, card: dict, record: dict) -> Path:
    """``source_dir``'s pipeline folder with the student's UNet (and ``scheduler``, if given): the VAE, text encoder
    and tokenizer files copied byte for byte; ``distillation.json`` and unet/RECIPE.json written."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(source_dir, out_dir, ignore=shutil.ignore_patterns("unet", "scheduler", STUDENT_FILE))
    unet.save_pretrained(out_dir / "unet", safe_serialization=True)
    if scheduler is None:
        shutil.copytree(source_dir / "scheduler", out_dir / "scheduler")
    else:
        scheduler.save_pretrained(out_dir / "scheduler")
        index = json.loads((out_dir / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", type(scheduler).__name__]
        (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / STUDENT_FILE).write_text(json.dumps(card, indent=2) + "\n")
    (out_dir / "unet" / "RECIPE.json").write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def train(out_dir: Path, recipe, progress: bool = True) -> dict:
    """The ``bench embedded train guided-distillation`` / ``guided-distillation-4`` entry point."""
    if isinstance(recipe, ProgressiveRecipe):
        return train_stage_two(out_dir, recipe, progress)
    return train_stage_one(out_dir, recipe, progress)
