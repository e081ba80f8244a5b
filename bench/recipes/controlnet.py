"""``bench embedded train controlnet-mask``: a ControlNet (Zhang et al. 2023) of embedded-t2i conditioned on the shapes
world's object masks.

What is carried over from the paper and from diffusers' examples/controlnet/train_controlnet.py (facts, not code):

- the model: ``ControlNetModel.from_unet`` of the frozen base UNet (its encoder and middle block copied, zero
  convolutions on every output and at the end of the conditioning embedding); the conditioning embedding has two
  stride-2 convolutions, (16, 32, 96) channels, because the embedded VAE's factor is 4 (SD's (16, 32, 96, 256) for
  factor 8); the base UNet, VAE and text encoder frozen (requires_grad False), gradients through the frozen UNet to
  the ControlNet's residuals only;
- the objective: the base model's denoising loss (epsilon MSE at a uniform timestep, DDPMScheduler's add_noise of the
  model's own training schedule), the condition in [0, 1] (the script's conditioning transforms: no normalization);
- caption dropout: 50% of the prompts replaced by the empty prompt (Sec. 3.3: the model must learn the condition's
  semantics without the prompt; the script's ``--proportion_empty_prompts`` 0.5 as the paper);
- AdamW, constant learning rate after a short warm-up (the script's default ``constant`` schedule).

What differs, for a 2-core CPU: a learning rate of 5e-4 (the paper's 1e-5 is for SD's 1.4 B parameters with batches
of 256 or more; this ControlNet has about a million), a few hundred steps (the paper's "sudden convergence" comes
after thousands); the data: the t2i model's own training scenes (seed 6, ``bench.embedded.t2i.T2I_SEED``), their
object masks from the renderer's coverage (``bench.controls.control_image``, as embedded-controls makes its
conditions for its held-out scenes).

Saved: ``ControlNetModel.save_pretrained`` (config.json + diffusion_pytorch_model.safetensors, the format of
lllyasviel's checkpoints; ``StableDiffusionControlNetPipeline`` loads it) and RECIPE.json (recipe, budget, wall
time, the base model's digest).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bench.controls import control_image
from bench.embedded.shapes import make_scenes, render
from bench.embedded.t2i import T2I_SEED, WORLD
from bench.embedded.tokenizer import tokenize
from bench.models import embedded_t2i
from bench.recipes.joint import posterior
from bench.recipes.t2i import _machine
from methods.controlnet import TRAIN_COMMAND, conditioning_channels, init_controlnet


@dataclass(frozen=True)
class Recipe:
    steps: int = 2000  # chosen from a 20-step timing to fit the ~6-minute budget; RECIPE.json records the wall time
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 20
    weight_decay: float = 1e-2  # AdamW's default (the script's --adam_weight_decay)
    caption_dropout: float = 0.5  # Sec. 3.3: half the prompts replaced by the empty one
    seed: int = 0
    threads: int = 2
    data_seed: int = T2I_SEED  # the base model's own training scenes
    pool_size: int = 12000  # rendered with their coverage (about 1 ms a scene)
    name: str = "controlnet-mask"


def train(out_dir: Path, recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    """Train the ControlNet; save it as a ControlNetModel folder with RECIPE.json."""
    from diffusers import DDPMScheduler

    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    out_dir = Path(out_dir)
    t0 = time.time()
    model = embedded_t2i()
    pipe = model.pipeline
    unet, vae, text = pipe.unet, pipe.vae, pipe.text_encoder
    for m in (unet, vae, text):
        m.eval().requires_grad_(False)
    factor = model.sample_shape[1] // model.latent_shape[1]

    scenes = make_scenes(recipe.data_seed, range(recipe.pool_size), WORLD)
    rendered = [render(s, WORLD.resolution) for s in scenes]
    images = np.stack([r[0] for r in rendered])
    controls = torch.from_numpy(np.stack([control_image(r[1]) for r in rendered])).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        mean, std = posterior(vae, images)
        ids = tokenize(pipe.tokenizer, [s.caption for s in scenes])
        cond_all = torch.cat([text(ids[a : a + 500])[0] for a in range(0, len(ids), 500)])
        uncond = text(tokenize(pipe.tokenizer, [""]))[0]
    scaling = vae.config.scaling_factor
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prep_s = time.time() - t0

    net = init_controlnet(unet, factor).train().requires_grad_(True)
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(1, recipe.warmup_steps)))
    gen = torch.Generator().manual_seed(recipe.seed)
    losses: list[float] = []
    bar = tqdm(range(recipe.steps), desc=f"train {recipe.name}", disable=not progress)
    t1 = time.time()
    for step in bar:
        idx = torch.randint(0, recipe.pool_size, (recipe.batch_size,), generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        drop = torch.rand(len(idx), generator=gen) < recipe.caption_dropout
        cond = torch.where(drop[:, None, None], uncond.expand(len(idx), -1, -1), cond_all[idx])
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        x_t = noise_scheduler.add_noise(x0, noise, t)
        down, mid = net(x_t, t, encoder_hidden_states=cond, controlnet_cond=controls[idx], return_dict=False)
        pred = unet(x_t, t, encoder_hidden_states=cond, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    train_s = time.time() - t1
    net.eval().requires_grad_(False)

    out_dir.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(out_dir, safe_serialization=True)
    record = {
        "model": recipe.name,
        "command": TRAIN_COMMAND,
        "trains": "a ControlNetModel (from_unet of embedded-t2i's UNet, zero convolutions) on object-mask conditions; "
                  "the base UNet, VAE and text encoder frozen; epsilon loss, 50% empty prompts",
        "recipe": asdict(recipe),
        "conditioning_embedding_out_channels": list(conditioning_channels(factor)),
        "parameters": {"controlnet": sum(p.numel() for p in params), "unet": sum(p.numel() for p in unet.parameters())},
        "base_model": model.name,
        "base_model_digest": model.digest,
        "budget": {"steps": recipe.steps, "batch_size": recipe.batch_size, "seconds": round(time.time() - t0, 1)},
        "wall_time_s": round(time.time() - t0, 1),
        "train_loop_s": round(train_s, 1),
        "prepare_s": round(prep_s, 1),
        "first_loss_mean_10": float(np.mean(losses[:10])),
        "final_loss_mean_last_50": float(np.mean(losses[-50:])),
        "machine": _machine().split(";")[0],
    }
    (out_dir / "RECIPE.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
