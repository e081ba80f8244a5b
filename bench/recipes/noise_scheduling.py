"""The 32x32 pixel DDPMs of Chen 2023, "On the Importance of Noise Scheduling for Diffusion Models" (arXiv
2301.10972): ``bench embedded train pixel-ddpm32`` (the default schedule: google/ddpm-cifar10-32's linear betas, as
embedded-ddpm) and ``pixel-ddpm32-shifted`` (the same schedule with the input scaled by b = 0.5, section 2.2).

Both train the same UNet2DModel (embedded-ddpm's with one more down block at the top: widths 16/32/64/64, attention
at 4x4) on the two-object 32x32 world of shapes32 (render_set at resolution 32, the training seed), with the same
budget and loop (bench.embedded.pixel_ddpm.fit). Input scaling with Chen's variance normalisation is exactly a
change of schedule (``input_scaled_betas``), so the shifted model is a plain DDPMPipeline folder whose scheduler has
``trained_betas``: every sampler runs on it unchanged.

Why b = 0.5: Chen's finding 2 is that the optimal schedule gets noisier as the image grows, because neighbouring
pixels are redundant; doubling the side from embedded-ddpm's 16 to 32 averages 4 pixels into what was one, which
raises the SNR of the coarse content by 4, and b = 0.5 (log-SNR shifted by 2 log b = -log 4) takes it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffusers import DDPMScheduler, UNet2DModel

from bench.embedded.pixel_ddpm import SCHEDULER_CONFIG, UNET_CONFIG, Recipe, fit, input_scaled_betas
from bench.embedded.shapes import WorldConfig

UNET_CONFIG32 = dict(
    UNET_CONFIG,
    sample_size=32,
    block_out_channels=(16, 32, 64, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
)

SHIFTED_INPUT_SCALE = 0.5


@dataclass(frozen=True)
class Recipe32(Recipe):
    # `bench embedded train pixel-ddpm32 --steps 20 --out /tmp/x` took 13.7 s on the 2-core machine, so 800 updates
    # fit the ~10 minutes each model may take (the measured wall time of each: RECIPE.json beside its weights)
    steps: int = 800
    warmup_steps: int = 100
    ema_decay: float = 0.995  # a short run: an EMA that forgets the first updates
    resolution: int = 32
    max_objects: int = 2  # the world of shapes32, the reference set these models are measured against
    input_scale: float = 1.0  # Chen's b; 1: the default schedule
    name: str = "pixel-ddpm32"


@dataclass(frozen=True)
class ShiftedRecipe32(Recipe32):
    input_scale: float = SHIFTED_INPUT_SCALE
    name: str = "pixel-ddpm32-shifted"


def build_unet32() -> UNet2DModel:
    return UNet2DModel(**UNET_CONFIG32)


def build_scheduler32(input_scale: float = 1.0) -> DDPMScheduler:
    if input_scale == 1.0:
        return DDPMScheduler(**SCHEDULER_CONFIG)
    return DDPMScheduler(**{**SCHEDULER_CONFIG, "trained_betas": input_scaled_betas(SCHEDULER_CONFIG, input_scale)})


def train(out_dir: Path, recipe: Recipe32 = Recipe32(), progress: bool = True) -> dict:
    world = WorldConfig(resolution=recipe.resolution, max_objects=recipe.max_objects, split="train")
    return fit(out_dir, recipe, build_unet32, lambda: build_scheduler32(recipe.input_scale), recipe.name, world,
               progress=progress)
