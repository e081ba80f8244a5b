"""Pixel variants of the embedded DDPM for the score-based papers (issue 15), each trained by its recipe on the
shapes world at 16x16 with embedded-ddpm's UNet2DModel and data stream:

- ``bench embedded train ncsn``: a noise-conditional score model of the variance-exploding family (Song and Ermon
  2019; Song et al. 2021's continuous "NCSN++" training): sigma log-uniform in [sigma_min, sigma_max], denoising score
  matching weighted by sigma^2, the UNet with Gaussian Fourier features of log sigma (time_embedding_type="fourier",
  whose forward divides the output by sigma: the output is the score). sigma_max = 50 is about the largest Euclidean
  distance between two training images (NCSNv2's technique 1; Song et al. 2021 take 50 for CIFAR-10 too), sigma_min =
  0.01. Saved as a ScoreSdeVePipeline folder (google/ncsnpp-*'s layout).
- ``bench embedded train iddpm`` and ``iddpm-linear``: Nichol and Dhariwal 2021 (Improved DDPM): learned variances
  (the UNet's 3 extra output channels v, Sigma = exp(v' log beta_t + (1 - v') log beta-tilde_t), v' = (v + 1) / 2) by the
  hybrid loss L_simple + lambda L_vlb (lambda = 0.001, the mean's gradient stopped in L_vlb, the discretized Gaussian
  decoder at t = 0), with the cosine schedule (diffusers' "squaredcos_cap_v2", max beta 0.999) or the linear one, at
  the same budget so that the schedules can be compared. Saved as DDPMPipeline folders with variance_type
  "learned_range" (openai's improved-diffusion checkpoints convert to this layout).
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, ScoreSdeVePipeline, ScoreSdeVeScheduler, UNet2DModel

from bench.embedded.pixel_ddpm import SCHEDULER_CONFIG, TRAIN_SEED, UNET_CONFIG, training_batch
from bench.recipes.joint import fit, lr_lambda

NCSN_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, sigma_min=0.01, sigma_max=50.0, snr=0.16, sampling_eps=1e-5,
                             correct_steps=1)


@dataclass(frozen=True)
class PixelRecipe:
    """What the pixel variants share: embedded-ddpm's data stream and optimizer at batch 64."""

    steps: int = 3000  # about 8 minutes on 2 cores (0.14 to 0.19 s an update at batch 64)
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    seed: int = 0
    threads: int = 2
    data_seed: int = TRAIN_SEED
    resolution: int = 16


@dataclass(frozen=True)
class NcsnRecipe(PixelRecipe):
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    name: str = "ncsn"


@dataclass(frozen=True)
class IddpmRecipe(PixelRecipe):
    beta_schedule: str = "squaredcos_cap_v2"
    vlb_weight: float = 0.001  # lambda of L_hybrid (section 3.1)
    name: str = "iddpm"


@dataclass(frozen=True)
class IddpmLinearRecipe(IddpmRecipe):
    beta_schedule: str = "linear"
    name: str = "iddpm-linear"


def build_ncsn_unet() -> UNet2DModel:
    return UNet2DModel(**{**UNET_CONFIG, "time_embedding_type": "fourier"})


def build_iddpm_unet() -> UNet2DModel:
    return UNet2DModel(**{**UNET_CONFIG, "out_channels": 2 * UNET_CONFIG["in_channels"]})


def iddpm_scheduler(beta_schedule: str) -> DDPMScheduler:
    return DDPMScheduler(**{**SCHEDULER_CONFIG, "beta_schedule": beta_schedule, "variance_type": "learned_range"})


def dsm_loss(unet: UNet2DModel, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Denoising score matching weighted by sigma^2: mean of (sigma s(x0 + sigma z, sigma) + z)^2."""
    s = sigma.view(-1, 1, 1, 1)
    score = unet(x0 + s * noise, sigma).sample
    return ((s * score + noise) ** 2).mean()


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) per dimension of 8-bit data x in [-1, 1] under N(mean, exp(log_scale)^2) integrated over x's bin
    (width 2 / 255; the end bins take the tails): Ho et al.'s decoder L_0."""
    inv = torch.exp(-log_scale)
    upper = torch.special.ndtr(inv * (x - mean + 1.0 / 255))
    lower = torch.special.ndtr(inv * (x - mean - 1.0 / 255))
    return torch.where(x < -0.999, torch.log(upper.clamp(min=1e-12)),
                       torch.where(x > 0.999, torch.log((1.0 - lower).clamp(min=1e-12)),
                                   torch.log((upper - lower).clamp(min=1e-12))))


class VariationalTerms:
    """The per-timestep terms of the variational bound of a DDPMScheduler's schedule (Nichol and Dhariwal 2021,
    section 3.1): the true posterior q(x_{t-1} | x_t, x_0) and the learned-range model variance."""

    def __init__(self, scheduler: DDPMScheduler):
        abar = scheduler.alphas_cumprod.double()
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        betas = scheduler.betas.double()
        self.abar = abar
        self.post_var = betas * (1 - abar_prev) / (1 - abar)
        # beta-tilde is 0 at t = 0: its log takes t = 1's value there (the clipped log variance)
        self.post_logvar = torch.log(torch.cat([self.post_var[1:2], self.post_var[1:]]))
        self.log_beta = torch.log(betas)
        self.coef_x0 = betas * abar_prev.sqrt() / (1 - abar)
        self.coef_xt = (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)

    def _at(self, values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return values[t].float().view(-1, 1, 1, 1)

    def model_logvar(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        frac = (v + 1) / 2
        return frac * self._at(self.log_beta, t) + (1 - frac) * self._at(self.post_logvar, t)

    def bits(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
             v: torch.Tensor) -> torch.Tensor:
        """L_t in bits per dimension for each sample: the KL of the posterior and the model (t > 0), the decoder's
        negative log-likelihood (t = 0)."""
        abar = self._at(self.abar, t)
        x0_pred = (xt - (1 - abar).sqrt() * eps) / abar.sqrt()
        mean = self._at(self.coef_x0, t) * x0_pred + self._at(self.coef_xt, t) * xt
        true_mean = self._at(self.coef_x0, t) * x0 + self._at(self.coef_xt, t) * xt
        logvar = self.model_logvar(v, t)
        kl = _normal_kl(true_mean, self._at(self.post_logvar, t), mean, logvar).flatten(1).mean(1)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).flatten(1).mean(1)
        return torch.where(t == 0, nll, kl) / math.log(2.0)


def hybrid_loss(unet: UNet2DModel, terms: VariationalTerms, scheduler: DDPMScheduler, x0: torch.Tensor,
                t: torch.Tensor, noise: torch.Tensor, vlb_weight: float) -> torch.Tensor:
    """L_hybrid = L_simple + lambda L_vlb, L_vlb = T E_t[L_t] with the mean's gradient stopped (section 3.1)."""
    xt = scheduler.add_noise(x0, noise, t)
    eps, v = unet(xt, t).sample.chunk(2, dim=1)
    simple = F.mse_loss(eps, noise)
    vlb = terms.bits(x0, xt, t, eps.detach(), v).mean() * scheduler.config.num_train_timesteps
    return simple + vlb_weight * vlb


def _machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _record(out_dir: Path, model: str, recipe, unet: UNet2DModel, losses: list[float], wall: float) -> dict:
    record = {"model": model, "command": f"bench embedded train {recipe.name}", "recipe": asdict(recipe),
              "parameters": sum(p.numel() for p in unet.parameters()), "wall_time_s": round(wall, 1),
              "final_loss_mean_last_200": float(np.mean(losses[-200:])), "machine": _machine()}
    (out_dir / "RECIPE.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _optimizer(unet: UNet2DModel, recipe):
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe.warmup_steps, recipe.steps))


def train_ncsn(out_dir: Path, recipe: NcsnRecipe = NcsnRecipe(), progress: bool = True) -> dict:
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    unet = build_ncsn_unet()
    scheduler = ScoreSdeVeScheduler(**{**NCSN_SCHEDULER_CONFIG, "sigma_min": recipe.sigma_min,
                                       "sigma_max": recipe.sigma_max})
    opt, sched = _optimizer(unet, recipe)
    gen = torch.Generator().manual_seed(recipe.seed)
    log_min, log_max = math.log(recipe.sigma_min), math.log(recipe.sigma_max)
    step = iter(range(recipe.steps))

    def step_loss() -> torch.Tensor:
        x0 = training_batch(recipe, next(step))
        sigma = torch.exp(log_min + (log_max - log_min) * torch.rand(len(x0), generator=gen))
        return dsm_loss(unet, x0, sigma, torch.randn(x0.shape, generator=gen))

    losses, wall = fit(step_loss, [unet], opt, sched, recipe, progress=progress)
    out_dir = Path(out_dir)
    ScoreSdeVePipeline(unet=unet, scheduler=scheduler).save_pretrained(out_dir, safe_serialization=True)
    return _record(out_dir, "embedded-ncsn", recipe, unet, losses, wall)


def train_iddpm(out_dir: Path, recipe: IddpmRecipe = IddpmRecipe(), progress: bool = True) -> dict:
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    unet, scheduler = build_iddpm_unet(), iddpm_scheduler(recipe.beta_schedule)
    terms = VariationalTerms(scheduler)
    opt, sched = _optimizer(unet, recipe)
    gen = torch.Generator().manual_seed(recipe.seed)
    step = iter(range(recipe.steps))

    def step_loss() -> torch.Tensor:
        x0 = training_batch(recipe, next(step))
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
        return hybrid_loss(unet, terms, scheduler, x0, t, torch.randn(x0.shape, generator=gen), recipe.vlb_weight)

    losses, wall = fit(step_loss, [unet], opt, sched, recipe, progress=progress)
    out_dir = Path(out_dir)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out_dir, safe_serialization=True)
    return _record(out_dir, f"embedded-{recipe.name}", recipe, unet, losses, wall)


def train(out_dir: Path, recipe, progress: bool = True) -> dict:
    """``bench embedded train ncsn | iddpm | iddpm-linear``."""
    if isinstance(recipe, NcsnRecipe):
        return train_ncsn(out_dir, recipe, progress)
    return train_iddpm(out_dir, recipe, progress)
