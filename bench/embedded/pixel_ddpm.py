"""The embedded pixel DDPM: a diffusers ``UNet2DModel`` trained on the shapes world.

Saved as a ``DDPMPipeline`` folder (``model_index.json``, ``unet/``, ``scheduler/``),
the layout of google/ddpm-cifar10-32, so it loads through the same
``from_pretrained`` code path as the public checkpoint. The scheduler config copies
the one of google/ddpm-cifar10-32 (linear betas 1e-4..0.02, 1000 steps,
epsilon prediction, clipped samples).

The zero-terminal-SNR variant (Lin et al. 2023, "Common Diffusion Noise
Schedules and Sample Steps are Flawed") is the same network trained with the
betas rescaled to zero terminal SNR and v-prediction, so that its claim (very
dark and very bright images become reachable) can be measured on the shapes
world's black and white backgrounds.

Reproduce with ``bench embedded train pixel-ddpm`` or ``bench embedded train
pixel-ddpm-zsnr`` (the recipe and the measured wall time are written to
``RECIPE.json`` beside the weights).
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
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from bench.embedded.shapes import WorldConfig, render_set

TRAIN_SEED = 1  # scenes the model trains on; the reference set uses another seed

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    attention_head_dim=32,
    norm_num_groups=8,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    variance_type="fixed_large",
    clip_sample=True,
    prediction_type="epsilon",
)

# Lin et al. 2023, section 3: rescaled betas (Algorithm 1), v-prediction (section 3.2), trailing spacing (3.3)
ZERO_SNR_SCHEDULER_CONFIG = dict(
    SCHEDULER_CONFIG, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"
)
VARIANTS = {"standard": SCHEDULER_CONFIG, "zero-snr": ZERO_SNR_SCHEDULER_CONFIG}


@dataclass(frozen=True)
class Recipe:
    steps: int = 5000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    seed: int = 0
    threads: int = 2
    data_seed: int = TRAIN_SEED
    resolution: int = 16
    variant: str = "standard"  # or "zero-snr"


@dataclass(frozen=True)
class ZeroSNRRecipe(Recipe):
    """Same budget as the standard model; one thread, so it trains beside other jobs without oversubscription."""

    variant: str = "zero-snr"
    threads: int = 1


def build_unet():
    return UNet2DModel(**UNET_CONFIG)


def input_scaled_alphas_cumprod(alphas_cumprod: torch.Tensor, b: float) -> torch.Tensor:
    """Chen 2023 ("On the Importance of Noise Scheduling for Diffusion Models", arXiv 2301.10972, section 2.2):
    scaling the data by ``b`` in x_t = sqrt(gamma) b x_0 + sqrt(1 - gamma) eps and normalising x_t to unit
    variance (divided by sqrt(b^2 gamma + 1 - gamma)) is the standard process with gamma' = b^2 gamma / (b^2 gamma
    + 1 - gamma): the same eps, log-SNR shifted by 2 log b. float64."""
    g = alphas_cumprod.double()
    return b * b * g / (b * b * g + 1 - g)


def input_scaled_betas(config: dict, b: float) -> list[float]:
    """The betas of ``config``'s schedule with Chen's input scaling ``b``, for a scheduler's ``trained_betas``
    (a standard DDPMPipeline folder that every sampler reads)."""
    g = input_scaled_alphas_cumprod(DDPMScheduler(**config).alphas_cumprod, b)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), g[:-1]])
    return (1 - g / prev).tolist()


def build_scheduler(variant: str = "standard"):
    return DDPMScheduler(**VARIANTS[variant])


def training_batch(recipe, step: int, world: WorldConfig | None = None) -> torch.Tensor:
    """Batch ``step`` of the recipe's training stream: scenes rendered from ``data_seed``, in [-1, 1]."""
    start = step * recipe.batch_size
    world = world or WorldConfig(recipe.resolution)
    images, _ = render_set(recipe.data_seed, range(start, start + recipe.batch_size), world)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def train(out_dir: Path, recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    """Train from ``recipe`` and save a DDPMPipeline folder to ``out_dir``. Returns the recipe record."""
    name = "pixel-ddpm" if recipe.variant == "standard" else "pixel-ddpm-zsnr"
    return fit(out_dir, recipe, build_unet, lambda: build_scheduler(recipe.variant), name, progress=progress)


def fit(out_dir: Path, recipe: Recipe, make_unet, make_scheduler, name: str, world: WorldConfig | None = None,
        progress: bool = True) -> dict:
    """The training loop of every embedded pixel DDPM: epsilon (or v) regression on ``make_scheduler()``'s
    ``add_noise``, AdamW with warm-up and cosine decay, EMA; saves a DDPMPipeline folder and RECIPE.json."""
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    unet, scheduler = make_unet(), make_scheduler()
    ema = EMAModel(unet.parameters(), decay=recipe.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to 10 percent
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        frac = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(recipe.seed)
    t0, losses = time.time(), []
    bar = tqdm(range(recipe.steps), desc=f"train {name}", disable=not progress)
    for step in bar:
        x0 = training_batch(recipe, step, world)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        xt = scheduler.add_noise(x0, noise, t)
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
        loss = torch.nn.functional.mse_loss(unet(xt, t).sample, target)
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
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out_dir, safe_serialization=True)
    record = {
        "model": name,
        "command": f"bench embedded train {name}",
        "recipe": asdict(recipe),
        "parameters": sum(p.numel() for p in unet.parameters()),
        "wall_time_s": round(wall, 1),
        "final_loss_mean_last_200": float(np.mean(losses[-200:])),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    (out_dir / "RECIPE.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":  # pragma: no cover - the CLI is `bench embedded train pixel-ddpm`
    import sys

    train(Path(sys.argv[1]), Recipe(steps=int(sys.argv[2])) if len(sys.argv) > 2 else Recipe())
