"""The embedded feedback world of the alignment methods: Lee et al. 2023's setting in miniature.

- **Prompts in users' words.** Every training caption of the embedded text-to-image model names
  each object's size ("a small red circle ..."); users' prompts, like Lee et al.'s ("two dogs",
  "a green dog", "a dog in the city"), name only count, color and background:
  ``"a red circle and a blue square on a white background"``. Every word is in the model's
  vocabulary, yet the base model follows these prompts much worse than its training captions
  (``docs/alignment.md`` has the measured rates): the gap that feedback closes.
- **Training and held-out prompts.** A prompt belongs to the held-out split iff the first 8 hex
  digits of sha256(prompt) are 0 mod 5 (about 20% of the 1,368 possible prompts); training prompts
  come from scenes of seed 11, held-out prompts (data set ``shapes32-heldout``) from seed 12.
- **The simulated human** (``judge``) answers Lee et al.'s question, "does the image show what the
  prompt says?", for count, color and background, from the pixels and the renderer's palette only:
  the background is the palette color nearest the median of the border pixels; every pixel is
  un-mixed against that background (the renderer anti-aliases by box filtering, so a pixel is
  ``alpha color + (1 - alpha) background``) and counts as object color c when c explains it best
  with ``alpha >= 0.5``; objects are connected regions of one color of at least 10 pixels, ordered
  left to right as the caption orders them. It never looks at a learned network, so it is a
  different judge from the evaluation's (the feature network's attribute heads). On 2,000 rendered
  scenes it agrees with the ground truth on 100% of backgrounds and 92.5% of counts and colors: it
  sees two overlapping objects of the same color as one (a blind spot, like a hurried human's).
- **Feedback data** (``bench embedded train feedback``): the base model (CFG 7.5, DDIM 20 steps)
  draws ``images_per_prompt`` images for each of ``prompts`` training prompts; the judge labels
  them. Their final latents, prompts and labels are committed (the "human-labeled data set").
- **The reward model** (``RewardNet``): a small CNN over the image and a one-layer transformer over
  the prompt's words, trained from the binary labels only, as Lee et al. train theirs: the squared
  error between ``r(x, z)`` and the label, plus the auxiliary prompt-classification term (Sec. 3.2:
  for an image labeled good, the true prompt must score above perturbed prompts: another color,
  background or count) with weight ``pc_weight``. It is validated on held-out prompts' images.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file
from scipy import ndimage

from bench.embedded.shapes import (ALL_COLORS, ALL_SHAPES, BACKGROUNDS, COLORS, SHAPES, SIZES, Scene, WorldConfig,
                                   sample_scene, scene_rng)
from bench.errors import BenchError
from bench.images import to_uint8

TRAIN_PROMPT_SEED = 11
HELDOUT_PROMPT_SEED = 12
FEEDBACK_IMAGE_SEED = 13  # per-image seeds of the feedback data: sample_seed(13, i)
VALIDATION_IMAGE_SEED = 14
HELDOUT_MODULUS = 5
WORLD = WorldConfig(resolution=32, max_objects=2, split="train")
FEEDBACK_FILE = "feedback.safetensors"
FEEDBACK_META = "feedback.json"
REWARD_FILE = "reward.safetensors"
REWARD_CONFIG = "reward.json"

PALETTE = np.array(list(COLORS.values()), dtype=np.float64)
PALETTE_NAMES = tuple(COLORS)
BACKDROPS = np.array(list(BACKGROUNDS.values()), dtype=np.float64)
BACKDROP_NAMES = tuple(BACKGROUNDS)
MIN_ALPHA = 0.5
MIN_AREA = 10
JUDGED = ("background", "count", "color")


# -- prompts --------------------------------------------------------------------------------------------------------------
def user_prompt(scene: Scene) -> tuple[str, dict[str, Any]]:
    """The prompt a user would write for ``scene`` (no sizes) and its target attributes (no sizes either)."""
    text = " and ".join(f"a {o.color} {o.shape}" for o in scene.objects) + f" on a {scene.background} background"
    target = {"background": scene.background, "count": len(scene.objects),
              "objects": [{"shape": o.shape, "color": o.color} for o in scene.objects]}
    return text, target


def is_heldout(text: str) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % HELDOUT_MODULUS == 0


def prompts(split: str, n: int, distinct: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """The first ``n`` prompts of a split ("train": seed 11, "heldout": seed 12): the world's one/two-object mix with
    repeats, or ``distinct`` prompts (mostly two-object ones: there are only 72 one-object prompts in all)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be train or heldout, got {split!r}")
    seed = TRAIN_PROMPT_SEED if split == "train" else HELDOUT_PROMPT_SEED
    out: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    i = 0
    while len(out) < n:
        text, target = user_prompt(sample_scene(scene_rng(seed, i), WORLD))
        if is_heldout(text) == (split == "heldout") and not (distinct and text in seen):
            out.append((text, target))
            seen.add(text)
        i += 1
    return out


def perturb(target: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Another prompt's target: one color, the background or the count changed (Lee et al.'s augmentation)."""
    objects = [dict(o) for o in target["objects"]]
    background = target["background"]
    kind = rng.choice(("color", "background", "count"))
    if kind == "color":
        o = objects[int(rng.integers(len(objects)))]
        o["color"] = str(rng.choice([c for c in COLORS if c != o["color"]]))
    elif kind == "background":
        background = str(rng.choice([b for b in BACKGROUNDS if b != background]))
    elif len(objects) == 2:
        objects = [objects[int(rng.integers(2))]]
    else:
        objects.append({"shape": str(rng.choice(SHAPES)), "color": str(rng.choice(tuple(COLORS)))})
    return {"background": background, "count": len(objects), "objects": objects}


def prompt_text(target: Mapping[str, Any]) -> str:
    return " and ".join(f"a {o['color']} {o['shape']}" for o in target["objects"]) + f" on a {target['background']} background"


def parse_prompt(text: str) -> dict[str, Any]:
    """The target of a user prompt (``prompt_text``'s inverse): what the judges check an image against.

    A prompt that is not in the world's template raises ``ValueError``.
    """
    objects_part, sep, rest = text.partition(" on a ")
    background = rest[: -len(" background")] if rest.endswith(" background") else None
    objects = []
    for phrase in objects_part.split(" and ") if sep else ():
        words = phrase.split()
        if len(words) == 3 and words[0] == "a" and words[1] in ALL_COLORS and words[2] in ALL_SHAPES:
            objects.append({"shape": words[2], "color": words[1]})
    if background not in BACKGROUNDS or not objects or len(objects) != len(objects_part.split(" and ")):
        raise ValueError(f"not a prompt of the feedback world: {text!r}")
    return {"background": background, "count": len(objects), "objects": objects}


# -- the simulated human -----------------------------------------------------------------------------------------------
def read_scene(image: np.ndarray) -> tuple[str, list[str]]:
    """(background, object colors left to right) of one uint8 [H, W, 3] image, from its pixels."""
    img = image.astype(np.float64)
    ring = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    b = int(np.argmin(((BACKDROPS - np.median(ring, 0)) ** 2).sum(1)))
    direction = PALETTE - BACKDROPS[b]  # [C, 3]
    offset = img[:, :, None, :] - BACKDROPS[b]  # [H, W, 1, 3]
    alpha = np.clip((offset * direction).sum(-1) / (direction * direction).sum(-1), 0.0, 1.0)  # [H, W, C]
    residual = ((offset - alpha[..., None] * direction) ** 2).sum(-1)
    best = residual.argmin(-1)
    foreground = np.take_along_axis(alpha, best[..., None], -1)[..., 0] >= MIN_ALPHA
    found = []
    for c, name in enumerate(PALETTE_NAMES):
        labels, n = ndimage.label(foreground & (best == c))
        for k in range(1, n + 1):
            region = labels == k
            if region.sum() >= MIN_AREA:
                found.append((float(ndimage.center_of_mass(region)[1]), name))
    return BACKDROP_NAMES[b], [name for _, name in sorted(found)]


def judge(images_uint8: np.ndarray, targets: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """The simulated human's verdicts on uint8 [N, H, W, 3] images: per judged attribute and ``label`` (all right)."""
    verdict = {k: np.zeros(len(targets), dtype=bool) for k in JUDGED}
    for i, (image, target) in enumerate(zip(images_uint8, targets)):
        background, colors = read_scene(image)
        wanted = [o["color"] for o in target["objects"]]
        verdict["background"][i] = background == target["background"]
        verdict["count"][i] = len(colors) == len(wanted)
        verdict["color"][i] = colors == wanted
    verdict["label"] = verdict["background"] & verdict["count"] & verdict["color"]
    return verdict


# -- the reward model ----------------------------------------------------------------------------------------------------
WORDS = ("<pad>", "<unk>", "a", "and", "on", "background", *SIZES, *ALL_SHAPES, *ALL_COLORS, *BACKGROUNDS)
MAX_WORDS = 16


def word_ids(texts: Sequence[str]) -> torch.Tensor:
    """Word-level ids [B, 16] over the world's vocabulary (unknown words: <unk>; longer prompts truncated)."""
    index = {w: i for i, w in enumerate(WORDS)}
    out = torch.zeros(len(texts), MAX_WORDS, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [index.get(w, 1) for w in text.lower().replace(",", " ").split()][:MAX_WORDS]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


class RewardNet(nn.Module):
    """r(x, z): images in [-1, 1] [B, 3, 32, 32] and prompts' word ids [B, 16] -> logit of "the image matches"."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.image = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(32, width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GELU(),
            nn.Flatten(), nn.Linear(width * 16, 2 * width),
        )
        self.words = nn.Embedding(len(WORDS), width, padding_idx=0)
        self.position = nn.Parameter(torch.randn(MAX_WORDS, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.text = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.text_out = nn.Linear(width, 2 * width)
        self.head = nn.Sequential(nn.Linear(6 * width, 2 * width), nn.GELU(), nn.Linear(2 * width, 1))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == 0
        h = self.text(self.words(ids) + self.position, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return self.text_out((h * keep).sum(1) / keep.sum(1).clamp(min=1))

    def score(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        i, t = image_features, text_features
        return self.head(torch.cat([i, t, i * t], dim=-1)).squeeze(-1)

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.score(self.image(images), self.encode_text(ids))


def load_reward_net(folder: Path) -> RewardNet:
    try:
        config = json.loads((Path(folder) / REWARD_CONFIG).read_text())
        net = RewardNet(config["width"])
        net.load_state_dict(load_file(str(Path(folder) / REWARD_FILE)))
    except Exception as exc:  # missing, truncated or mismatched files
        raise BenchError(f"cannot load the embedded reward model from {folder} ({type(exc).__name__}); "
                         f"rebuild it with `bench embedded train feedback`") from None
    return net.eval().requires_grad_(False)


@torch.no_grad()
def decode(model, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """uint8 [N, 3, H, W] images of scaled latents, rounded as the runner rounds samples."""
    vae = model.vae
    param = next(vae.parameters())
    out = []
    for a in range(0, len(latents), batch):
        x = vae.decode(latents[a : a + batch].to(param.device, param.dtype) / vae.config.scaling_factor).sample
        out.append(torch.from_numpy(to_uint8(x.float().clamp(-1, 1))).permute(0, 3, 1, 2))
    return torch.cat(out).contiguous()
