"""``bench embedded train lcm`` and ``lcm-lora``: latent consistency distillation (Luo et al. 2023, Algorithm 1) of
the embedded text-to-image model (embedded-t2i), as a full student with the guidance weight as an input (LCM) and as
a LoRA on the base UNet (LCM-LoRA, Luo et al. 2023b).

What is carried over from the paper and from diffusers' examples/consistency_distillation/train_lcm_distill_sd_wds.py
(LCM) and train_lcm_distill_lora_sd_wds.py (LCM-LoRA) (facts, not code):

- the student: LCM: the teacher's UNet with the w-embedding input (``with_guidance_input``: ``time_cond_proj_dim`` =
  256, ``cond_proj`` zero at step 0, as the LCM script builds its student); LCM-LoRA: the base UNet with a LoRA on the
  script's target modules (attention projections, feed-forward, resnet convolutions, down/up-sampler convolutions,
  time-embedding projections), no w-embedding. The VAE (latents of the pool, once) and the text encoder are frozen;
  no caption is dropped (the scripts' ``proportion_empty_prompts`` 0).
- the skipping-step solver: a DDIM solver on the 50-step grid t = 19, 39, ..., 999 (the scripts' ``DDIMSolver``;
  skipping step k = 1000 / 50 = 20 timesteps, Luo et al.'s k = 20): a training point t_{n+k} is drawn uniformly
  from the grid, the teacher takes one DDIM step from it to t_n = t_{n+k} - 20 (0 for the first point, with
  alpha-bar at 0) with classifier-free guidance at a weight w drawn uniformly from [w_min, w_max] per sample (Ho's
  w: eps = (1 + w) eps_c - w eps_u, the paper's eq. and the scripts' ``cond + w (cond - uncond)``).
- the consistency function f(x, t) = c_skip(t) x + c_out(t) x0(x, t), with LCMScheduler's
  ``get_scalings_for_boundary_condition_discrete`` (sigma_data 0.5, timestep_scaling 10): the scheduler that samples
  the student computes the same boundary conditions.
- the target: f of the target network at (x_{t_n}, t_n): LCM: an EMA of the student (decay 0.95, the paper's and the
  script's ``ema_decay``), with the same w-embedding; LCM-LoRA: the student itself without gradients (the LoRA
  script has no target network).
- the loss: pseudo-Huber sqrt(d^2 + c^2) - c with c = 0.001 (the scripts' ``--loss_type huber --huber_c 0.001``, as
  diffusers' README trains both), averaged over latent elements; AdamW, gradients clipped to norm 1.

What differs, for the budget of a 2-core machine: a few thousand steps instead of tens of thousands, a larger learning
rate with a short warm-up and a cosine decay (bench/recipes/joint.py's ``lr_lambda``); the LoRA rank scaled to this
UNet (the script's 64 for SD's 320-channel first block; 64 x 48 / 320 = 9.6, here 8).

Saved: ``lcm``: a ``LatentConsistencyModelPipeline`` folder (the teacher's VAE, text encoder and tokenizer, the
student UNet, an ``LCMScheduler`` configured from the teacher's schedule with ``original_inference_steps`` = the
solver's 50); ``lcm-lora``: ``pytorch_lora_weights.safetensors`` by ``StableDiffusionPipeline.save_lora_weights``
(diffusers' ``load_lora_weights`` loads it on the base model). Each with ``distillation.json`` (the student's card,
bench.models.read_student) and ``RECIPE.json``.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline
from tqdm.auto import tqdm

from bench.distillation import Schedule, guidance_embedding, with_guidance_input
from bench.embedded.pool import scene_pool
from bench.embedded.t2i import T2I_SEED, WORLD
from bench.embedded.tokenizer import tokenize
from bench.models import EMBEDDED_WEIGHTS, STUDENT_FILE
from bench.recipes.joint import lr_lambda, posterior
from bench.recipes.t2i import _machine

TEACHER = "embedded-t2i"
LORA_FILE = "pytorch_lora_weights.safetensors"
# the LCM-LoRA script's default target modules (all linear and conv layers of SD's UNet that carry weights)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


@dataclass(frozen=True)
class Recipe:
    steps: int = 2000  # about 10 minutes of training loop on 2 cores (measured per-step cost of 10 steps)
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 1e-2  # the LCM script's AdamW default
    warmup_steps: int = 100
    ema_decay: float = 0.95  # the target network (Luo et al., Algorithm 1; the LCM script's --ema_decay)
    w_min: float = 2.0  # Ho's w (s = 1 + w): Luo et al. 2023, 5.1, [w_min, w_max] = [2, 14] (verify)
    w_max: float = 14.0
    solver_steps: int = 50  # the DDIM solver's grid; skipping step k = 1000 / 50 = 20
    timestep_scaling: float = 10.0  # LCMScheduler's boundary conditions (sigma_data 0.5)
    loss: str = "huber"  # or "l2"
    huber_c: float = 0.001
    guidance_dim: int = 256  # time_cond_proj_dim, as the LCM script's student
    seed: int = 0
    threads: int = 2
    data_seed: int = T2I_SEED
    pool_size: int = 20_000
    name: str = "lcm"


@dataclass(frozen=True)
class LoraRecipe(Recipe):
    steps: int = 1650  # about 10 minutes of training loop on 2 cores (measured per-step cost of 10 steps)
    lr: float = 1e-3
    weight_decay: float = 0.0  # diffusers' LCM-LoRA command: --adam_weight_decay 0
    lora_rank: int = 8  # the script's 64 on SD's 320-wide first block, scaled to this UNet's 48 (9.6), rounded down
    lora_alpha: int = 8  # = rank: no scaling (the script's default alpha = rank)
    name: str = "lcm-lora"


def solver_grid(recipe: Recipe, train_steps: int) -> torch.Tensor:
    """The DDIM solver's timesteps, first (least noisy) to last: k - 1, 2k - 1, ..., T - 1 with k = T / N."""
    k = train_steps // recipe.solver_steps
    return torch.arange(1, recipe.solver_steps + 1) * k - 1


def lcm_scheduler(teacher_config: dict[str, Any], recipe: Recipe) -> LCMScheduler:
    """The student's sampler: LCMScheduler on the teacher's training schedule, the solver grid and the boundary
    conditions as trained."""
    return LCMScheduler.from_config(dict(teacher_config), original_inference_steps=recipe.solver_steps,
                                    timestep_scaling=recipe.timestep_scaling)


def consistency(scheduler: LCMScheduler, schedule: Schedule, out: torch.Tensor, x: torch.Tensor,
                t: torch.Tensor) -> torch.Tensor:
    """f(x, t) = c_skip(t) x + c_out(t) x0(x, t): the consistency function LCMScheduler.step computes."""
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t.double())
    x0, _ = schedule.split(out, x, t)
    col = (-1, 1, 1, 1)
    return (c_skip.view(col) * x.double() + c_out.view(col) * x0).float()


def distance(recipe: Recipe, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if recipe.loss == "huber":
        return (torch.sqrt((a - b) ** 2 + recipe.huber_c ** 2) - recipe.huber_c).mean()
    if recipe.loss == "l2":
        return torch.nn.functional.mse_loss(a, b)
    raise ValueError(f"loss {recipe.loss!r}: huber or l2")


def lcd_loss(recipe: Recipe, student, target, teacher, scheduler: LCMScheduler, schedule: Schedule,
             x0: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, gen: torch.Generator,
             w_input: bool) -> torch.Tensor:
    """One latent consistency distillation loss (Luo et al. 2023, Algorithm 1) on clean latents ``x0`` with text
    embeddings ``cond``: t_{n+k} from the solver grid, the teacher's guided DDIM step to t_n, the student's f at
    t_{n+k} against the target's f at t_n. ``w_input``: the student and target take the w-embedding (LCM); else the
    guidance is folded in without it (LCM-LoRA). Draws from ``gen``: the grid index, the noise, w."""
    b = len(x0)
    grid = solver_grid(recipe, schedule.train_steps)
    n = torch.randint(0, recipe.solver_steps, (b,), generator=gen)
    t = grid[n]
    t_prev = (t - schedule.train_steps // recipe.solver_steps).clamp(min=0)
    noise = torch.randn(x0.shape, generator=gen)
    a = schedule.alpha_bar(t).float().view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    w = recipe.w_min + (recipe.w_max - recipe.w_min) * torch.rand(b, generator=gen)
    w_emb = guidance_embedding(w, recipe.guidance_dim) if w_input else None

    pred = consistency(scheduler, schedule, student(x_t, t, encoder_hidden_states=cond, timestep_cond=w_emb).sample,
                       x_t, t)
    with torch.no_grad():
        both = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond])).sample
        eps_u, eps_c = both.chunk(2)
        wc = w.view(-1, 1, 1, 1)
        guided = (1 + wc) * eps_c - wc * eps_u  # Ho's w: the paper's eq. for the augmented PF-ODE
        x0_hat, eps_hat = schedule.split(guided, x_t, t)
        x_prev = schedule.ddim(x_t, x0_hat.float(), eps_hat.float(), t_prev)
        goal = consistency(scheduler, schedule,
                           target(x_prev, t_prev, encoder_hidden_states=cond, timestep_cond=w_emb).sample, x_prev,
                           t_prev)
    return distance(recipe, pred, goal)


@torch.no_grad()
def update_ema(target, student, decay: float) -> None:
    for p_t, p_s in zip(target.parameters(), student.parameters()):
        p_t.mul_(decay).add_(p_s.detach(), alpha=1 - decay)


def train(out_dir: Path, recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    """The ``bench embedded train lcm`` / ``lcm-lora`` entry point (the recipe's class says which)."""
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    out_dir = Path(out_dir)
    lora = isinstance(recipe, LoraRecipe)
    teacher_dir = EMBEDDED_WEIGHTS / "t2i"
    pipe = StableDiffusionPipeline.from_pretrained(teacher_dir, safety_checker=None, requires_safety_checker=False,
                                                   use_safetensors=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval().requires_grad_(False)
    teacher = pipe.unet
    t0 = time.time()
    pool, scenes = scene_pool(recipe.data_seed, recipe.pool_size, WORLD)
    mean, std = posterior(pipe.vae, pool)
    scaling = pipe.vae.config.scaling_factor
    ids = tokenize(pipe.tokenizer, [s.caption for s in scenes])
    with torch.no_grad():
        uncond = pipe.text_encoder(tokenize(pipe.tokenizer, [""]))[0]
    prep_s = time.time() - t0

    schedule = Schedule.from_config(pipe.scheduler.config)
    scheduler = lcm_scheduler(pipe.scheduler.config, recipe)
    if lora:
        from peft import LoraConfig

        student = copy.deepcopy(teacher)
        student.add_adapter(LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha,
                                       target_modules=list(LORA_TARGETS)))  # B = 0: the teacher at step 0
        trained = [p for p in student.parameters() if p.requires_grad]
        target = student  # no target network (the LoRA script): the student itself, without gradients
    else:
        student = with_guidance_input(teacher, recipe.guidance_dim).requires_grad_(True)
        trained = list(student.parameters())
        target = copy.deepcopy(student).requires_grad_(False)
    student.train()
    opt = torch.optim.AdamW(trained, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe.warmup_steps, recipe.steps))
    gen = torch.Generator().manual_seed(recipe.seed)

    losses: list[float] = []
    bar = tqdm(range(recipe.steps), desc=f"train {recipe.name}", disable=not progress)
    t1 = time.time()
    for step in bar:
        idx = torch.randint(0, recipe.pool_size, (recipe.batch_size,), generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        with torch.no_grad():
            cond = pipe.text_encoder(ids[idx])[0]
        loss = lcd_loss(recipe, student, target, teacher, scheduler, schedule, x0, cond,
                        uncond.expand(len(idx), -1, -1), gen, w_input=not lora)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        sched.step()
        if not lora:
            update_ema(target, student, recipe.ema_decay)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.5f}")
    train_s = time.time() - t1
    student.eval().requires_grad_(False)

    out_dir.mkdir(parents=True, exist_ok=True)
    budget = {"steps": recipe.steps, "batch_size": recipe.batch_size, "seconds": round(time.time() - t0, 1)}
    card = {"method": recipe.name, "steps": None, "teacher": TEACHER, "guidance": [recipe.w_min, recipe.w_max],
            "guidance_convention": "Ho's w (CFG eps = (1 + w) eps_c - w eps_u; diffusers' guidance_scale s = 1 + w)",
            "original_inference_steps": recipe.solver_steps, "budget": budget}
    if lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(student))
        StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=state, safe_serialization=True,
                                                  weight_name=LORA_FILE,
                                                  unet_lora_adapter_metadata=student.peft_config["default"].to_dict())
        record_dir = out_dir
        params = {"lora": sum(p.numel() for p in trained), "unet": sum(p.numel() for p in teacher.parameters())}
        card["lora_rank"] = recipe.lora_rank
    else:
        lcm = LatentConsistencyModelPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                             unet=student, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
        lcm.save_pretrained(out_dir, safe_serialization=True)
        shutil.rmtree(out_dir / "tokenizer")  # the teacher's tokenizer files as they are (vocab.json + merges.txt)
        shutil.copytree(teacher_dir / "tokenizer", out_dir / "tokenizer")
        for part in ("vae", "text_encoder"):
            if (teacher_dir / part / "RECIPE.json").exists():
                shutil.copy(teacher_dir / part / "RECIPE.json", out_dir / part / "RECIPE.json")
        record_dir = out_dir / "unet"
        params = {"unet": sum(p.numel() for p in student.parameters())}
    (out_dir / STUDENT_FILE).write_text(json.dumps(card, indent=2) + "\n")
    record = {
        "model": recipe.name,
        "command": f"bench embedded train {recipe.name}",
        "trains": ("a LoRA on embedded-t2i's UNet (no w-embedding; w folded in)" if lora else
                   "embedded-t2i's UNet with a w-embedding input (time_cond_proj_dim)") +
                  " by latent consistency distillation from embedded-t2i with classifier-free guidance; the VAE and "
                  "text encoder frozen (the teacher's)",
        "recipe": asdict(recipe),
        "parameters": params,
        "wall_time_s": budget["seconds"],
        "train_loop_s": round(train_s, 1),
        "prepare_s": round(prep_s, 1),
        "first_loss_mean_10": float(np.mean(losses[:10])),
        "final_loss_mean_last_200": float(np.mean(losses[-200:])),
        "machine": _machine().split(";")[0],
    }
    (record_dir / "RECIPE.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
