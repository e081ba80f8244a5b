"""The embedded text-to-image model: a genuine ``StableDiffusionPipeline`` folder, trained on the 32x32 shapes world.

Stable Diffusion in miniature, in SD-1.5's own layout and file formats
(``model_index.json``, ``vae/``, ``unet/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``; safetensors; ``safety_checker`` and ``feature_extractor`` None), so
that it loads with ``StableDiffusionPipeline.from_pretrained`` exactly as SD-1.5
does and every text-to-image adapter runs on it unchanged:

- ``AutoencoderKL``: 32x32 RGB <-> 4x8x8 latents (factor 4); its ``scaling_factor``
  is 1 / std of the training latents (SD's 0.18215 was computed the same way).
- ``CLIPTextModel``: OpenAI CLIP's text transformer, small (width 64, 2 layers),
  over the full 49,408-token CLIP vocabulary.
- ``CLIPTokenizer``: converted from the clip package's BPE file (``tokenizer.py``).
- ``UNet2DConditionModel``: blocks 48/96 at 8x8 and 4x4 latents, self- and
  cross-attention on the text encoder's hidden states at 4x4 (2.2M parameters).
- ``PNDMScheduler`` with SD-1.5's config (scaled-linear betas 0.00085..0.012, 1000
  steps, epsilon prediction, ``clip_sample`` false, ``steps_offset`` 1).

Training follows SD: the VAE first (``bench embedded train t2i-vae``), then the
UNet on the frozen VAE's latents with 10% of captions dropped to the empty
prompt, the unconditional branch of classifier-free guidance (``bench embedded
train t2i-unet``). Unlike SD, the text encoder is trained jointly with the UNet
(there is no ``t2i-text`` step): SD's frozen text encoder comes from a CLIP
trained on 400M pairs; the embedded world's only CLIP is the evaluation CLIP,
and generating with the judge's own text tower would let CLIP score reward
agreement with itself. Training the text encoder from scratch on the denoising
loss costs nothing extra on a 2-core CPU (a separate contrastive pre-training
would double the budget) and gives it exactly the job it has here. Rows of the
token embedding for tokens that never occur in a training caption get no
gradient; they are stored as zeros (a file that says so, and compresses).

The data: 32x32 scenes of one or two objects with seen attribute values only
(held-out shapes and colors stay for personalization), seed 6.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.embedded.shapes import WorldConfig

T2I_SEED = 6  # scenes the VAE and the UNet train on
HELDOUT_SEED = 97  # scenes the VAE's reconstruction error is measured on
WORLD = WorldConfig(resolution=32, max_objects=2, split="train")
RESHARED_NOTE = ("ran under nice -n 10 on a 2-core machine shared with other training jobs and helpers "
                 "(wall time is an upper bound of the recipe's cost)")

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)

TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",  # OpenAI CLIP's activation, as in SD-1.5's text encoder
    projection_dim=64,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(48, 96),
    # attention (self and cross) at 4x4 and in the mid block only: a third cheaper than at 8x8 too, at equal
    # parameters, and 4x4 latent cells (8x8 pixels) still place an object left or right
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=2,  # diffusers' legacy name: the number of heads (24 and 48 channels each)
    norm_num_groups=16,
)

# stable-diffusion-v1-5/stable-diffusion-v1-5 scheduler/scheduler_config.json
SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
    clip_sample=False,  # a DDIMScheduler configured from this config must not clip latents
)


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


def build_vae(config: dict = VAE_CONFIG):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**config)


def build_text_encoder(config: dict = TEXT_CONFIG):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**config))


def build_unet(config: dict = UNET_CONFIG):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**config)


def build_scheduler():
    from diffusers import PNDMScheduler

    return PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)


def save_pipeline(out_dir: Path, vae, text_encoder, unet, scheduler=None) -> Path:
    """Write a StableDiffusionPipeline folder in SD-1.5's layout (tokenizer as vocab.json + merges.txt)."""
    from diffusers import StableDiffusionPipeline

    from bench.embedded.tokenizer import load, write_tokenizer_files
    from bench.embedded.tokenizer import train as convert_tokenizer

    out_dir = Path(out_dir)
    tmp_tok = out_dir / "tokenizer"
    write_tokenizer_files(tmp_tok)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=load(tmp_tok), unet=unet,
        scheduler=scheduler or build_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    shutil.rmtree(tmp_tok)  # transformers saves tokenizer.json; SD-1.5's folder holds vocab.json + merges.txt
    convert_tokenizer(tmp_tok, progress=False)
    return out_dir


def _lr_lambda(warmup: int, steps: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    return f


def _machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; {RESHARED_NOTE}"


def _images(pool: np.ndarray, idx) -> torch.Tensor:
    return torch.from_numpy(pool[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# -- the autoencoder -----------------------------------------------------------------------------------------------------
def train_vae(out_dir: Path, recipe: VaeRecipe = VaeRecipe(), progress: bool = True) -> dict:
    """Train the AutoencoderKL; save it (with its measured scaling_factor) as a diffusers folder."""
    from tqdm.auto import tqdm

    from bench.embedded.pool import scene_pool

    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    t0 = time.time()
    pool, _ = scene_pool(recipe.data_seed, recipe.pool_size, WORLD)
    render_s = time.time() - t0
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe.warmup_steps, recipe.steps))
    gen = torch.Generator().manual_seed(recipe.seed)
    losses = []
    bar = tqdm(range(recipe.steps), desc=f"train {recipe.name}", disable=not progress)
    for step in bar:
        x = _images(pool, torch.randint(0, recipe.pool_size, (recipe.batch_size,), generator=gen).numpy())
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
        sample = torch.cat([vae.encode(_images(pool, np.arange(a, min(a + 500, n)))).latent_dist.mean for a in range(0, n, 500)])
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
    from bench.embedded.shapes import render_set

    images, scenes = render_set(seed, range(n), WORLD)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    recon = torch.cat([vae.decode(vae.encode(x[a : a + 250]).latent_dist.mean).sample for a in range(0, n, 250)])
    recon01, x01 = ((recon + 1) / 2).clamp(0, 1), (x + 1) / 2
    mse = float(F.mse_loss(recon01, x01))
    out = {"scenes": n, "mse": mse, "psnr_db": float(10 * np.log10(1.0 / mse))}
    try:  # how much of the prompt's content survives the autoencoder: an upper bound for generation
        from metrics.attribute_accuracy import predict, score
        from bench.embedded.feature_extractor import WEIGHTS_DIR32, load_network

        uint8 = (recon01 * 255).round().to(torch.uint8)
        targets = [{**s.attributes(), "count": len(s.objects)} for s in scenes]
        out["attribute_accuracy_of_reconstructions"] = score(predict(load_network(WEIGHTS_DIR32), uint8), targets)
    except Exception as exc:  # the feature network is trained separately; its absence only drops this figure
        out["attribute_accuracy_of_reconstructions"] = f"unavailable: {type(exc).__name__}"
    return out


# -- the UNet and the text encoder ---------------------------------------------------------------------------------------
def train_unet(out_dir: Path, recipe: UnetRecipe = UnetRecipe(), progress: bool = True, vae_dir: Path | None = None) -> dict:
    """Train the UNet and the text encoder on the frozen VAE's latents; save the whole pipeline folder."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from bench.embedded.pool import scene_pool
    from bench.embedded.tokenizer import load as load_tokenizer
    from bench.embedded.tokenizer import tokenize, write_tokenizer_files
    from bench.finetune import diffusion_loss

    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    from bench.models import EMBEDDED_WEIGHTS

    out_dir = Path(out_dir)
    if vae_dir is None:  # the pipeline folder's own VAE, else the committed one
        vae_dir = out_dir / "vae" if (out_dir / "vae" / "config.json").exists() else EMBEDDED_WEIGHTS / "t2i" / "vae"
    vae_dir = Path(vae_dir)
    vae_record = json.loads((vae_dir / "RECIPE.json").read_text()) if (vae_dir / "RECIPE.json").exists() else None
    vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True).eval().requires_grad_(False)
    t0 = time.time()
    pool, scenes = scene_pool(recipe.data_seed, recipe.pool_size, WORLD)
    with torch.no_grad():  # the frozen VAE's posterior of every pool image, once
        dists = [vae.encode(_images(pool, np.arange(a, min(a + 500, recipe.pool_size)))).latent_dist
                 for a in range(0, recipe.pool_size, 500)]
    mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
    scaling = vae.config.scaling_factor
    tok_dir = Path(out_dir) / ".tokenizer-build"
    tokenizer = load_tokenizer(write_tokenizer_files(tok_dir))
    shutil.rmtree(tok_dir)
    ids = tokenize(tokenizer, [s.caption for s in scenes])
    empty = tokenize(tokenizer, [""])[0]
    prep_s = time.time() - t0

    text_encoder, unet = build_text_encoder(), build_unet()
    noise_scheduler = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)  # the training schedule (same betas)
    params = [{"params": unet.parameters(), "lr": recipe.lr, "weight_decay": 1e-2},
              {"params": [p for n, p in text_encoder.named_parameters() if "token_embedding" not in n],
               "lr": recipe.text_lr, "weight_decay": 1e-2},
              {"params": text_encoder.get_input_embeddings().parameters(), "lr": recipe.text_lr,
               "weight_decay": 0.0}]  # no decay: rows of tokens never seen must stay untouched
    opt = torch.optim.AdamW(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe.warmup_steps, recipe.steps))
    ema_unet = EMAModel(unet.parameters(), decay=recipe.ema_decay, use_ema_warmup=True)
    ema_text = EMAModel(text_encoder.parameters(), decay=recipe.ema_decay, use_ema_warmup=True)
    gen = torch.Generator().manual_seed(recipe.seed)
    losses = []
    bar = tqdm(range(recipe.steps), desc=f"train {recipe.name}", disable=not progress)
    t1 = time.time()
    for step in bar:
        idx = torch.randint(0, recipe.pool_size, (recipe.batch_size,), generator=gen)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        input_ids = ids[idx].clone()
        drop = torch.rand(recipe.batch_size, generator=gen) < recipe.caption_dropout
        input_ids[drop] = empty
        hidden = text_encoder(input_ids)[0]
        loss = diffusion_loss(unet, noise_scheduler, latents, hidden, gen)  # noise, then t, from gen
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), 1.0)
        opt.step()
        sched.step()
        ema_unet.step(unet.parameters())
        ema_text.step(text_encoder.parameters())
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    train_s = time.time() - t1
    ema_unet.copy_to(unet.parameters())
    ema_text.copy_to(text_encoder.parameters())
    used = torch.unique(torch.cat([ids.flatten(), empty]))
    with torch.no_grad():
        emb = text_encoder.get_input_embeddings().weight
        keep = torch.zeros(emb.shape[0], dtype=torch.bool)
        keep[used] = True
        emb[~keep] = 0.0
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
