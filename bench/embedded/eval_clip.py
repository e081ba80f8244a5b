"""The evaluation CLIP of the shapes world: clip-anytorch's ``clip.model.CLIP`` with small widths.

A ViT image tower (32x32 input, 4x4 patches, width 64, 3 layers) and the usual
causal text transformer (OpenAI CLIP's BPE vocabulary, width 64, 2 layers, a
context of 32 tokens: captions of the world take at most 17, and
``clip.model.build_model`` reads the context length from the state dict like every
other width), trained contrastively (Radford et al. 2021, symmetric InfoNCE) on
rendered scenes and their captions. Captions repeat within a batch (the world
has few of them), so every image-caption pair with the same caption is a
positive (multi-positive soft targets) instead of a false negative.

It scores every text-to-image run of the embedded world (CLIP score, CLIP-T,
CLIP-I), so it is trained on its own data seed with the held-out attribute values
included, and never shares weights with the generator.

Stored as ``model.safetensors`` holding the state dict of ``clip.model.CLIP`` in
the dtypes ``clip.model.build_model`` gives it (OpenAI's layout: Linear/Conv and
attention weights in float16); ``clip.model.build_model`` infers the architecture
from the keys and shapes, exactly as ``clip.load`` does for a state-dict
checkpoint, and ``export_for_clip_load`` writes the same state dict as a file that
``clip.load(path, jit=False)`` reads. Rows of the token embedding whose tokens
never occur in the training captions are zero (they carry no trained
information; a zeroed file says so and compresses).

Reproduce with ``bench embedded train eval-clip``.
"""

from __future__ import annotations

import copy
import json
import platform
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from bench.embedded.feature_net import _blur
from bench.embedded.pool import scene_pool
from bench.embedded.shapes import WorldConfig, render_set

CLIP_SEED = 5  # scenes the evaluation CLIP trains on
HELDOUT_SEED = 98  # scenes its retrieval accuracy is measured on
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # clip's _transform
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NAME = "shapes-clip"


def import_clip():
    with warnings.catch_warnings():  # clip-anytorch imports pkg_resources
        warnings.simplefilter("ignore")
        import clip
        import clip.model
    return clip


@dataclass(frozen=True)
class Recipe:
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = 1  # on the shared 2-core machine, 2 spinning OpenMP threads ran 5-9x slower than 1
    data_seed: int = CLIP_SEED
    pool_size: int = 20_000
    resolution: int = 32
    context_length: int = 32
    max_objects: int = 2
    embed_dim: int = 64
    vision_width: int = 64  # clip infers heads as width // 64
    vision_layers: int = 3
    patch_size: int = 4
    text_width: int = 64
    text_layers: int = 2
    noise_aug: float = 0.08  # Gaussian pixel noise on half of each batch (generated images are imperfect)
    blur_aug: float = 0.25  # fraction of each batch blurred (soft decoder outputs)


def build(recipe: Recipe):
    clip = import_clip()
    return clip.model.CLIP(
        recipe.embed_dim, recipe.resolution, recipe.vision_layers, recipe.vision_width, recipe.patch_size,
        recipe.context_length, 49408, recipe.text_width, recipe.text_width // 64, recipe.text_layers,
    )


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> clip's normalized input (ToTensor then Normalize with CLIP's mean and std)."""
    x = images_uint8.float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def tokenize(texts: list[str], context_length: int = 77) -> torch.Tensor:
    return import_clip().tokenize(texts, context_length=context_length, truncate=True)


def contrastive_loss(model, images: torch.Tensor, tokens: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE with every same-caption pair as a positive."""
    logits_per_image, logits_per_text = model(images, tokens)
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    cid = torch.tensor([ids[c] for c in captions])
    same = (cid[:, None] == cid[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    loss_i = -(targets * F.log_softmax(logits_per_image, 1)).sum(1).mean()
    loss_t = -(targets * F.log_softmax(logits_per_text, 1)).sum(1).mean()
    return (loss_i + loss_t) / 2


def stored_state_dict(model, used_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state dict in the dtypes clip's build_model gives, token rows never trained zeroed."""
    clip = import_clip()

    m = copy.deepcopy(model)
    clip.model.convert_weights(m)
    state = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
    emb = state["token_embedding.weight"]
    keep = torch.zeros(emb.shape[0], dtype=torch.bool)
    keep[used_tokens] = True
    emb[~keep] = 0
    state["token_embedding.weight"] = emb.half()
    return state


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def build_from_state_dict(state: dict[str, torch.Tensor]):
    """``clip.model.build_model``: the function ``clip.load`` builds a state-dict checkpoint with."""
    clip = import_clip()
    return clip.model.build_model(dict(state)).float().eval().requires_grad_(False)


def export_for_clip_load(weights: Path, out: Path) -> Path:
    """Write the state dict as a ``torch.save`` file that ``clip.load(out, jit=False)`` reads (weights only)."""
    torch.save(load_state_dict_file(weights), str(out))
    return out


@torch.no_grad()
def retrieval_accuracy(model, n: int = 1000, seed: int = HELDOUT_SEED, resolution: int = 32,
                       max_objects: int = 2) -> dict[str, float]:
    """Held-out scenes: is an image's own caption the nearest among the distinct captions of the set?"""
    model = model.eval()
    images, scenes = render_set(seed, range(n), WorldConfig(resolution, max_objects=max_objects, split="all"))
    captions = [s.caption for s in scenes]
    candidates = list(dict.fromkeys(captions))
    image_emb = F.normalize(model.encode_image(normalize(torch.from_numpy(images).permute(0, 3, 1, 2))).float(), dim=-1)
    n_ctx = model.context_length
    text_emb = torch.cat([model.encode_text(tokenize(candidates[i : i + 500], n_ctx)).float()
                          for i in range(0, len(candidates), 500)])
    text_emb = F.normalize(text_emb, dim=-1)
    sims = image_emb @ text_emb.T
    target = torch.tensor([candidates.index(c) for c in captions])
    top5 = sims.topk(min(5, len(candidates)), dim=1).indices
    # within random batches of 100 (the protocol of a retrieval benchmark with 100 candidates)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    hits = []
    for a in range(0, n - 99, 100):
        idx = perm[a : a + 100]
        sub = image_emb[idx] @ F.normalize(model.encode_text(tokenize([captions[i] for i in idx], n_ctx)).float(), dim=-1).T
        same = torch.tensor([[captions[i] == captions[j] for j in idx] for i in idx])
        hits.append(same[torch.arange(100), sub.argmax(1)].float().mean())
    return {
        "heldout_scenes": n,
        "distinct_captions": len(candidates),
        "image_to_caption_top1": float((sims.argmax(1) == target).float().mean()),
        "image_to_caption_top5": float((top5 == target[:, None]).any(1).float().mean()),
        "image_to_caption_top1_in_batches_of_100": float(torch.stack(hits).mean()),
    }


def train(out_dir: Path, recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    model = build(recipe).float()
    world = WorldConfig(recipe.resolution, max_objects=recipe.max_objects, split="all")
    t0 = time.time()
    pool_images, pool_scenes = scene_pool(recipe.data_seed, recipe.pool_size, world)
    captions = [s.caption for s in pool_scenes]
    tokens = tokenize(captions, recipe.context_length)
    render_s = time.time() - t0
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        frac = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return 0.5 * (1 + np.cos(np.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(recipe.seed)
    epochs = 1 + recipe.steps * recipe.batch_size // recipe.pool_size
    order = torch.cat([torch.randperm(recipe.pool_size, generator=gen) for _ in range(epochs)])
    losses = []
    bar = tqdm(range(recipe.steps), desc="train eval-clip", disable=not progress)
    for step in bar:
        idx = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
        x = normalize(torch.from_numpy(pool_images[idx.numpy()]).permute(0, 3, 1, 2))
        half = x.shape[0] // 2
        x[:half] += recipe.noise_aug / 0.27 * torch.randn(x[:half].shape, generator=gen)  # noise_aug in [0, 1] units
        n_blur = int(recipe.blur_aug * x.shape[0])
        if n_blur:
            x[-n_blur:] = _blur(x[-n_blur:])
        loss = contrastive_loss(model, x, tokens[idx], [captions[i] for i in idx.tolist()])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    wall = time.time() - t0
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = stored_state_dict(model, torch.unique(tokens))
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "clip.model.CLIP state dict"})
    loaded = build_from_state_dict(load_state_dict_file(out_dir / "model.safetensors"))
    accuracy = retrieval_accuracy(loaded, resolution=recipe.resolution, max_objects=recipe.max_objects)
    record = {
        "model": "eval-clip",
        "command": "bench embedded train eval-clip",
        "architecture": "clip.model.CLIP (ViT image tower), built by clip.model.build_model from the state dict",
        "recipe": asdict(recipe),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trained_token_rows": int(torch.unique(tokens).numel()),
        "wall_time_s": round(wall, 1),
        "render_pool_s": round(render_s, 1),
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "heldout_retrieval": accuracy,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; ran under "
        "nice -n 10 on a 2-core machine shared with other training jobs (wall time is an upper bound)",
    }
    (out_dir / "RECIPE.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
