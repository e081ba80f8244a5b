"""Latent against pixel diffusion at equal training compute (Rombach et al. 2022, LDM): the two budget recipes.

``bench embedded train t2i-budget``: the embedded text-to-image recipe (bench/recipes/t2i.py: the frozen t2i VAE's
latents, UNet2DConditionModel and CLIP text encoder trained jointly, 10% caption dropout, EMA) cut to a small budget.
``bench embedded train pixel-t2i``: the pixel-space baseline at the same 32x32 output: a UNet2DConditionModel of the
same kind on 3x32x32 pixels, the same text encoder and tokenizer, the same caption dropout, pool and optimizer, saved
in DeepFloyd IF's public layout (``IFPipeline``: ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``;
safety checker, feature extractor and watermarker null), which ``IFPipeline.from_pretrained`` loads. IF's own text
encoder is T5; the folder names the CLIP classes it holds (model_index.json), which ``from_pretrained`` loads as
named. The prompt is encoded as ``IFPipeline.encode_prompt`` does it (77 tokens, the attention mask passed).

Equal compute is counted in FLOPs, not seconds, so that it does not depend on the machine: ``training_flops`` runs one
training step (forward and backward) of each recipe under ``torch.utils.flop_counter.FlopCounterMode`` (matrix
products, convolutions and attention; elementwise work and the optimizer are not counted). The latent step's count
includes the frozen VAE encoder's forward pass over the step's images (the recipe encodes its pool once; counted per
step it is an upper bound of that cost, so the latent model is charged at least what it used). The VAE's own training
is not counted: as in the paper, the first stage is trained once and shared by every latent model. The pixel recipe's
step count is the latent budget model's total training FLOPs (its RECIPE.json) over the pixel step's FLOPs.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from bench.embedded.pool import scene_pool
from bench.embedded.t2i import SD15_SCHEDULER_CONFIG, T2I_SEED, WORLD, build_text_encoder, build_unet
from bench.embedded.tokenizer import load as load_tokenizer
from bench.embedded.tokenizer import train as convert_tokenizer
from bench.embedded.tokenizer import write_tokenizer_files
from bench.finetune import diffusion_loss
from bench.models import EMBEDDED_WEIGHTS
from bench.recipes import t2i
from bench.recipes.joint import build_tokenizer, fit, images, joint_optimizer, zero_unused_rows

BUDGET_FOLDER = "t2i-budget"
PIXEL_FOLDER = "pixel-t2i"

# The pixel UNet: the latent UNet's kind (UNet2DConditionModel, one layer per block, self- and cross-attention on the
# text encoder's states at the lowest resolution and in the mid block) on 32x32 pixels: one more level (32 -> 16 -> 8)
# so that attention sits at 8x8, where the latent UNet's 4x4 cells see 8x8 pixels.
PIXEL_UNET_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(32, 48, 96),
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=2,
    norm_num_groups=16,
)

# Pixel diffusion's schedule: DDPM's linear betas 1e-4..0.02 (Ho et al. 2020; the embedded pixel DDPM's, and LDM's
# pixel baselines'), epsilon prediction, x0 clipped to [-1, 1] as pixel samplers do.
PIXEL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    variance_type="fixed_small",
    clip_sample=True,
    prediction_type="epsilon",
)


@dataclass(frozen=True)
class BudgetRecipe(t2i.UnetRecipe):
    """The t2i UNet recipe at a small budget (2 threads: the recipe runs alone under the machine's lock)."""

    steps: int = 1400
    warmup_steps: int = 100
    threads: int = 2
    name: str = "t2i-budget"


@dataclass(frozen=True)
class PixelRecipe:
    """The pixel baseline: BudgetRecipe's data, batch, optimizer, dropout and EMA; steps 0 = the FLOP-matched count."""

    steps: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    text_lr: float = 5e-4
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0
    threads: int = 2
    data_seed: int = T2I_SEED
    pool_size: int = 20_000
    name: str = "pixel-t2i"


def build_pixel_unet(config: dict = PIXEL_UNET_CONFIG) -> UNet2DConditionModel:
    return UNet2DConditionModel(**config)


def _machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; run alone under the " \
           f"machine's lock"


def encode_if(text_encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The text encoder's hidden states as ``IFPipeline.encode_prompt`` computes them (the attention mask passed)."""
    return text_encoder(ids, attention_mask=mask)[0]


# -- FLOPs of one training step ----------------------------------------------------------------------------------------
def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def latent_step_flops(batch_size: int, vae: AutoencoderKL | None = None) -> dict[str, int]:
    """FLOPs of one t2i training step: the frozen VAE encoder's forward pass over the batch's images, the text
    encoder and the UNet forward and backward (the same modules and shapes as bench/recipes/t2i.py's step)."""
    torch.manual_seed(0)
    vae = vae or AutoencoderKL.from_pretrained(EMBEDDED_WEIGHTS / "t2i" / "vae", use_safetensors=True)
    vae.eval().requires_grad_(False)
    text_encoder, unet = build_text_encoder(), build_unet()
    x = torch.randn(batch_size, 3, WORLD.resolution, WORLD.resolution)
    ids = torch.randint(0, 49406, (batch_size, 77))
    scheduler = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        encode = _count(lambda: vae.encode(x).latent_dist.sample(generator=gen))
        latents = vae.encode(x).latent_dist.sample(generator=gen) * vae.config.scaling_factor

    def step() -> None:
        diffusion_loss(unet, scheduler, latents, text_encoder(ids)[0], gen).backward()

    train = _count(step)
    return {"vae_encode": encode, "text_encoder_and_unet": train, "total": encode + train}


def pixel_step_flops(batch_size: int, unet_config: dict = PIXEL_UNET_CONFIG) -> dict[str, int]:
    """FLOPs of one pixel training step: the text encoder and the pixel UNet, forward and backward."""
    torch.manual_seed(0)
    text_encoder, unet = build_text_encoder(), build_pixel_unet(unet_config)
    x = torch.randn(batch_size, 3, unet_config["sample_size"], unet_config["sample_size"])
    ids, mask = torch.randint(0, 49406, (batch_size, 77)), torch.ones(batch_size, 77, dtype=torch.long)
    scheduler = DDPMScheduler.from_config(PIXEL_SCHEDULER_CONFIG)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        diffusion_loss(unet, scheduler, x, encode_if(text_encoder, ids, mask), gen).backward()

    train = _count(step)
    return {"text_encoder_and_unet": train, "total": train}


def matched_steps(latent_flops_total: int, pixel_step_total: int) -> int:
    """Pixel steps whose FLOPs come closest to the latent model's total without exceeding it (at least 1)."""
    return max(1, latent_flops_total // pixel_step_total)


# -- the pipelines -------------------------------------------------------------------------------------------------------
VARIANCE_NOTE = ("IF's layout: the UNet's conv_out widened from 3 to 6 channels, the second half (IF's learned variance) "
                 "zero; the scheduler's fixed_small variances leave it unused (IFPipeline drops it, as the loop does)")


@torch.no_grad()
def with_variance_channels(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """The UNet with IF's output layout, 2C channels (the noise, then IF's learned-variance interpolation): the
    trained noise head unchanged, the variance half zero. IFPipeline.__call__ splits every UNet output in two halves,
    so a C-channel UNet does not run in it; with ``variance_type`` fixed_small it uses the first half only."""
    c = unet.config.in_channels
    if unet.config.out_channels == 2 * c:
        return unet
    wide = UNet2DConditionModel.from_config({**unet.config, "out_channels": 2 * c})
    state = unet.state_dict()
    for name in ("conv_out.weight", "conv_out.bias"):
        w = state[name]
        state[name] = torch.cat([w, torch.zeros_like(w)], dim=0)
    wide.load_state_dict(state)
    return wide.eval()


def save_if_pipeline(out_dir: Path, text_encoder, unet, scheduler=None) -> Path:
    """Write an ``IFPipeline`` folder (DeepFloyd IF's layout: ``with_variance_channels``) with the CLIP tokenizer as
    vocab.json + merges.txt."""
    from diffusers import IFPipeline

    out_dir = Path(out_dir)
    unet = with_variance_channels(unet)
    tok_dir = out_dir / "tokenizer"
    write_tokenizer_files(tok_dir)
    pipe = IFPipeline(tokenizer=load_tokenizer(tok_dir), text_encoder=text_encoder, unet=unet,
                      scheduler=scheduler or DDPMScheduler.from_config(PIXEL_SCHEDULER_CONFIG), safety_checker=None,
                      feature_extractor=None, watermarker=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    shutil.rmtree(tok_dir)  # as bench.embedded.t2i.save_pipeline: the folder holds vocab.json + merges.txt
    convert_tokenizer(tok_dir, progress=False)
    return out_dir


# -- the recipes ---------------------------------------------------------------------------------------------------------
def train_budget(out_dir: Path, recipe: BudgetRecipe, progress: bool = True) -> dict:
    """The t2i recipe at ``recipe.steps`` with the committed VAE; RECIPE.json gains the training FLOPs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vae_dir = EMBEDDED_WEIGHTS / "t2i" / "vae"
    record = t2i.train_unet(out_dir, recipe, progress, vae_dir=vae_dir)
    torch.set_num_threads(recipe.threads)
    flops = latent_step_flops(recipe.batch_size)
    record["training_flops"] = {"per_step": flops, "steps": recipe.steps, "total": flops["total"] * recipe.steps,
                                "counted_by": "torch.utils.flop_counter.FlopCounterMode over one training step "
                                              "(bench/recipes/ldm.py latent_step_flops)"}
    record["machine"] = _machine()
    (out_dir / "unet" / "RECIPE.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def latent_budget_flops(folder: Path = EMBEDDED_WEIGHTS / BUDGET_FOLDER) -> int:
    path = Path(folder) / "unet" / "RECIPE.json"
    try:
        return int(json.loads(path.read_text())["training_flops"]["total"])
    except (OSError, KeyError, ValueError):
        raise FileNotFoundError(f"{path} does not record the latent budget's training FLOPs: run "
                                f"`bench embedded train t2i-budget` first (or pass --steps)") from None


def train_pixel(out_dir: Path, recipe: PixelRecipe = PixelRecipe(), progress: bool = True) -> dict:
    """Train the pixel UNet and the text encoder on 32x32 pixels; save an IFPipeline folder and RECIPE.json."""
    torch.set_num_threads(recipe.threads)
    out_dir = Path(out_dir)
    step_flops = pixel_step_flops(recipe.batch_size)
    latent_total = None
    if recipe.steps == 0:
        latent_total = latent_budget_flops()
        recipe = replace(recipe, steps=matched_steps(latent_total, step_flops["total"]))
    torch.manual_seed(recipe.seed)
    t0 = time.time()
    pool, scenes = scene_pool(recipe.data_seed, recipe.pool_size, WORLD)
    tokenizer = build_tokenizer(out_dir)
    tokens = tokenizer([s.caption.lower().strip() for s in scenes], padding="max_length", max_length=77,
                       truncation=True, return_tensors="pt")
    empty = tokenizer([""], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids, masks = tokens.input_ids, tokens.attention_mask
    prep_s = time.time() - t0

    text_encoder, unet = build_text_encoder(), build_pixel_unet()
    noise_scheduler = DDPMScheduler.from_config(PIXEL_SCHEDULER_CONFIG)
    opt, sched = joint_optimizer(unet, [text_encoder], recipe)
    gen = torch.Generator().manual_seed(recipe.seed)

    def step_loss() -> torch.Tensor:
        idx = torch.randint(0, recipe.pool_size, (recipe.batch_size,), generator=gen)
        x = images(pool, idx.numpy())
        input_ids, mask = ids[idx].clone(), masks[idx].clone()
        drop = torch.rand(recipe.batch_size, generator=gen) < recipe.caption_dropout
        input_ids[drop], mask[drop] = empty.input_ids[0], empty.attention_mask[0]
        return diffusion_loss(unet, noise_scheduler, x, encode_if(text_encoder, input_ids, mask), gen)

    losses, train_s = fit(step_loss, [unet, text_encoder], opt, sched, recipe, progress)
    zero_unused_rows([text_encoder], torch.unique(torch.cat([ids.flatten(), empty.input_ids[0]])))
    save_if_pipeline(out_dir, text_encoder.eval(), unet.eval())
    record = {
        "model": recipe.name,
        "command": f"bench embedded train {recipe.name}",
        "trains": "a pixel-space UNet2DConditionModel (32x32) and the text encoder jointly: the latent budget "
                  "model's recipe without the VAE (bench/recipes/ldm.py)",
        "recipe": asdict(recipe),
        "parameters": {"unet": sum(p.numel() for p in unet.parameters()),
                       "text_encoder": sum(p.numel() for p in text_encoder.parameters())},
        "saved_as": VARIANCE_NOTE,
        "training_flops": {"per_step": step_flops, "steps": recipe.steps, "total": step_flops["total"] * recipe.steps,
                           "matched_to_latent_total": latent_total,
                           "counted_by": "torch.utils.flop_counter.FlopCounterMode over one training step "
                                         "(bench/recipes/ldm.py pixel_step_flops)"},
        "wall_time_s": round(time.time() - t0, 1),
        "train_loop_s": round(train_s, 1),
        "prepare_s": round(prep_s, 1),
        "final_loss_mean_last_200": float(np.mean(losses[-200:])),
        "machine": _machine(),
    }
    (out_dir / "unet" / "RECIPE.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def train(out_dir: Path, recipe, progress: bool = True) -> dict:
    """The ``bench embedded train t2i-budget`` / ``pixel-t2i`` entry point (the recipe's class says which)."""
    if isinstance(recipe, BudgetRecipe):
        return train_budget(out_dir, recipe, progress)
    return train_pixel(out_dir, recipe, progress)
