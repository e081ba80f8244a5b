"""The HyperDreamBooth recipe (``bench embedded train hyperdreambooth``): pre-optimized LiDB weights, then the
HyperNetwork, on the embedded text-to-image model (Ruiz et al. 2023, Sec. 3.2 "HyperNetwork training").

1. Training subjects (``bench.embedded.hyperdreambooth.training_subjects``): every seen shape x seen color x seen
   class noun, ``images_per_subject`` rendered images each, captioned "a large sks <class noun> on a <background>
   background". The held-out diamond and orange (embedded-concepts) never occur.
2. Pre-optimization (the paper's "pre-optimized weights" of each identity): one LiDB per subject, all subjects
   trained at once (each batch mixes subjects; ``lidb_forward`` applies each sample's own weights), DreamBooth's
   loss without prior preservation, ``pre_steps`` steps. ``weight_loss`` 0 skips it (diffusion loss only).
3. The HyperNetwork: from ONE image of a subject it predicts the LiDB weights of every layer; the loss is the
   paper's ``alpha ||D(x + eps, c) - x||^2 + beta ||theta_hat - theta||^2`` (the denoising loss of the image it
   was given, with the predicted weights in the UNet, and the squared distance to that subject's pre-optimized
   weights), alpha = ``diffusion_weight``, beta = ``weight_loss``.

Saved: ``hypernetwork.safetensors`` (the decoder and the frozen LiDB bases), ``hypernetwork.json`` (its config,
the base model's digest, the encoder's digest) and ``RECIPE.json`` (the recipe, the budget, the wall time and a
validation on new images of the training subjects: the denoising loss with the predicted weights against the base
model's, same noise and timesteps). No intermediate checkpoints.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.embedded.hyperdreambooth import (IDENTIFIER, HyperConfig, HyperNetwork, ImageEncoder, LiDBBasis, LiDBConfig,
                                            lidb_forward, save_hypernetwork, subject_scenes, training_subjects)
from bench.embedded.shapes import render
from bench.finetune import (BudgetMeter, diffusion_loss, encode_images, encode_prompts, sample_latents,
                            training_scheduler)
from bench.models import embedded_t2i


SHARED_NOTE = ("a 2-core machine shared with four other helpers' tests and trainings (load average about 8): "
               "wall time is an upper bound of the recipe's cost")


@dataclass(frozen=True)
class Recipe:
    images_per_subject: int = 8
    pre_steps: int = 300  # LiDB pre-optimization, all subjects at once
    pre_lr: float = 1e-2
    steps: int = 700  # HyperNetwork steps
    batch_size: int = 16
    lr: float = 5e-4
    warmup_steps: int = 100
    diffusion_weight: float = 1.0  # alpha
    weight_loss: float = 0.01  # beta (verify: the paper's value); 0: diffusion loss only, no pre-optimization
    rank: int = 1  # LiDB's r
    aux_down: int = 32  # a
    aux_up: int = 16  # b
    width: int = 64
    depth: int = 2
    heads: int = 4
    iterations: int = 4  # s
    validation_images: int = 2  # per subject, new positions
    seed: int = 0
    threads: int = 1
    name: str = "hyperdreambooth"


def subject_data(model, images_per_subject: int, offset: int = 0):
    """uint8 images [S*K, 3, 32, 32], their subject index, captions, and the VAE posterior."""
    subjects = training_subjects()
    images, owner, captions = [], [], []
    for i, s in enumerate(subjects):
        for scene in subject_scenes(i, offset + images_per_subject)[offset:]:
            images.append(render(scene, 32)[0])
            owner.append(i)
            captions.append(f"a large {IDENTIFIER} {s.class_noun} on a {scene.background} background")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    mean, std = encode_images(model, x)
    return x, torch.tensor(owner), captions, mean, std


def _warmup(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup)


def train(out_dir: Path, recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    t0 = time.time()
    model = embedded_t2i()
    for module in (model.unet, model.text_encoder, model.vae):
        module.requires_grad_(False)
    model.unet.train()
    scheduler = training_scheduler(model)
    gen = torch.Generator().manual_seed(recipe.seed)
    lidb = LiDBConfig(recipe.rank, recipe.aux_down, recipe.aux_up, 1.0, recipe.seed)
    basis = LiDBBasis.create(model.unet, lidb)
    images, owner, captions, mean, std = subject_data(model, recipe.images_per_subject)
    with torch.no_grad():
        hidden = encode_prompts(model, captions)  # the text encoder is frozen: encode every caption once
    encoder = ImageEncoder()
    tokens = encoder(images)
    n, subjects = len(images), len(training_subjects())
    prep_s = time.time() - t0

    def batch():
        idx = torch.randint(0, n, (recipe.batch_size,), generator=gen)
        return idx, sample_latents(model, mean[idx], std[idx], gen)

    # -- 2. pre-optimized LiDB weights of every subject ----------------------------------------------------------------
    pre_losses: list[float] = []
    targets = None
    with BudgetMeter("cpu") as pre_meter:
        if recipe.weight_loss > 0 and recipe.pre_steps > 0:
            theta = torch.nn.Parameter(basis.init_weights(subjects, gen))
            opt = torch.optim.Adam([theta], lr=recipe.pre_lr)
            for _ in tqdm(range(recipe.pre_steps), desc="pre-optimize LiDB", disable=not progress):
                idx, latents = batch()
                with lidb_forward(model.unet, basis, theta[owner[idx]]):
                    loss = diffusion_loss(model.unet, scheduler, latents, hidden[idx], gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                pre_losses.append(float(loss.detach()))
            targets = theta.detach()

    # -- 3. the HyperNetwork -------------------------------------------------------------------------------------------
    config = HyperConfig(recipe.width, recipe.depth, recipe.heads, recipe.iterations)
    net = HyperNetwork(config, len(basis.layers), lidb.per_layer, tokens.shape[1], encoder.channels)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup(recipe.warmup_steps))
    losses, weight_terms = [], []
    with BudgetMeter("cpu") as meter:
        for _ in tqdm(range(recipe.steps), desc="train the HyperNetwork", disable=not progress):
            idx, latents = batch()
            predicted = net(tokens[idx])  # from the very image it reconstructs
            with lidb_forward(model.unet, basis, predicted):
                loss = recipe.diffusion_weight * diffusion_loss(model.unet, scheduler, latents, hidden[idx], gen)
            if targets is not None:
                term = (predicted - targets[owner[idx]]).pow(2).sum(dim=(1, 2)).mean()
                loss = loss + recipe.weight_loss * term
                weight_terms.append(float(term.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    net.eval()
    model.unet.eval()
    validation = validate(model, basis, net, encoder, recipe)
    out_dir = Path(out_dir)
    meta = {"base_model": {"name": model.name, "digest": model.digest}, "encoder_digest": encoder.digest,
            "identifier": IDENTIFIER, "caption": f"a large {IDENTIFIER} {{class noun}} on a {{background}} background",
            "training_subjects": [s.name for s in training_subjects()]}
    save_hypernetwork(out_dir, net, basis, meta)
    trained = sum(p.numel() for p in net.parameters())
    record = {
        "model": recipe.name,
        "command": f"bench embedded train {recipe.name}",
        "recipe": asdict(recipe),
        "subjects": subjects, "images": n,
        "lidb": {"layers": len(basis.layers), "weights_per_subject": len(basis.layers) * lidb.per_layer},
        "hypernetwork_parameters": trained,
        "budget": {
            "pretrain_steps": recipe.steps + (recipe.pre_steps if targets is not None else 0),
            "pretrain_seconds": round(pre_meter.seconds + meter.seconds + prep_s, 1),
            "pre_optimization_seconds": round(pre_meter.seconds, 1),
            "hypernetwork_seconds": round(meter.seconds, 1),
            "prepare_seconds": round(prep_s, 1),
            "peak_memory_bytes": max(pre_meter.peak, meter.peak),
            "memory_source": meter.source,
        },
        "pre_optimization_final_loss_mean_last_100": float(np.mean(pre_losses[-100:])) if pre_losses else None,
        "final_loss_mean_last_100": float(np.mean(losses[-100:])) if losses else None,
        "final_weight_term_mean_last_100": float(np.mean(weight_terms[-100:])) if weight_terms else None,
        "validation": validation,
        "wall_time_s": round(time.time() - t0, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; {SHARED_NOTE}",
    }
    (out_dir / "RECIPE.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


@torch.no_grad()
def validate(model, basis: LiDBBasis, net: HyperNetwork, encoder: ImageEncoder, recipe: Recipe,
             repeats: int = 4) -> dict:
    """Denoising loss on new images of the training subjects: the predicted weights against none (same draws)."""
    images, _, captions, mean, std = subject_data(model, recipe.validation_images, offset=recipe.images_per_subject)
    hidden = encode_prompts(model, captions)
    theta = net(encoder(images))
    scheduler = training_scheduler(model)
    base, tuned = [], []
    for r in range(repeats):
        gen = torch.Generator().manual_seed(10_000 + r)
        latents = sample_latents(model, mean, std, gen)
        state = gen.get_state()
        base.append(float(diffusion_loss(model.unet, scheduler, latents, hidden, gen)))
        gen.set_state(state)
        with lidb_forward(model.unet, basis, theta):
            tuned.append(float(diffusion_loss(model.unet, scheduler, latents, hidden, gen)))
    return {"images": len(images), "loss_base_model": float(np.mean(base)),
            "loss_predicted_lidb": float(np.mean(tuned)),
            "note": "new positions of the training subjects, the same noise and timesteps for both"}
