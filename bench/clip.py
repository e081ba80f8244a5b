"""CLIP through clip-anytorch: the backbone's weights, loading, and per-image CLIP scores.

Used by the CLIP-score metrics (metrics.clip_score, metrics.personalization, metrics.editing) and by the
alignment rewards (bench.alignment). ``SCALE``: torchmetrics' 100 * max(cos, 0).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from bench import reuse
from bench.embedded.eval_clip import build_from_state_dict, import_clip, load_state_dict_file
from bench.errors import BenchError
from bench.files import file_digest
from bench.models import EMBEDDED_WEIGHTS

SCALE = 100.0
EMBEDDED_BACKBONE = "shapes-clip"
BATCH = 256


def embedded_weights() -> Path:
    return EMBEDDED_WEIGHTS / "eval-clip" / "model.safetensors"


def openai_weights_path(backbone: str) -> tuple[Path, str]:
    """Where ``clip.load(backbone)`` looks for its file, and the URL it downloads from."""
    clip = import_clip()
    if backbone not in clip.clip._MODELS:
        raise BenchError(f"unknown CLIP backbone {backbone!r} (known: {', '.join(clip.available_models())}, {EMBEDDED_BACKBONE})")
    url = clip.clip._MODELS[backbone]
    return Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url), url


def preflight(backbone: str) -> None:
    if backbone == EMBEDDED_BACKBONE:
        if not embedded_weights().exists():
            raise BenchError(f"the evaluation CLIP is missing ({embedded_weights()}); rebuild it with `bench embedded train eval-clip`")
        return
    path, url = openai_weights_path(backbone)
    if not path.exists():
        raise BenchError(f"OpenAI CLIP {backbone} weights are not at {path}: download {url} into {path.parent} "
                         f"(clip.load does so where online)")


def weights_digest(backbone: str) -> str:
    if backbone == EMBEDDED_BACKBONE:
        return file_digest([embedded_weights()])
    return Path(openai_weights_path(backbone)[1]).parent.name  # OpenAI's URLs carry the file's sha256


def load_clip(backbone: str, device: torch.device):
    """(model, preprocess) as ``clip.load`` returns them; loaded once per process and device and shared
    (bench.reuse): callers only read it (scores, rewards, a frozen loss)."""
    preflight(backbone)
    key = ("clip", backbone, weights_digest(backbone), str(torch.device(device)))
    return reuse.shared(key, lambda: _load_clip(backbone, device))


def _load_clip(backbone: str, device: torch.device):
    clip = import_clip()
    if backbone == EMBEDDED_BACKBONE:
        model = build_from_state_dict(load_state_dict_file(embedded_weights())).to(device)
        return model, clip.clip._transform(model.visual.input_resolution)
    model, preprocess = clip.load(backbone, device=device, jit=False)
    return model.float().eval(), preprocess


@torch.no_grad()
def clip_scores(model, preprocess, images_uint8: torch.Tensor, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Per-image ``100 * max(cos, 0)``; images uint8 [N, 3, H, W]."""
    clip = import_clip()
    out = []
    for a in range(0, len(images_uint8), BATCH):
        batch = images_uint8[a : a + BATCH].permute(0, 2, 3, 1).numpy()
        pixels = torch.stack([preprocess(Image.fromarray(im)) for im in batch]).to(device)
        tokens = clip.tokenize(prompts[a : a + BATCH], context_length=model.context_length, truncate=True).to(device)
        img = model.encode_image(pixels).float()
        txt = model.encode_text(tokens).float()
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        out.append(SCALE * cos.clamp(min=0).cpu())
    return torch.cat(out)
