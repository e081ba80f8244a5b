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

from typing import Any

from bench.clip import BATCH, EMBEDDED_BACKBONE, SCALE, clip_scores, load_clip, preflight, weights_digest
from bench.errors import BenchError
from bench.interfaces import Metric, ReferenceSet
from bench.outputs import Output

KEY = "clip_score"


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
        prompts = list(ctx.prompts)
        # a chunk of BATCH samples at a time: clip_scores' own batches, so the same bytes as on one array
        scores = ctx.map_samples(lambda a, chunk: clip_scores(model, preprocess, chunk, prompts[a : a + len(chunk)],
                                                              ctx.device), BATCH)
        return {KEY: float(scores.mean()), f"{KEY}_std": float(scores.std()) if len(scores) > 1 else 0.0}
