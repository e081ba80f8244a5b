"""``bench embedded train sdxl``: the embedded SDXL model with SDXL's micro-conditioning (Podell et al. 2023, 2.2).

The model and its folder are bench.embedded.sdxl. The training set is a fixed pool of the 32x32 shapes scenes the
text-to-image model trains on (seed 6), each assigned once, from the recipe's seed, one of three kinds:

- plain (``plain_fraction``): the 32x32 render; original size (32, 32), crop (0, 0);
- small original (``size_fraction``): the render area-down-sampled to s in ``ORIGINAL_SIZES`` and bilinearly
  up-sampled back to 32 (SDXL's "upscaled small images", blurry); original size (s, s), crop (0, 0);
- random crop (the rest): the scene rendered at 48x48 and a 32x32 window at (top, left), each uniform in
  [0, 16]; original size (48, 48), crop (top, left). An object across the window's edge is cut off.

Target size is (32, 32) throughout. The UNet and both text encoders train jointly on the frozen VAE's latents
(the embedded text-to-image model's reasons, bench/embedded/t2i.py); 10% of captions drop to zero text
embeddings, the unconditional branch of the pipeline's classifier-free guidance.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler

from bench.embedded.pool import scene_pool
from bench.embedded.sdxl import (CROP_RESOLUTION, ORIGINAL_SIZES, build_text_encoders, build_unet, encode,
                                 save_pipeline)
from bench.embedded.shapes import WorldConfig, render_set
from bench.embedded.t2i import SD15_SCHEDULER_CONFIG, T2I_SEED, WORLD
from bench.embedded.tokenizer import tokenize
from bench.finetune import prediction_target
from bench.models import EMBEDDED_WEIGHTS
from bench.recipes.joint import build_tokenizer, fit, joint_optimizer, parameters, posterior, zero_unused_rows
from bench.recipes.t2i import _machine


@dataclass(frozen=True)
class Recipe:
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    text_lr: float = 5e-4
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    plain_fraction: float = 0.4
    size_fraction: float = 0.3  # the rest: random crops
    seed: int = 0
    threads: int = 2
    data_seed: int = T2I_SEED
    pool_size: int = 20_000
    name: str = "sdxl"


def micro_pool(recipe: Recipe) -> dict:
    """The augmented training pool: uint8 images [N, 32, 32, 3], captions, and the six add_time_ids per image."""
    images, scenes = scene_pool(recipe.data_seed, recipe.pool_size, WORLD)
    images = images.copy()
    rng = np.random.default_rng([recipe.seed, 1])
    u = rng.random(recipe.pool_size)
    kind = np.where(u < recipe.plain_fraction, 0, np.where(u < recipe.plain_fraction + recipe.size_fraction, 1, 2))
    side = WORLD.resolution
    original = np.full((recipe.pool_size, 2), side, dtype=np.int64)
    crop = np.zeros((recipe.pool_size, 2), dtype=np.int64)
    small = np.flatnonzero(kind == 1)
    sizes = rng.choice(ORIGINAL_SIZES, size=len(small))
    for s in ORIGINAL_SIZES:
        idx = small[sizes == s]
        x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float()
        x = F.interpolate(F.interpolate(x, size=(s, s), mode="area"), size=(side, side), mode="bilinear",
                          align_corners=False)
        images[idx] = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        original[idx] = s
    cropped = np.flatnonzero(kind == 2)
    big, _ = render_set(recipe.data_seed, cropped.tolist(), WorldConfig(CROP_RESOLUTION, WORLD.max_objects, WORLD.split))
    offsets = rng.integers(0, CROP_RESOLUTION - side + 1, size=(len(cropped), 2))
    for j, (i, (top, left)) in enumerate(zip(cropped, offsets)):
        images[i] = big[j, top:top + side, left:left + side]
    original[cropped] = CROP_RESOLUTION
    crop[cropped] = offsets
    time_ids = np.concatenate([original, crop, np.full((recipe.pool_size, 2), side)], axis=1)
    return {"images": images, "captions": [s.caption for s in scenes], "time_ids": time_ids, "kind": kind}


def train(out_dir: Path, recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    """Train the SDXL-layout UNet and its two text encoders; save the StableDiffusionXLPipeline folder."""
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    out_dir = Path(out_dir)
    vae_dir = EMBEDDED_WEIGHTS / "t2i" / "vae"
    vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True).eval().requires_grad_(False)
    t0 = time.time()
    data = micro_pool(recipe)
    mean, std = posterior(vae, data["images"])
    scaling = vae.config.scaling_factor
    tokenizer = build_tokenizer(out_dir)
    ids = tokenize(tokenizer, data["captions"])
    time_ids = torch.from_numpy(data["time_ids"]).float()
    prep_s = time.time() - t0

    text_encoder, text_encoder_2 = build_text_encoders()
    unet = build_unet()
    noise_scheduler = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)  # the training schedule (same betas)
    opt, sched = joint_optimizer(unet, [text_encoder, text_encoder_2], recipe)
    gen = torch.Generator().manual_seed(recipe.seed)

    def step_loss() -> torch.Tensor:
        idx = torch.randint(0, recipe.pool_size, (recipe.batch_size,), generator=gen)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        hidden, pooled = encode(text_encoder, text_encoder_2, ids[idx])
        keep = (torch.rand(recipe.batch_size, generator=gen) >= recipe.caption_dropout).float()
        hidden, pooled = hidden * keep[:, None, None], pooled * keep[:, None]  # force_zeros_for_empty_prompt
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (recipe.batch_size,), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        prediction = unet(noisy, t, encoder_hidden_states=hidden,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids[idx]}).sample
        return F.mse_loss(prediction, prediction_target(noise_scheduler, latents, noise, t))

    losses, train_s = fit(step_loss, [unet, text_encoder, text_encoder_2], opt, sched, recipe, progress)
    zero_unused_rows([text_encoder, text_encoder_2], torch.unique(torch.cat([ids.flatten(), tokenize(tokenizer, [""])[0]])))
    save_pipeline(out_dir, AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True), text_encoder.eval(),
                  text_encoder_2.eval(), unet.eval())
    kinds = np.bincount(data["kind"], minlength=3)
    record = {
        "model": recipe.name,
        "command": f"bench embedded train {recipe.name}",
        "trains": "unet, text_encoder and text_encoder_2 jointly, on the frozen vae's latents (the vae is the "
                  "embedded text-to-image model's, copied)",
        "recipe": asdict(recipe),
        "pool": {"plain": int(kinds[0]), "small_original": int(kinds[1]), "random_crop": int(kinds[2]),
                 "original_sizes": list(ORIGINAL_SIZES), "crop_resolution": CROP_RESOLUTION},
        "parameters": parameters(unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2),
        "wall_time_s": round(time.time() - t0, 1),
        "train_loop_s": round(train_s, 1),
        "prepare_s": round(prep_s, 1),
        "final_loss_mean_last_200": float(np.mean(losses[-200:])),
        "machine": _machine().split(";")[0],
    }
    (out_dir / "unet" / "RECIPE.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
