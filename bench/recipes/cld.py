"""``bench embedded train cld``: the embedded critically-damped Langevin diffusion (Dockhorn et al. 2022) at 16x16.

The network is embedded-ddpm's UNet2DModel (widths 32/64/64, attention at 4x4) with 6 input channels, u = (x, v), and
6 output channels: eps in gDDIM's parameterization u_t = mean_t(x0) + R_t eps (Zhang et al. 2023; qsh-zh/gDDIM
predicts both components, the score being -R_t^{-T} eps; CLD's own network predicts the v-score alone, which is
what the probability-flow ODE uses, but a v-only output does not give the eps that gDDIM's exponential integrator
holds constant over a step). Its timestep input is 999 t for t in [0, 1], as embedded-ddpm's.

The loss is hybrid score matching (Dockhorn et al., section 3.2): the kernel p(u_t | x0) with the initial velocity
marginalized (v0 ~ N(0, gamma M) is in Sigma_0), t uniform in [t_min, T], eps-prediction MSE over both components
(the score's weighting by R_t^T R_t, the analogue of DDPM's L_simple). The data: embedded-ddpm's scenes (seed 1).
No public diffusers format exists for CLD (no scheduler or pipeline for an (x, v) state): the folder holds the
UNet2DModel as diffusers saves it (``unet/``) and the SDE's constants in ``cld.json`` (bench/cld.py).
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from bench.cld import CLD
from bench.embedded.pixel_ddpm import TRAIN_SEED, UNET_CONFIG
from bench.embedded.shapes import WorldConfig, render_set

CLD_UNET_CONFIG = dict(UNET_CONFIG, in_channels=6, out_channels=6)
TIMESTEP_SCALE = 999.0  # the UNet's timestep input for continuous t (embedded-ddpm's t * 999)


@dataclass(frozen=True)
class Recipe:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.999
    seed: int = 0
    threads: int = 2
    data_seed: int = TRAIN_SEED
    resolution: int = 16


def build_unet(config: dict = CLD_UNET_CONFIG) -> UNet2DModel:
    return UNet2DModel(**config)


def perturb(cld: CLD, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """u_t = psi(0, t) (x0, 0) + R_t eps, per sample (t: [B]), as [x; v] channels."""
    ts = t.double().numpy()
    psi = torch.from_numpy(np.stack([cld.psi(0.0, float(s)) for s in ts])).to(x0)  # [B, 2, 2]
    r = torch.from_numpy(cld.R(ts)).to(x0)
    col = lambda m, i, j: m[:, i, j].view(-1, 1, 1, 1)  # noqa: E731
    ex, ev = eps.chunk(2, dim=1)
    x = col(psi, 0, 0) * x0 + col(r, 0, 0) * ex + col(r, 0, 1) * ev
    v = col(psi, 1, 0) * x0 + col(r, 1, 0) * ex + col(r, 1, 1) * ev
    return torch.cat([x, v], dim=1)


def hsm_loss(unet, cld: CLD, x0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Hybrid score matching in gDDIM's eps form: || eps - eps_theta(mean_t(x0) + R_t eps, t) ||^2."""
    eps = torch.randn((x0.shape[0], 2 * x0.shape[1], *x0.shape[2:]), generator=gen)
    t = cld.t_min + (cld.T - cld.t_min) * torch.rand(x0.shape[0], generator=gen, dtype=torch.float64)
    u = perturb(cld, x0, t, eps)
    return torch.nn.functional.mse_loss(unet(u, (t * TIMESTEP_SCALE).float()).sample, eps)


def _batch(recipe: Recipe, step: int) -> torch.Tensor:
    start = step * recipe.batch_size
    images, _ = render_set(recipe.data_seed, range(start, start + recipe.batch_size), WorldConfig(recipe.resolution))
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train(out_dir: Path, recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    """Train with hybrid score matching; save ``unet/`` (diffusers) and ``cld.json`` to ``out_dir``."""
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    cld = CLD()
    unet = build_unet()
    ema = EMAModel(unet.parameters(), decay=recipe.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:  # embedded-ddpm's: linear warm-up, then cosine to 10 percent
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        frac = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(recipe.seed)
    t0, losses = time.time(), []
    bar = tqdm(range(recipe.steps), desc="train cld", disable=not progress)
    for step in bar:
        loss = hsm_loss(unet, cld, _batch(recipe, step), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    wall = time.time() - t0
    ema.copy_to(unet.parameters())
    out_dir = Path(out_dir)
    unet.save_pretrained(out_dir / "unet", safe_serialization=True)
    cld.save(out_dir)
    record = {
        "model": "cld",
        "command": "bench embedded train cld",
        "trains": "a UNet2DModel on u = (x, v) (6 channels in, eps of both components out) with hybrid score "
                  "matching on the CLD kernel (bench/recipes/cld.py, bench/cld.py)",
        "recipe": asdict(recipe),
        "sde": cld.to_dict(),
        "parameters": sum(p.numel() for p in unet.parameters()),
        "wall_time_s": round(wall, 1),
        "final_loss_mean_last_200": float(np.mean(losses[-200:])),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; run alone "
                   f"under the machine's lock",
    }
    (out_dir / "RECIPE.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
