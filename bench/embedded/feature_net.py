"""The embedded feature network: a small CNN trained to predict the renderer's attributes.

Its 64-d penultimate embedding stands in for Inception's pool3 features in FID,
KID and precision/recall on the shapes world (registered with torch-fidelity as
``shapes-cnn16``); its attribute heads give GenEval-style attribute accuracy.
Results computed with it are named as such in every protocol and never mixed
with Inception-FID.

The 32x32 network of the text-to-image world (``shapes-cnn32``, ``Recipe32``)
sees one or two objects; its heads name both object slots (left to right, the
caption's order; the second slot has a "none" class) and the object count.

Reproduce with ``bench embedded train feature-net`` (16x16) or ``bench embedded
train feature-net32``.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from bench.embedded.pool import scene_pool
from bench.embedded.shapes import (ALL_COLORS, ALL_SHAPES, BACKGROUNDS, SIZES, WorldConfig, attribute_labels,
                                   make_scenes, render_set)

FEATURE_SEED = 3  # scenes the feature network trains on
HEADS = {"shape": len(ALL_SHAPES), "color": len(ALL_COLORS), "background": len(BACKGROUNDS), "size": len(SIZES)}
# two object slots: the second slot's last class is "none" (a one-object scene)
HEADS_TWO_OBJECTS = {**HEADS, "count": 2, "shape2": len(ALL_SHAPES) + 1, "color2": len(ALL_COLORS) + 1,
                     "size2": len(SIZES) + 1}
EMBED_DIM = 64


class ShapesCNN(nn.Module):
    """uint8 or [-1, 1] images [B, 3, R, R] -> 64-d embedding and attribute logits."""

    def __init__(self, resolution: int = 16, embed_dim: int = EMBED_DIM, heads: dict[str, int] | None = None):
        super().__init__()
        self.resolution = resolution
        heads = dict(heads or HEADS)
        stem = max(1, resolution // 16)  # above 16x16 the first conv strides: the same cost as at 16x16
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1, stride=stem), nn.GELU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.GELU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.GELU(),
            nn.Conv2d(64, 128, 3, padding=1, stride=2), nn.GELU(),
            nn.Conv2d(128, 128, 3, padding=1), nn.GELU(),
        )
        self.embed = nn.Linear(128 * (resolution // (4 * stem)) ** 2, embed_dim)
        self.heads = nn.ModuleDict({k: nn.Linear(embed_dim, n) for k, n in heads.items()})
        self.position = nn.Linear(embed_dim, 2)

    def layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The activations after each conv block (for the LPIPS-style distance)."""
        out = []
        for module in self.body:
            x = module(x)
            if isinstance(module, nn.GELU):
                out.append(x)
        return out

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return F.gelu(self.embed(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        e = self.embedding(x)
        out = {k: head(e) for k, head in self.heads.items()}
        out["position"] = torch.sigmoid(self.position(e))
        out["embedding"] = e
        return out


@dataclass(frozen=True)
class Recipe:
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    threads: int = 2
    data_seed: int = FEATURE_SEED
    resolution: int = 16
    noise_aug: float = 0.1  # std of Gaussian pixel noise on half of each batch, so imperfect samples stay in range
    max_objects: int = 1
    pool_size: int = 0  # 0: fresh scenes every step; else epochs over a cached pool of rendered scenes
    blur_aug: float = 0.0  # fraction of each batch blurred (3x3 box), so soft decoder outputs stay in range
    name: str = "feature-net"


@dataclass(frozen=True)
class Recipe32(Recipe):
    """The 32x32 network of the text-to-image world (one or two objects)."""

    steps: int = 1200
    resolution: int = 32
    max_objects: int = 2
    pool_size: int = 24_000
    blur_aug: float = 0.25
    name: str = "feature-net32"


def heads_for(max_objects: int) -> dict[str, int]:
    return dict(HEADS if max_objects == 1 else HEADS_TWO_OBJECTS)


def slot_labels(scenes, max_objects: int) -> dict[str, np.ndarray]:
    """Labels of every head: the first object's attributes, and for two slots the second's (or "none")."""
    labels = attribute_labels(scenes)
    if max_objects == 1:
        return labels
    shapes, colors, sizes = list(ALL_SHAPES), list(ALL_COLORS), list(SIZES)
    second = [s.objects[1] if len(s.objects) > 1 else None for s in scenes]
    labels["count"] = np.array([len(s.objects) - 1 for s in scenes], dtype=np.int64)
    labels["shape2"] = np.array([shapes.index(o.shape) if o else len(shapes) for o in second], dtype=np.int64)
    labels["color2"] = np.array([colors.index(o.color) if o else len(colors) for o in second], dtype=np.int64)
    labels["size2"] = np.array([sizes.index(o.size) if o else len(sizes) for o in second], dtype=np.int64)
    return labels


def _blur(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def to_input(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float in [-1, 1]."""
    return images_uint8.float() / 127.5 - 1.0


def train(out_dir: Path, recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    heads = heads_for(recipe.max_objects)
    net = ShapesCNN(recipe.resolution, heads=heads)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps)
    gen = torch.Generator().manual_seed(recipe.seed)
    world = WorldConfig(recipe.resolution, max_objects=recipe.max_objects, split="all")
    t0 = time.time()
    if recipe.pool_size:
        pool_images, _ = scene_pool(recipe.data_seed, recipe.pool_size, world)
        pool_scenes = make_scenes(recipe.data_seed, range(recipe.pool_size), world)
        order = torch.randperm(recipe.pool_size * (1 + recipe.steps * recipe.batch_size // recipe.pool_size),
                               generator=gen) % recipe.pool_size
    bar = tqdm(range(recipe.steps), desc=f"train {recipe.name}", disable=not progress)
    for step in bar:
        start = step * recipe.batch_size
        if recipe.pool_size:
            idx = order[start : start + recipe.batch_size].numpy()
            images, scenes = pool_images[idx], [pool_scenes[i] for i in idx]
        else:
            images, scenes = render_set(recipe.data_seed, range(start, start + recipe.batch_size), world)
        x = to_input(torch.from_numpy(images).permute(0, 3, 1, 2))
        half = x.shape[0] // 2
        x[:half] = x[:half] + recipe.noise_aug * torch.randn(x[:half].shape, generator=gen)
        n_blur = int(recipe.blur_aug * x.shape[0])
        if n_blur:
            x[-n_blur:] = _blur(x[-n_blur:])
        labels = {k: torch.from_numpy(v) for k, v in slot_labels(scenes, recipe.max_objects).items()}
        out = net(x)
        loss = sum(F.cross_entropy(out[k], labels[k]) for k in heads) + 10 * F.mse_loss(out["position"], labels["position"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    wall = time.time() - t0
    accuracy = evaluate(net, recipe.resolution, max_objects=recipe.max_objects)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out_dir / "model.safetensors"))
    config = {"resolution": recipe.resolution, "embed_dim": EMBED_DIM, "heads": heads,
              "max_objects": recipe.max_objects,
              "feature_scale": embedding_scale(net, recipe.resolution, recipe.max_objects)}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    record = {
        "model": recipe.name,
        "command": f"bench embedded train {recipe.name}",
        "recipe": asdict(recipe),
        "parameters": sum(p.numel() for p in net.parameters()),
        "wall_time_s": round(wall, 1),
        "heldout_accuracy": accuracy,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    (out_dir / "RECIPE.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


@torch.no_grad()
def evaluate(net: ShapesCNN, resolution: int, n: int = 2000, seed: int = 99, max_objects: int = 1) -> dict[str, float]:
    """Attribute accuracy on fresh scenes (held-out values included)."""
    images, scenes = render_set(seed, range(n), WorldConfig(resolution, max_objects=max_objects, split="all"))
    out = net.eval()(to_input(torch.from_numpy(images).permute(0, 3, 1, 2)))
    labels = slot_labels(scenes, max_objects)
    acc = {k: float((out[k].argmax(1).numpy() == labels[k]).mean()) for k in net.heads}
    acc["position_mae"] = float(np.abs(out["position"].numpy() - labels["position"]).mean())
    return acc


@torch.no_grad()
def embedding_scale(net: ShapesCNN, resolution: int, max_objects: int = 1, n: int = 2000, seed: int = 98) -> float:
    """RMS of the embedding's entries over training-distribution scenes.

    The feature extractor divides by it so that FID and KID live on a unit scale (the raw
    GELU embedding has entries of about 15, which puts KID's cubic kernel near 1e8).
    """
    images, _ = render_set(seed, range(n), WorldConfig(resolution, max_objects=max_objects, split="train"))
    e = net.eval().embedding(to_input(torch.from_numpy(images).permute(0, 3, 1, 2)))
    return round(float(e.pow(2).mean().sqrt()), 6)
