"""``bench embedded train flow`` and ``flow-reflow``: the embedded SD3-layout rectified flow and its reflow.

The model and its folder are bench.embedded.flow.

- ``flow`` (``Recipe``): rectified flow / conditional flow matching (Liu et al. 2023; Lipman et al. 2023) as SD3
  trains it (Esser et al. 2024): ``x_t = (1 - t) x0 + t noise``, the transformer regresses the velocity
  ``noise - x0`` (MSE), ``t`` logit-normal (``sigmoid(N(m, s))``, m = 0, s = 1: SD3's ``rf/lognorm(0.00, 1.00)``;
  ``timestep_sampling="uniform"`` is the baseline it beat, Esser et al. Table 1). The transformer and both text
  encoders train jointly on the frozen VAE's latents of the text-to-image model's scenes (seed 6); 10% of
  captions drop to the empty prompt, the pipeline's unconditional branch.
- ``flow-reflow`` (``ReflowRecipe``): Liu et al.'s reflow. The first flow's ODE (Euler, ``ode_steps``, no
  guidance) maps ``pairs`` noises to images, each with its caption (``caption_dropout`` of them with the empty
  prompt); the transformer, initialized from the first flow, then regresses the straight velocity
  ``noise - x0_hat`` along ``x_t = (1 - t) x0_hat + t noise`` with ``t`` uniform (Liu et al.); the text encoders,
  VAE and scheduler are the first flow's.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusion3Pipeline
from tqdm.auto import tqdm

from bench.embedded.flow import MAX_SEQUENCE_LENGTH, build_text_encoders, build_transformer, encode, save_pipeline
from bench.embedded.pool import scene_pool
from bench.embedded.t2i import T2I_SEED, WORLD
from bench.embedded.tokenizer import tokenize
from bench.models import EMBEDDED_WEIGHTS
from bench.recipes.joint import (build_tokenizer, fit, joint_optimizer, lr_lambda, parameters, posterior,
                                 zero_unused_rows)
from bench.recipes.t2i import _machine


@dataclass(frozen=True)
class Recipe:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    text_lr: float = 5e-4
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    timestep_sampling: str = "logit-normal"  # or "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    seed: int = 0
    threads: int = 2
    data_seed: int = T2I_SEED
    pool_size: int = 20_000
    name: str = "flow"


@dataclass(frozen=True)
class ReflowRecipe:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    pairs: int = 8_000
    ode_steps: int = 24  # Liu et al. solve with RK45; Euler 24 keeps the pairs to minutes on 2 cores
    caption_dropout: float = 0.1
    timestep_sampling: str = "uniform"  # Liu et al.
    logit_mean: float = 0.0
    logit_std: float = 1.0
    seed: int = 1
    threads: int = 2
    data_seed: int = T2I_SEED
    name: str = "flow-reflow"
    base: str = "flow"  # the first rectified flow's weights folder


@dataclass(frozen=True)
class UniformRecipe(Recipe):
    """The baseline of Esser et al.'s Table 1 (rectified flow with uniform t), at the same budget and seed."""

    timestep_sampling: str = "uniform"
    name: str = "flow-uniform"


def sample_t(recipe, n: int, gen: torch.Generator) -> torch.Tensor:
    if recipe.timestep_sampling == "logit-normal":
        return torch.sigmoid(recipe.logit_mean + recipe.logit_std * torch.randn(n, generator=gen))
    if recipe.timestep_sampling == "uniform":
        return torch.rand(n, generator=gen)
    raise ValueError(f"timestep_sampling {recipe.timestep_sampling!r}: logit-normal or uniform")


def flow_loss(transformer, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, hidden, pooled) -> torch.Tensor:
    """Velocity MSE at ``x_t = (1 - t) x0 + t noise`` (diffusers' and SD3's convention: timestep = 1000 t)."""
    tt = t.view(-1, 1, 1, 1)
    xt = (1 - tt) * x0 + tt * noise
    v = transformer(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=hidden, pooled_projections=pooled).sample
    return F.mse_loss(v, noise - x0)


def train_flow(out_dir: Path, recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    out_dir = Path(out_dir)
    vae_dir = EMBEDDED_WEIGHTS / "t2i" / "vae"
    vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True).eval().requires_grad_(False)
    t0 = time.time()
    pool, scenes = scene_pool(recipe.data_seed, recipe.pool_size, WORLD)
    mean, std = posterior(vae, pool)
    gen = torch.Generator().manual_seed(recipe.seed)
    probe = mean + std * torch.randn(mean.shape, generator=gen)  # SD3's normalization, from the latents themselves
    shift = float(probe.mean())
    scaling = float(1.0 / (probe - shift).std())
    tokenizer = build_tokenizer(out_dir)
    ids = tokenize(tokenizer, [s.caption for s in scenes])
    empty = tokenize(tokenizer, [""])[0]
    prep_s = time.time() - t0

    text_encoder, text_encoder_2 = build_text_encoders()
    transformer = build_transformer()
    opt, sched = joint_optimizer(transformer, [text_encoder, text_encoder_2], recipe)

    def step_loss() -> torch.Tensor:
        idx = torch.randint(0, recipe.pool_size, (recipe.batch_size,), generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen) - shift) * scaling
        input_ids = ids[idx].clone()
        input_ids[torch.rand(recipe.batch_size, generator=gen) < recipe.caption_dropout] = empty
        hidden, pooled = encode(text_encoder, text_encoder_2, input_ids)
        noise = torch.randn(x0.shape, generator=gen)
        return flow_loss(transformer, x0, noise, sample_t(recipe, recipe.batch_size, gen), hidden, pooled)

    losses, train_s = fit(step_loss, [transformer, text_encoder, text_encoder_2], opt, sched, recipe, progress)
    zero_unused_rows([text_encoder, text_encoder_2], torch.unique(torch.cat([ids.flatten(), empty])))
    vae_out = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True)
    vae_out.register_to_config(shift_factor=round(shift, 5), scaling_factor=round(scaling, 5))
    save_pipeline(out_dir, vae_out, text_encoder.eval(), text_encoder_2.eval(), transformer.eval())
    record = {
        "model": recipe.name,
        "command": f"bench embedded train {recipe.name}",
        "trains": "transformer, text_encoder and text_encoder_2 jointly, on the frozen vae's latents (the vae is "
                  "the embedded text-to-image model's, with SD3's shift and scaling factors measured here)",
        "recipe": asdict(recipe),
        "max_sequence_length": MAX_SEQUENCE_LENGTH,  # the pipeline's argument this model needs (no T5 tokens)
        "vae_shift_factor": round(shift, 5),
        "vae_scaling_factor": round(scaling, 5),
        "parameters": parameters(transformer=transformer, text_encoder=text_encoder, text_encoder_2=text_encoder_2),
        "wall_time_s": round(time.time() - t0, 1),
        "train_loop_s": round(train_s, 1),
        "prepare_s": round(prep_s, 1),
        "final_loss_mean_last_200": float(np.mean(losses[-200:])),
        "machine": _machine().split(";")[0],
    }
    (out_dir / "transformer" / "RECIPE.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


@torch.no_grad()
def ode_pairs(pipe, ids: torch.Tensor, noise: torch.Tensor, steps: int, batch: int = 250,
              progress: bool = True) -> torch.Tensor:
    """x0_hat = the flow's ODE from ``noise`` (Euler, ``steps`` uniform in t from 1 to 0, no guidance), per caption."""
    out = []
    for a in tqdm(range(0, len(ids), batch), desc="reflow pairs", disable=not progress):
        hidden, pooled = encode(pipe.text_encoder, pipe.text_encoder_2, ids[a:a + batch])
        x = noise[a:a + batch].clone()
        ts = torch.linspace(1.0, 0.0, steps + 1)
        for k in range(steps):
            t = ts[k].expand(len(x))
            v = pipe.transformer(hidden_states=x, timestep=t * 1000, encoder_hidden_states=hidden,
                                 pooled_projections=pooled).sample
            x = x + (ts[k + 1] - ts[k]) * v
        out.append(x)
    return torch.cat(out)


def train_reflow(out_dir: Path, recipe: ReflowRecipe = ReflowRecipe(), progress: bool = True) -> dict:
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    out_dir = Path(out_dir)
    base_dir = EMBEDDED_WEIGHTS / recipe.base
    pipe = StableDiffusion3Pipeline.from_pretrained(base_dir, use_safetensors=True, text_encoder_3=None,
                                                    tokenizer_3=None)
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        m.eval().requires_grad_(False)
    t0 = time.time()
    _, scenes = scene_pool(recipe.data_seed, recipe.pairs, WORLD)
    tokenizer = build_tokenizer(out_dir)
    ids = tokenize(tokenizer, [s.caption for s in scenes])
    gen = torch.Generator().manual_seed(recipe.seed)
    ids[torch.rand(recipe.pairs, generator=gen) < recipe.caption_dropout] = tokenize(tokenizer, [""])[0]
    config = pipe.transformer.config
    noise = torch.randn((recipe.pairs, config.in_channels, config.sample_size, config.sample_size), generator=gen)
    x0 = ode_pairs(pipe, ids, noise, recipe.ode_steps, progress=progress)
    pairs_s = time.time() - t0
    with torch.no_grad():
        contexts = [encode(pipe.text_encoder, pipe.text_encoder_2, ids[a:a + 500]) for a in range(0, recipe.pairs, 500)]
    clip_tokens = tokenizer.model_max_length  # the CLIP part; the zero T5 part is re-added per batch
    hidden_all = torch.cat([c[0][:, :clip_tokens] for c in contexts])
    pooled_all = torch.cat([c[1] for c in contexts])

    transformer = pipe.transformer.train().requires_grad_(True)
    opt = torch.optim.AdamW(transformer.parameters(), lr=recipe.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe.warmup_steps, recipe.steps))

    def step_loss() -> torch.Tensor:
        idx = torch.randint(0, recipe.pairs, (recipe.batch_size,), generator=gen)
        clip = hidden_all[idx]
        hidden = torch.cat([clip, clip.new_zeros(len(idx), MAX_SEQUENCE_LENGTH, clip.shape[-1])], dim=1)
        return flow_loss(transformer, x0[idx], noise[idx], sample_t(recipe, recipe.batch_size, gen), hidden,
                         pooled_all[idx])

    losses, train_s = fit(step_loss, [transformer], opt, sched, recipe, progress)
    save_pipeline(out_dir, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, transformer.eval(), pipe.scheduler)
    record = {
        "model": recipe.name,
        "command": f"bench embedded train {recipe.name}",
        "trains": f"the transformer of {recipe.base} (its text encoders, vae and scheduler copied), on pairs its ODE "
                  f"made (reflow, Liu et al. 2023)",
        "recipe": asdict(recipe),
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "wall_time_s": round(time.time() - t0, 1),
        "pairs_s": round(pairs_s, 1),
        "train_loop_s": round(train_s, 1),
        "final_loss_mean_last_200": float(np.mean(losses[-200:])),
        "machine": _machine().split(";")[0],
    }
    (out_dir / "transformer" / "RECIPE.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def train(out_dir: Path, recipe, progress: bool = True) -> dict:
    """The ``bench embedded train flow`` / ``flow-reflow`` entry point (the recipe's class says which)."""
    if isinstance(recipe, ReflowRecipe):
        return train_reflow(out_dir, recipe, progress)
    return train_flow(out_dir, recipe, progress)
