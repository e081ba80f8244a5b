"""InstantBooth's one-time training (``bench embedded train instantbooth``): encoders and adapters on seen subjects.

Shi et al. 2023 (arXiv 2304.03411) train the concept encoder, the patch encoder and the adapter layers once per
domain with the diffusion loss, the text-to-image model frozen, and then personalize with no test-time
fine-tuning. Here the domain is the shapes world, and its subjects are the 18 seen (shape, color) pairs:
3 shapes x 6 colors, never the held-out diamond or orange that embedded-concepts evaluates. Each subject has
``images_per_subject`` renders (seed ``SUBJECT_SEED``) at random sizes, positions and backgrounds.

One step: ``batch_size`` target renders; for each, ``K`` other renders of its subject (K uniform in 1..5 per step,
embedded-concepts gives 5) as the encoders' input, each with its background masked out (set to 0 in the trunk's
[-1, 1] input, the way a segmentation mask removes it) with probability ``mask_prob`` (the paper's random masking
of the background). The renders at other positions, sizes and backgrounds are the augmentation: the target is
never one of its own inputs, so copying the input's layout does not pay. The caption is the target's with the
subject replaced by V*: "a large sks on a gray background"; the loss is the noise-prediction MSE of the frozen UNet
(bench.finetune.diffusion_loss), the concept embedding written at "sks" and the adapters given the patch tokens.
The trunk (shapes-cnn32) is frozen, so its features of every render are computed once.

Saved: ``instantbooth.safetensors`` (concept MLP, patch projection, position embedding, adapters), ``config.json``
(shapes, block names, identifier, the base model's and the trunk's digests) and ``RECIPE.json`` (budget, wall time,
validation losses with the adapters at scale 1 and 0 on renders the training never drew).
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

from bench.denoiser import sample_seed
from bench.embedded.instantbooth import IDENTIFIER, InstantBooth, Injection, config_for
from bench.embedded.shapes import BACKGROUNDS, COLORS, SHAPES, SIZES, Scene, ShapeObject, render, scene_rng
from bench.finetune import (BudgetMeter, diffusion_loss, encode_images, encode_prompts, sample_latents,
                            trainable_parameters, training_scheduler)
from bench.models import embedded_t2i

SUBJECT_SEED = 11  # the training subjects' renders (the t2i model trains on seed 6, concepts use 8, class images 9)
VALIDATION_SEED = 12
MAX_REFERENCES = 5  # embedded-concepts' images per subject


@dataclass(frozen=True)
class Recipe:
    steps: int = 800
    batch_size: int = 32
    lr: float = 1e-3
    images_per_subject: int = 64
    validation_images: int = 8  # per subject, from VALIDATION_SEED
    mask_prob: float = 0.5
    patch_dim: int = 64
    seed: int = 0
    threads: int = 1
    name: str = "instantbooth"


def subjects() -> list[tuple[str, str]]:
    """The training subjects: every seen (shape, color) pair."""
    return [(s, c) for s in SHAPES for c in COLORS]


def subject_renders(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """n renders of every training subject: (images uint8 [S*n, 32, 32, 3], background masks [S*n, 32, 32] (True: background),
    captions with V*, subject index)."""
    images, masks, captions, owner = [], [], [], []
    for j, (shape, color) in enumerate(subjects()):
        for i in range(n):
            rng = scene_rng(seed, j * 100_000 + i)
            size = str(rng.choice(tuple(SIZES)))
            background = str(rng.choice(tuple(BACKGROUNDS)))
            r = SIZES[size]
            lo, hi = r + 0.02, 1.0 - r - 0.02
            scene = Scene((ShapeObject(shape, color, size, float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))),),
                          background)
            image, cover = render(scene, 32)
            images.append(image)
            masks.append(cover[0] < 0.5)
            captions.append(f"a {size} {IDENTIFIER} on a {background} background")
            owner.append(j)
    return np.stack(images), np.stack(masks), captions, np.array(owner)


def _features(net: InstantBooth, images: np.ndarray, masks: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    if masks is not None:  # background to 127.5 (0 in the trunk's input); the uint8 image rounds it to 128
        x = torch.where(torch.from_numpy(masks)[:, None], torch.full_like(x, 128), x)
    g, p = zip(*(net.features(x[a : a + 512]) for a in range(0, len(x), 512)))
    return torch.cat(g), torch.cat(p)


def _draw_references(owner: np.ndarray, targets: torch.Tensor, k: int, n_per: int, gen: torch.Generator) -> torch.Tensor:
    """For each target, k other renders of its subject (indices into the pool)."""
    base = torch.from_numpy(owner)[targets] * n_per
    own = targets - base  # the target's index within its subject
    offsets = torch.stack([torch.randperm(n_per - 1, generator=gen)[:k] for _ in range(len(targets))])
    offsets = offsets + (offsets >= own[:, None]).long()  # skip the target itself
    return base[:, None] + offsets


def train(out_dir: Path, recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    with BudgetMeter("cpu") as meter:
        record = _train(Path(out_dir), recipe, progress)
    budget = meter.budget(recipe.steps, record["parameters"], sum(f.stat().st_size for f in Path(out_dir).iterdir()
                                                                   if f.is_file() and f.name != "RECIPE.json"))
    record["budget"] = budget.to_dict()
    record["wall_time_s"] = round(budget.seconds, 1)
    (Path(out_dir) / "RECIPE.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _train(out_dir: Path, recipe: Recipe, progress: bool) -> dict:
    t0 = time.time()
    model = embedded_t2i()
    for module in (model.unet, model.text_encoder, model.vae):
        module.requires_grad_(False).eval()
    net = InstantBooth(config_for(model, patch_dim=recipe.patch_dim))
    injection = Injection(net, model)

    n = recipe.images_per_subject
    images, masks, captions, owner = subject_renders(SUBJECT_SEED, n)
    mean, std = encode_images(model, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    feats = {False: _features(net, images, None), True: _features(net, images, masks)}
    v_images, _, v_captions, v_owner = subject_renders(VALIDATION_SEED, recipe.validation_images)
    v_mean, _ = encode_images(model, torch.from_numpy(v_images).permute(0, 3, 1, 2).contiguous())
    prepare_s = time.time() - t0

    scheduler = training_scheduler(model)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(recipe.seed)
    losses: list[float] = []
    t1 = time.time()
    net.train()
    with injection.installed():
        bar = tqdm(range(recipe.steps), desc=f"train {recipe.name}", disable=not progress)
        for _ in bar:
            targets = torch.randint(0, len(images), (recipe.batch_size,), generator=gen)
            k = int(torch.randint(1, MAX_REFERENCES + 1, (1,), generator=gen))
            refs = _draw_references(owner, targets, k, n, gen)
            masked = torch.rand(refs.shape, generator=gen) < recipe.mask_prob
            g = torch.where(masked[..., None], feats[True][0][refs], feats[False][0][refs])
            p = torch.where(masked[..., None, None], feats[True][1][refs], feats[False][1][refs])
            injection.set(net.concept_embedding(g), net.patch_tokens(p))
            hidden = encode_prompts(model, [captions[i] for i in targets], grad=True)
            latents = sample_latents(model, mean[targets], std[targets], gen)
            loss = diffusion_loss(model.unet, scheduler, latents, hidden, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            if len(losses) % 50 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        train_s = time.time() - t1
        net.eval()
        validation = validation_losses(model, net, injection, (v_mean, v_captions, v_owner), feats[False], owner,
                                       recipe)

    net.save(out_dir, {"base_model": {"name": model.name, "digest": model.digest}})
    return {
        "model": recipe.name,
        "command": f"bench embedded train {recipe.name}",
        "trains": "concept encoder (MLP), patch projection and position embedding, one gated self-attention adapter "
                  "per UNet transformer block; the t2i model and the shapes-cnn32 trunk frozen",
        "subjects": [f"{c} {s}" for s, c in subjects()],
        "recipe": asdict(recipe),
        "parameters": trainable_parameters(params),
        "train_loop_s": round(train_s, 1),
        "prepare_s": round(prepare_s, 1),
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "validation": validation,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
                   "a 2-core machine shared with other jobs (wall time is an upper bound)",
    }


@torch.no_grad()
def validation_losses(model, net: InstantBooth, injection: Injection, validation, feats, owner: np.ndarray,
                      recipe: Recipe) -> dict[str, float]:
    """Noise-prediction MSE on renders the training never drew, the same noise and timesteps for every variant:
    the adapters at scale 1 and at 0 (the concept embedding alone), and the base model prompted with the subject's
    words ("a large red circle ..."), each subject's inputs being 5 training renders of it."""
    v_mean, v_captions, v_owner = validation
    scheduler = training_scheduler(model)
    n = recipe.images_per_subject
    subject_names = [f"{c} {s}" for s, c in subjects()]
    refs = torch.from_numpy(v_owner)[:, None] * n + torch.arange(MAX_REFERENCES)[None]
    g, p = feats[0][refs], feats[1][refs]
    latents = v_mean * model.vae.config.scaling_factor
    out = {}
    for name, scale, words in (("adapter_scale_1", 1.0, False), ("adapter_scale_0", 0.0, False),
                               ("base_model_with_words", None, True)):
        gen = torch.Generator().manual_seed(sample_seed(recipe.seed, 7))
        if words:
            texts = [c.replace(IDENTIFIER, subject_names[j]) for c, j in zip(v_captions, v_owner)]
        else:
            net.set_scale(scale)
            texts = list(v_captions)
        losses = []
        for a in range(0, len(texts), 64):
            part = slice(a, a + 64)
            injection.set(None, None) if words else injection.set(net.concept_embedding(g[part]),
                                                                  net.patch_tokens(p[part]))
            losses.append(diffusion_loss(model.unet, scheduler, latents[part], encode_prompts(model, texts[part]), gen,
                                         reduction="none"))
        out[name] = float(torch.cat(losses).mean())
    net.set_scale(1.0)
    injection.set(None, None)
    return out
