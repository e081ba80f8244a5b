"""``bench embedded train instruct-pix2pix``: InstructPix2Pix (Brooks, Holynski, Efros 2023) on the embedded world.

The paper fine-tunes Stable Diffusion on (source image, instruction, edited image) triplets; here the renderer makes
them: a scene, one attribute changed (color, shape, background or size: ``bench.editing.embedded_edit`` with a seed
no other set uses), the change said as an imperative instruction (``instruction``: "make the circle blue", "turn the
square into a triangle", "make the background white", "change the size from small to large", ...).

As the paper (Sec. 3.2.1) and diffusers' ``examples/instruct_pix2pix/train_instruct_pix2pix.py``: the UNet is
embedded-t2i's with ``conv_in`` widened from 4 to 8 input channels (the noisy latent, then the source image's VAE
latent, the posterior's mode, unscaled, as ``StableDiffusionInstructPix2PixPipeline.prepare_image_latents`` encodes
it), the 4 new input channels' weights zero-initialised so that step 0 is the text-to-image model; conditioning
dropout 5% text only, 5% both, 5% image only (the script's ``random_p`` split); epsilon loss on the target image's
latent. Unlike the paper the text encoder is trained too (jointly, bench/recipes/joint.py): embedded-t2i's text
encoder never saw the instruction words, and their token rows are zero. EMA, warm-up and cosine decay as the
embedded t2i recipe.

The folder is a ``StableDiffusionInstructPix2PixPipeline`` (model_index.json names it; ``from_pretrained`` loads it)
with embedded-t2i's VAE and tokenizer copied and the sampler timbrooks/instruct-pix2pix ships,
``EulerAncestralDiscreteScheduler`` on SD-1.5's training schedule (the paper samples with k-diffusion's Euler
ancestral).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, DDPMScheduler, EulerAncestralDiscreteScheduler,
                       StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel)
from transformers import CLIPTextModel, CLIPTokenizer

from bench.editing import embedded_edit
from bench.embedded.shapes import Scene, WorldConfig, render
from bench.embedded.t2i import SD15_SCHEDULER_CONFIG
from bench.embedded.tokenizer import tokenize
from bench.models import EMBEDDED_WEIGHTS
from bench.recipes.joint import fit, images, joint_optimizer, zero_unused_rows

IP2P_SEED = 41  # training edits (embedded-edits evaluates seed 8; the t2i world trains on 5-7, recolor 21-22, 23)
FOLDER = "instruct-pix2pix"
WORLD = WorldConfig(resolution=32, max_objects=2, split="train")  # embedded-edits' world

# the paper's imperative instructions ("make it ...", "turn ... into ...", "change ..."); the last template of each
# type is embedded-edits' own instruction field, so its held-out edits are asked in a trained phrasing
TEMPLATES = {
    "color": ("make the {shape} {new}", "turn the {old} {shape} {new}", "change the color from {old} to {new}"),
    "shape": ("turn the {old} into a {new}", "make the {old} a {new}", "change the shape from {old} to {new}"),
    "background": ("make the background {new}", "change the background from {old} to {new}"),
    "size": ("make the {shape} {new}", "make the {color} {shape} {new}", "change the size from {old} to {new}"),
}


def instruction(source: Scene, target: Scene, edit_type: str, words: tuple[str, str], choice: int) -> str:
    """Template ``choice`` (mod the type's count) of the edit's type, filled from the changed object."""
    changed = [a for a, b in zip(source.objects, target.objects) if a != b]
    obj = changed[0] if changed else source.objects[0]
    options = TEMPLATES[edit_type]
    return options[choice % len(options)].format(old=words[0], new=words[1], shape=obj.shape, color=obj.color)


def training_edits(n: int, seed: int = IP2P_SEED) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(sources, targets, instructions) of training edits 0..n-1: uint8 [n, 32, 32, 3] twice, one instruction each
    (its template drawn from the edit's own stream, after the edit)."""
    sources, targets, texts = [], [], []
    for i in range(n):
        source, target, edit_type, words = embedded_edit(i, seed, WORLD)
        sources.append(render(source, WORLD.resolution)[0])
        targets.append(render(target, WORLD.resolution)[0])
        choice = int(np.random.default_rng([seed, i, 1]).integers(len(TEMPLATES[edit_type])))
        texts.append(instruction(source, target, edit_type, words, choice))
    return np.stack(sources), np.stack(targets), texts


@dataclass(frozen=True)
class Recipe:
    steps: int = 7000  # the first 2800-step model (the ~6-minute budget) reconstructed its sources poorly; RECIPE.json records the wall time
    batch_size: int = 32
    lr: float = 1e-3
    text_lr: float = 5e-4
    warmup_steps: int = 100
    conditioning_dropout: float = 0.05  # the paper: 5% text, 5% image, 5% both
    ema_decay: float = 0.999
    seed: int = 0
    threads: int = 2
    data_seed: int = IP2P_SEED
    pool_size: int = 10_000
    name: str = "instruct-pix2pix"


def widen_conv_in(unet: UNet2DConditionModel, extra: int = 4) -> UNet2DConditionModel:
    """The same UNet with ``extra`` more input channels whose ``conv_in`` weights are zero (the paper's
    initialization; train_instruct_pix2pix.py's ``new_conv_in``)."""
    config = dict(unet.config)
    config["in_channels"] = unet.config.in_channels + extra
    wide = UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    w = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([w, torch.zeros(w.shape[0], extra, *w.shape[2:], dtype=w.dtype)], dim=1)
    wide.load_state_dict(state)
    return wide


def build_scheduler() -> EulerAncestralDiscreteScheduler:
    """timbrooks/instruct-pix2pix's sampler on the embedded model's (SD-1.5's) training schedule."""
    config = {k: v for k, v in SD15_SCHEDULER_CONFIG.items()
              if k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "steps_offset")}
    return EulerAncestralDiscreteScheduler.from_config(config)


def _machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; run under the " \
           f"shared 2-core machine's CPU lock (other helpers queued, not running alongside)"


@torch.no_grad()
def _encode(vae: AutoencoderKL, pool: np.ndarray, chunk: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    dists = [vae.encode(images(pool, np.arange(a, min(a + chunk, len(pool))))).latent_dist
             for a in range(0, len(pool), chunk)]
    return torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])


def train(out_dir: Path, recipe: Recipe = Recipe(), progress: bool = True, base: Path | None = None) -> dict:
    """Fine-tune embedded-t2i (``base``) into an InstructPix2Pix model; save the pipeline folder and RECIPE.json."""
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    base = Path(base) if base else EMBEDDED_WEIGHTS / "t2i"
    out_dir = Path(out_dir)
    t0 = time.time()
    vae = AutoencoderKL.from_pretrained(base / "vae", use_safetensors=True).eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder", use_safetensors=True)
    unet = widen_conv_in(UNet2DConditionModel.from_pretrained(base / "unet", use_safetensors=True))
    sources, targets, texts = training_edits(recipe.pool_size, recipe.data_seed)
    src_mode, _ = _encode(vae, sources)  # the pipeline's image latents: the posterior's mode, unscaled
    tgt_mean, tgt_std = _encode(vae, targets)
    scaling = vae.config.scaling_factor
    ids = tokenize(tokenizer, texts)
    empty = tokenize(tokenizer, [""])[0]
    prep_s = time.time() - t0
    noise_scheduler = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    opt, sched = joint_optimizer(unet, [text_encoder], recipe)
    gen = torch.Generator().manual_seed(recipe.seed)
    unet.train()
    text_encoder.train()
    drop = recipe.conditioning_dropout

    def step_loss() -> torch.Tensor:
        idx = torch.randint(0, recipe.pool_size, (recipe.batch_size,), generator=gen)
        latents = (tgt_mean[idx] + tgt_std[idx] * torch.randn(tgt_mean[idx].shape, generator=gen)) * scaling
        input_ids = ids[idx].clone()
        p = torch.rand(recipe.batch_size, generator=gen)
        input_ids[p < 2 * drop] = empty  # text dropped: [0, 2 drop)
        keep_image = ~((p >= drop) & (p < 3 * drop))  # image dropped: [drop, 3 drop)
        source = src_mode[idx] * keep_image[:, None, None, None].float()
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (recipe.batch_size,), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        hidden = text_encoder(input_ids)[0]
        pred = unet(torch.cat([noisy, source], dim=1), t, encoder_hidden_states=hidden).sample
        return F.mse_loss(pred.float(), noise.float())

    losses, train_s = fit(step_loss, [unet, text_encoder], opt, sched, recipe, progress)
    base_rows = (text_encoder.get_input_embeddings().weight.detach() != 0).any(1).nonzero().flatten()
    used = torch.unique(torch.cat([ids.flatten(), empty, base_rows]))
    zero_unused_rows([text_encoder], used)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(), scheduler=build_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for part in ("vae", "tokenizer"):  # byte for byte embedded-t2i's (SD-1.5's vocab.json + merges.txt layout)
        shutil.rmtree(out_dir / part)
        shutil.copytree(base / part, out_dir / part)
    record = {
        "model": recipe.name,
        "command": f"bench embedded train {recipe.name}",
        "trains": "embedded-t2i's unet widened to 8 input channels (new conv_in weights zero) and its text encoder, "
                  "jointly, on rendered edit triplets (source, instruction, target); vae frozen",
        "base": str(base.relative_to(EMBEDDED_WEIGHTS)) if base.is_relative_to(EMBEDDED_WEIGHTS) else str(base),
        "recipe": asdict(recipe),
        "parameters": {"unet": sum(p.numel() for p in unet.parameters()),
                       "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
                       "text_encoder_trained_token_rows": int(used.numel())},
        "wall_time_s": round(time.time() - t0, 1),
        "train_loop_s": round(train_s, 1),
        "seconds_per_step": round(train_s / max(recipe.steps, 1), 3),
        "prepare_s": round(prep_s, 1),
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "machine": _machine(),
    }
    (out_dir / "unet" / "RECIPE.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
