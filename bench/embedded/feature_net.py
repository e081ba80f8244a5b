"""The embedded feature network: a small CNN trained to predict the renderer's attributes.

Its 64-d penultimate embedding stands in for Inception's pool3 features in FID,
KID and precision/recall on the shapes world (registered with torch-fidelity as
``shapes-cnn16``); its attribute heads give GenEval-style attribute accuracy.
Results computed with it are named as such in every protocol and never mixed
with Inception-FID.

Reproduce with ``bench embedded train feature-net``.
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

from bench.embedded.shapes import ALL_COLORS, ALL_SHAPES, BACKGROUNDS, SIZES, WorldConfig, attribute_labels, render_set

FEATURE_SEED = 3  # scenes the feature network trains on
HEADS = {"shape": len(ALL_SHAPES), "color": len(ALL_COLORS), "background": len(BACKGROUNDS), "size": len(SIZES)}
EMBED_DIM = 64


class ShapesCNN(nn.Module):
    """uint8 or [-1, 1] images [B, 3, R, R] -> 64-d embedding and attribute logits."""

    def __init__(self, resolution: int = 16, embed_dim: int = EMBED_DIM):
        super().__init__()
        self.resolution = resolution
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.GELU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.GELU(),
            nn.Conv2d(64, 128, 3, padding=1, stride=2), nn.GELU(),
            nn.Conv2d(128, 128, 3, padding=1), nn.GELU(),
        )
        self.embed = nn.Linear(128 * (resolution // 4) ** 2, embed_dim)
        self.heads = nn.ModuleDict({k: nn.Linear(embed_dim, n) for k, n in HEADS.items()})
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


def to_input(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float in [-1, 1]."""
    return images_uint8.float() / 127.5 - 1.0


def train(out_dir: Path, recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    net = ShapesCNN(recipe.resolution)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps)
    gen = torch.Generator().manual_seed(recipe.seed)
    world = WorldConfig(recipe.resolution, max_objects=1, split="all")
    t0 = time.time()
    bar = tqdm(range(recipe.steps), desc="train feature-net", disable=not progress)
    for step in bar:
        start = step * recipe.batch_size
        images, scenes = render_set(recipe.data_seed, range(start, start + recipe.batch_size), world)
        x = to_input(torch.from_numpy(images).permute(0, 3, 1, 2))
        half = x.shape[0] // 2
        x[:half] = x[:half] + recipe.noise_aug * torch.randn(x[:half].shape, generator=gen)
        labels = {k: torch.from_numpy(v) for k, v in attribute_labels(scenes).items()}
        out = net(x)
        loss = sum(F.cross_entropy(out[k], labels[k]) for k in HEADS) + 10 * F.mse_loss(out["position"], labels["position"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    wall = time.time() - t0
    accuracy = evaluate(net, recipe.resolution)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out_dir / "model.safetensors"))
    config = {"resolution": recipe.resolution, "embed_dim": EMBED_DIM, "heads": HEADS}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    record = {
        "model": "feature-net",
        "command": "bench embedded train feature-net",
        "recipe": asdict(recipe),
        "parameters": sum(p.numel() for p in net.parameters()),
        "wall_time_s": round(wall, 1),
        "heldout_accuracy": accuracy,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    (out_dir / "RECIPE.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


@torch.no_grad()
def evaluate(net: ShapesCNN, resolution: int, n: int = 2000, seed: int = 99) -> dict[str, float]:
    """Attribute accuracy on fresh scenes (held-out values included)."""
    images, scenes = render_set(seed, range(n), WorldConfig(resolution, max_objects=1, split="all"))
    out = net.eval()(to_input(torch.from_numpy(images).permute(0, 3, 1, 2)))
    labels = attribute_labels(scenes)
    acc = {k: float((out[k].argmax(1).numpy() == labels[k]).mean()) for k in HEADS}
    acc["position_mae"] = float(np.abs(out["position"].numpy() - labels["position"]).mean())
    return acc
