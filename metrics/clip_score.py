"""CLIP score (Hessel et al. 2021; Radford et al. 2021) through clip-anytorch, in torchmetrics' scale.

Per image: ``100 * max(cos(E_image(x), E_text(prompt)), 0)``; the run's value is
the mean over images (torchmetrics' ``CLIPScore``; Hessel's CLIPScore uses 2.5
instead of 100, so the scale is part of the protocol). The backbone is the data
set's: OpenAI's ViT-B/32 (or another ``clip.available_models()`` name) for real
data sets, loaded by ``clip.load`` from ``~/.cache/clip``; the embedded world's
``shapes-clip`` for shapes32, built by ``clip.model.build_model`` from its state
dict. Images go through the model's own ``clip.load`` transform (PIL bicubic
resize to the input resolution, center crop, CLIP normalization); prompts through
``clip.tokenize(truncate=True)`` at the model's context length.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from bench.errors import BenchError
from bench.interfaces import Metric, ReferenceSet
from bench.outputs import Output

KEY = "clip_score"
SCALE = 100.0
EMBEDDED_BACKBONE = "shapes-clip"
BATCH = 256


def embedded_weights() -> Path:
    from bench.models import EMBEDDED_WEIGHTS

    return EMBEDDED_WEIGHTS / "eval-clip" / "model.safetensors"


def openai_weights_path(backbone: str) -> tuple[Path, str]:
    """Where ``clip.load(backbone)`` looks for its file, and the URL it downloads from."""
    from bench.embedded.eval_clip import import_clip

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
    from bench.models import file_digest

    if backbone == EMBEDDED_BACKBONE:
        return file_digest([embedded_weights()])
    return Path(openai_weights_path(backbone)[1]).parent.name  # OpenAI's URLs carry the file's sha256


def load_clip(backbone: str, device: torch.device):
    """(model, preprocess) as ``clip.load`` returns them."""
    from bench.embedded.eval_clip import build_from_state_dict, import_clip, load_state_dict_file

    clip = import_clip()
    preflight(backbone)
    if backbone == EMBEDDED_BACKBONE:
        model = build_from_state_dict(load_state_dict_file(embedded_weights())).to(device)
        return model, clip.clip._transform(model.visual.input_resolution)
    model, preprocess = clip.load(backbone, device=device, jit=False)
    return model.float().eval(), preprocess


@torch.no_grad()
def clip_scores(model, preprocess, images_uint8: torch.Tensor, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Per-image ``100 * max(cos, 0)``; images uint8 [N, 3, H, W]."""
    from PIL import Image

    from bench.embedded.eval_clip import import_clip

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


class CLIPScore(Metric):
    name = "clip-score"
    summary = "CLIP score 100*max(cos,0) (torchmetrics scale) via clip-anytorch; the data set names the backbone"
    outputs = (
        Output(KEY, "CLIP score", "higher", ".3f", "clip-score"),
        Output(f"{KEY}_std", "CLIP score std over images", "none", ".3f", "clip-score", None),
    )
    needs_prompts = True

    def check(self, spec, reference: ReferenceSet) -> None:
        preflight(reference.clip_backbone)

    def protocol(self, spec, reference: ReferenceSet) -> dict[str, Any]:
        backbone = reference.clip_backbone
        return {
            "backbone": backbone,
            "embedded": backbone == EMBEDDED_BACKBONE,
            "weights": weights_digest(backbone),
            "scale": SCALE,
            "formula": "mean over images of 100 * max(cos(image, text), 0) (torchmetrics CLIPScore)",
            "preprocessing": "clip.load's transform: PIL bicubic resize to the input resolution, center crop, CLIP mean/std",
            "tokenizer": "clip.tokenize, the model's context length (77 for OpenAI's, 32 for shapes-clip), truncate=True",
            "prompts": reference.prompts_identity(),
        }

    def compute(self, ctx) -> dict[str, float]:
        if not ctx.prompts:
            raise BenchError("clip-score: this run has no prompts")
        model, preprocess = load_clip(ctx.reference.clip_backbone, ctx.device)
        scores = clip_scores(model, preprocess, ctx.samples, list(ctx.prompts), ctx.device)
        return {KEY: float(scores.mean()), f"{KEY}_std": float(scores.std()) if len(scores) > 1 else 0.0}
