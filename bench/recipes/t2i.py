"""The embedded text-to-image model's recipes: ``bench embedded train t2i-vae`` and ``t2i-unet``.

The model itself (configs, builders, the pipeline folder) is bench.embedded.t2i; the recipes sit above
the runtime world (they use bench.finetune's loss and the feature network's attribute heads).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from tqdm.auto import tqdm

from bench.embedded.feature_extractor import WEIGHTS_DIR32, load_network
from bench.embedded.pool import scene_pool
from bench.embedded.shapes import render_set
from bench.embedded.t2i import (HELDOUT_SEED, RESHARED_NOTE, SD15_SCHEDULER_CONFIG, T2I_SEED, WORLD, build_text_encoder,
                                build_unet, build_vae, save_pipeline)
from bench.embedded.tokenizer import tokenize
from bench.finetune import diffusion_loss
from bench.models import EMBEDDED_WEIGHTS
from bench.recipes.joint import build_tokenizer, fit, images, joint_optimizer, lr_lambda, posterior, zero_unused_rows
from metrics.attribute_accuracy import predict, score


# threads=1: on the shared 2-core machine, OpenMP's spinning worker threads made 2 threads 5 to 9 times slower than 1
@dataclass(frozen=True)
class VaeRecipe:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    kl_weight: float = 1e-6  # SD's autoencoders: a tiny KL term keeps the latent near N(0, s^2)
    l1_weight: float = 1.0
    seed: int = 0
    threads: int = 1
    data_seed: int = T2I_SEED
    pool_size: int = 20_000
    name: str = "t2i-vae"


@dataclass(frozen=True)
class UnetRecipe:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    text_lr: float = 5e-4
    warmup_steps: int = 200
    caption_dropout: float = 0.1  # classifier-free guidance's unconditional branch (Ho and Salimans: 0.1 to 0.2)
    ema_decay: float = 0.999
    seed: int = 0
    threads: int = 1
    data_seed: int = T2I_SEED
    pool_size: int = 20_000
    name: str = "t2i-unet"


def _machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; {RESHARED_NOTE}"


# -- the autoencoder -----------------------------------------------------------------------------------------------------
def train_vae(out_dir: Path, recipe: VaeRecipe = VaeRecipe(), progress: bool = True) -> dict:
    """Train the AutoencoderKL; save it (with its measured scaling_factor) as a diffusers folder."""
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    t0 = time.time()
    pool, _ = scene_pool(recipe.data_seed, recipe.pool_size, WORLD)
    render_s = time.time() - t0
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe.warmup_steps, recipe.steps))
    gen = torch.Generator().manual_seed(recipe.seed)
    losses = []
    bar = tqdm(range(recipe.steps), desc=f"train {recipe.name}", disable=not progress)
    for step in bar:
        x = images(pool, torch.randint(0, recipe.pool_size, (recipe.batch_size,), generator=gen).numpy())
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + recipe.l1_weight * F.l1_loss(recon, x) + recipe.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    wall = time.time() - t0
    vae.eval()
    with torch.no_grad():
        n = min(2000, recipe.pool_size)
        sample = torch.cat([vae.encode(images(pool, np.arange(a, min(a + 500, n)))).latent_dist.mean for a in range(0, n, 500)])
    scaling = float(1.0 / sample.std())
    vae.register_to_config(scaling_factor=round(scaling, 5))
    out_dir = Path(out_dir)
    vae.save_pretrained(out_dir, safe_serialization=True)
    record = {
        "model": recipe.name,
        "command": f"bench embedded train {recipe.name}",
        "recipe": asdict(recipe),
        "parameters": sum(p.numel() for p in vae.parameters()),
        "scaling_factor": round(scaling, 5),
        "wall_time_s": round(wall, 1),
        "render_pool_s": round(render_s, 1),
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "heldout_reconstruction": reconstruction_error(vae),
        "machine": _machine(),
    }
    (out_dir / "RECIPE.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


@torch.no_grad()
def reconstruction_error(vae, n: int = 1000, seed: int = HELDOUT_SEED) -> dict[str, float]:
    """MSE and PSNR (pixels in [0, 1]) of encode-decode (posterior mean) on held-out scenes; attribute accuracy too."""
    images, scenes = render_set(seed, range(n), WORLD)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    recon = torch.cat([vae.decode(vae.encode(x[a : a + 250]).latent_dist.mean).sample for a in range(0, n, 250)])
    recon01, x01 = ((recon + 1) / 2).clamp(0, 1), (x + 1) / 2
    mse = float(F.mse_loss(recon01, x01))
    out = {"scenes": n, "mse": mse, "psnr_db": float(10 * np.log10(1.0 / mse))}
    try:  # how much of the prompt's content survives the autoencoder: an upper bound for generation
        uint8 = (recon01 * 255).round().to(torch.uint8)
        targets = [{**s.attributes(), "count": len(s.objects)} for s in scenes]
        out["attribute_accuracy_of_reconstructions"] = score(predict(load_network(WEIGHTS_DIR32), uint8), targets)
    except Exception as exc:  # the feature network is trained separately; its absence only drops this figure
        out["attribute_accuracy_of_reconstructions"] = f"unavailable: {type(exc).__name__}"
    return out


# -- the UNet and the text encoder ---------------------------------------------------------------------------------------
def train_unet(out_dir: Path, recipe: UnetRecipe = UnetRecipe(), progress: bool = True, vae_dir: Path | None = None) -> dict:
    """Train the UNet and the text encoder on the frozen VAE's latents; save the whole pipeline folder."""
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    out_dir = Path(out_dir)
    if vae_dir is None:  # the pipeline folder's own VAE, else the committed one
        vae_dir = out_dir / "vae" if (out_dir / "vae" / "config.json").exists() else EMBEDDED_WEIGHTS / "t2i" / "vae"
    vae_dir = Path(vae_dir)
    vae_record = json.loads((vae_dir / "RECIPE.json").read_text()) if (vae_dir / "RECIPE.json").exists() else None
    vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True).eval().requires_grad_(False)
    t0 = time.time()
    pool, scenes = scene_pool(recipe.data_seed, recipe.pool_size, WORLD)
    mean, std = posterior(vae, pool)  # the frozen VAE's posterior of every pool image, once
    scaling = vae.config.scaling_factor
    tokenizer = build_tokenizer(out_dir)
    ids = tokenize(tokenizer, [s.caption for s in scenes])
    empty = tokenize(tokenizer, [""])[0]
    prep_s = time.time() - t0

    text_encoder, unet = build_text_encoder(), build_unet()
    noise_scheduler = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)  # the training schedule (same betas)
    opt, sched = joint_optimizer(unet, [text_encoder], recipe)
    gen = torch.Generator().manual_seed(recipe.seed)

    def step_loss() -> torch.Tensor:
        idx = torch.randint(0, recipe.pool_size, (recipe.batch_size,), generator=gen)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        input_ids = ids[idx].clone()
        drop = torch.rand(recipe.batch_size, generator=gen) < recipe.caption_dropout
        input_ids[drop] = empty
        hidden = text_encoder(input_ids)[0]
        return diffusion_loss(unet, noise_scheduler, latents, hidden, gen)  # noise, then t, from gen

    losses, train_s = fit(step_loss, [unet, text_encoder], opt, sched, recipe, progress)
    used = torch.unique(torch.cat([ids.flatten(), empty]))
    zero_unused_rows([text_encoder], used)
    vae_copy = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True)
    save_pipeline(out_dir, vae_copy, text_encoder.eval(), unet.eval())
    if vae_record:
        (out_dir / "vae" / "RECIPE.json").write_text(json.dumps(vae_record, indent=2) + "\n")
    record = {
        "model": recipe.name,
        "command": f"bench embedded train {recipe.name}",
        "trains": "unet and text_encoder jointly, on the frozen vae's latents (see bench/embedded/t2i.py for why)",
        "recipe": asdict(recipe),
        "parameters": {"unet": sum(p.numel() for p in unet.parameters()),
                       "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
                       "text_encoder_trained_token_rows": int(used.numel())},
        "wall_time_s": round(time.time() - t0, 1),
        "train_loop_s": round(train_s, 1),
        "prepare_s": round(prep_s, 1),
        "final_loss_mean_last_200": float(np.mean(losses[-200:])),
        "machine": _machine(),
    }
    (out_dir / "unet" / "RECIPE.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def train(out_dir: Path, recipe, progress: bool = True) -> dict:
    """The ``bench embedded train t2i-vae`` / ``t2i-unet`` entry point (the recipe's class says which)."""
    if isinstance(recipe, VaeRecipe):
        return train_vae(out_dir, recipe, progress)
    return train_unet(out_dir, recipe, progress)
