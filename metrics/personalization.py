"""DreamBench's metrics (Ruiz et al. 2023, Sec. 4.1): CLIP-I, CLIP-T and DINO; and prior drift.

- ``clip-i`` (subject fidelity): the mean cosine similarity between the CLIP image embeddings of
  each generated image and of every real image of its subject.
- ``clip-t`` (prompt fidelity): the mean cosine similarity between the CLIP embeddings of each
  generated image and of its prompt, with the class noun in place of the subject (the subject's
  identifier means nothing to CLIP).
- ``dino`` (subject fidelity, the paper's preferred one: it tells apart subjects of one class):
  the mean cosine similarity of self-supervised image embeddings, generated against real. Real
  data sets: DINO ViT-S/16's [CLS] embedding (``facebook/dino-vits16`` through transformers).
  The embedded world: the ``shapes-cnn32`` feature network's 64-d embedding ("DINO-style":
  it is trained on the renderer's attributes, not self-supervised; the protocol says so), recorded
  as ``subject_sim_shapes_cnn32`` (and ``subject_sim_shapes_cnn32_real``), not ``dino``, so that
  nobody compares it with a paper's DINO score.

Each also reports the same similarity among the subject's own real images (``*_real``: every
pair of distinct images), the ceiling a perfect method would reach (the paper's "Real Images" row).
CLIP scores use the data set's CLIP (``shapes-clip`` on the embedded world, ViT-B/32 on
DreamBench) and clip's own preprocessing; cosines are reported raw (DreamBench's scale, not
CLIP score's 100x).

Prior drift (``prior_drift``) is not a stage over a run's samples: it compares the model before
and after fine-tuning, so the personalization methods measure it in ``prepare`` with
``frechet_distance`` and ``heldout_rate`` below (methods/personalization.py defines it).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.utils import get_featuresdict_from_dataset
from transformers import AutoImageProcessor, ViTModel

from bench.clip import EMBEDDED_BACKBONE, load_clip, preflight, weights_digest
from bench.embedded.eval_clip import import_clip
from bench.embedded.feature_extractor import WEIGHTS_DIR32, load_network
from bench.embedded.feature_net import to_input
from bench.embedded.shapes import ALL_COLORS, ALL_SHAPES, HELDOUT_COLORS, HELDOUT_SHAPES
from bench.errors import BenchError
from bench.evaluation import UInt8Images, feature_extractor
from bench.extractors import EXTRACTORS, shapes_digest
from bench.interfaces import Metric, ReferenceSet
from bench.models import resolve_folder
from bench.outputs import Output
from bench.personalization import PersonalizationSet
from metrics.attribute_accuracy import predict
from metrics.attribute_accuracy import BATCH as NET_BATCH

DINO_HUB_ID = "facebook/dino-vits16"
EMBEDDED_DINO = "shapes-cnn32"
KEY_DINO, KEY_EMBEDDED = "dino", "subject_sim_shapes_cnn32"  # the key names the network that computed it
BATCH = 256


def _subjects_by_name(reference: ReferenceSet) -> dict[str, Any]:
    if not isinstance(reference, PersonalizationSet):
        raise BenchError(f"data set {reference.name} is not a personalization data set (use embedded-concepts or dreambench)")
    return {s.name: s for s in reference.subjects()}


def _check_personalization(name: str, reference: ReferenceSet) -> None:
    if not isinstance(reference, PersonalizationSet):
        raise BenchError(f"metric {name} needs a personalization data set (subjects with images), not {reference.name}")


def _subject_of_samples(ctx) -> list[str | None]:
    if ctx.targets is None:
        raise BenchError("personalization metrics need per-sample targets naming each sample's subject")
    return [t.get("subject") if t else None for t in ctx.targets]


def mean_similarity(generated: torch.Tensor, real: torch.Tensor) -> float:
    """Mean cosine similarity over every (generated, real) pair of embeddings."""
    g = torch.nn.functional.normalize(generated.double(), dim=-1)
    r = torch.nn.functional.normalize(real.double(), dim=-1)
    return float((g @ r.T).mean())


def mean_pairwise_similarity(real: torch.Tensor) -> float:
    """Mean cosine similarity over pairs of distinct embeddings (NaN with one)."""
    if len(real) < 2:
        return float("nan")
    r = torch.nn.functional.normalize(real.double(), dim=-1)
    sim = r @ r.T
    n = len(r)
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def subject_fidelity(embed, samples: torch.Tensor, subject_of_sample: Sequence[str | None],
                     subjects: dict[str, Any]) -> tuple[float, float]:
    """(mean over samples of the similarity to their subject's real images, mean pairwise among real images).

    ``samples``: uint8 [N, 3, H, W], or a function from sample indices to those samples (EvalContext.take_samples:
    read from the shards)."""
    take = (lambda ix: samples[ix]) if torch.is_tensor(samples) else samples
    scores, ceilings = [], []
    names = [n for n in dict.fromkeys(subject_of_sample) if n is not None]
    if not names:
        raise BenchError("no sample names a subject")
    for name in names:
        idx = [i for i, n in enumerate(subject_of_sample) if n == name]
        if name not in subjects:
            raise BenchError(f"sample names subject {name!r}, which the data set does not have")
        real = embed(subjects[name].images_tensor())
        # the subject's samples a group of the embedder's batch at a time (its own batches: the same bytes)
        step = getattr(embed, "batch", None) or max(len(idx), 1)
        gen = torch.cat([embed(take(idx[a : a + step])) for a in range(0, len(idx), step)])
        g = torch.nn.functional.normalize(gen.double(), dim=-1)
        r = torch.nn.functional.normalize(real.double(), dim=-1)
        scores.append((g @ r.T).mean(dim=1))
        ceilings.append(mean_pairwise_similarity(real))
    return float(torch.cat(scores).mean()), float(np.nanmean(ceilings))


# -- CLIP ---------------------------------------------------------------------------------------------------------------
def clip_image_embedder(backbone: str, device: torch.device):
    model, preprocess = load_clip(backbone, device)

    @torch.no_grad()
    def embed(images_uint8: torch.Tensor) -> torch.Tensor:
        out = []
        for a in range(0, len(images_uint8), BATCH):
            batch = images_uint8[a : a + BATCH].permute(0, 2, 3, 1).numpy()
            pixels = torch.stack([preprocess(Image.fromarray(im)) for im in batch]).to(device)
            out.append(model.encode_image(pixels).float().cpu())
        return torch.cat(out)

    embed.batch = BATCH  # its batches: subject_fidelity reads samples in groups of as many
    return model, embed


class _CLIPMetric(Metric):
    needs_prompts = True
    needs_targets = True

    def check(self, spec, reference: ReferenceSet) -> None:
        _check_personalization(self.name, reference)
        preflight(reference.clip_backbone)

    def protocol(self, spec, reference: ReferenceSet) -> dict[str, Any]:
        return {"backbone": reference.clip_backbone, "embedded": reference.clip_backbone == EMBEDDED_BACKBONE,
                "weights": weights_digest(reference.clip_backbone), "scale": "raw cosine (DreamBench)",
                "preprocessing": "clip.load's transform", "formula": self.formula, "subjects": reference.identity()}


class CLIPI(_CLIPMetric):
    name = "clip-i"
    summary = "CLIP-I (DreamBench subject fidelity): mean CLIP image-image cosine, generated vs the subject's real images"
    outputs = (
        Output("clip_i", "CLIP-I (cos)", "higher", ".3f", "clip-i"),
        Output("clip_i_real", "CLIP-I among real images", "none", ".3f", "clip-i", None),
    )
    formula = "mean over samples and the subject's real images of cos(E_img(generated), E_img(real))"

    def compute(self, ctx) -> dict[str, float]:
        _, embed = clip_image_embedder(ctx.reference.clip_backbone, ctx.device)
        score, ceiling = subject_fidelity(embed, ctx.take_samples, _subject_of_samples(ctx), _subjects_by_name(ctx.reference))
        return {"clip_i": score, "clip_i_real": ceiling}


class CLIPT(_CLIPMetric):
    name = "clip-t"
    summary = "CLIP-T (DreamBench prompt fidelity): mean CLIP image-text cosine, the prompt with the class noun"
    outputs = (Output("clip_t", "CLIP-T (cos)", "higher", ".3f", "clip-t"),)
    formula = "mean over samples of cos(E_img(generated), E_txt(prompt with the class noun for the subject))"

    def compute(self, ctx) -> dict[str, float]:
        model, embed = clip_image_embedder(ctx.reference.clip_backbone, ctx.device)
        texts = [t.get("clip_t_text") if t else None for t in ctx.targets or [None] * ctx.num_samples]
        keep = [i for i, t in enumerate(texts) if t]
        if not keep:
            raise BenchError("clip-t: no sample has a class-noun prompt (clip_t_text)")
        clip = import_clip()
        # BATCH kept samples at a time (the embedder's batches): the same bytes as on one array
        image = torch.cat([embed(ctx.take_samples(keep[a : a + BATCH])) for a in range(0, len(keep), BATCH)])
        with torch.no_grad():
            tokens = clip.tokenize([texts[i] for i in keep], context_length=model.context_length, truncate=True)
            text = torch.cat([model.encode_text(tokens[a : a + BATCH].to(ctx.device)).float().cpu()
                              for a in range(0, len(tokens), BATCH)])
        cos = torch.nn.functional.cosine_similarity(image.double(), text.double(), dim=-1)
        return {"clip_t": float(cos.mean())}


# -- DINO -----------------------------------------------------------------------------------------------------------------
def dino_backbone(reference: ReferenceSet) -> str:
    return EMBEDDED_DINO if reference.embedded else DINO_HUB_ID


def dino_embedder(backbone: str, device: torch.device):
    """uint8 [N, 3, H, W] -> embeddings: the feature network's (embedded) or DINO ViT-S/16's [CLS] token."""
    if backbone == EMBEDDED_DINO:
        net = load_network(WEIGHTS_DIR32).to(device)

        @torch.no_grad()
        def embed(images_uint8: torch.Tensor) -> torch.Tensor:
            return torch.cat([net(to_input(images_uint8[a : a + NET_BATCH]).to(device))["embedding"].cpu()
                              for a in range(0, len(images_uint8), NET_BATCH)])

        embed.batch = NET_BATCH
        return embed

    folder = resolve_folder(backbone)
    try:
        processor = AutoImageProcessor.from_pretrained(folder)
        model = ViTModel.from_pretrained(folder, add_pooling_layer=False).to(device).eval()
    except Exception as exc:
        raise BenchError(f"cannot load DINO from {folder}: {type(exc).__name__}: {exc}".splitlines()[0]) from None

    @torch.no_grad()
    def embed(images_uint8: torch.Tensor) -> torch.Tensor:
        out = []
        for a in range(0, len(images_uint8), BATCH):
            inputs = processor(images=list(images_uint8[a : a + BATCH].permute(0, 2, 3, 1).numpy()), return_tensors="pt")
            out.append(model(pixel_values=inputs["pixel_values"].to(device)).last_hidden_state[:, 0].float().cpu())
        return torch.cat(out)

    embed.batch = BATCH
    return embed


class DINO(Metric):
    name = "dino"
    summary = ("DINO score (DreamBench subject fidelity): mean cosine of DINO ViT-S/16 embeddings, generated vs real; "
               "the feature network's on the embedded world")
    outputs = (
        Output(KEY_DINO, "DINO (ViT-S/16, cos)", "higher", ".3f", "dino"),
        Output(f"{KEY_DINO}_real", "DINO among real images", "none", ".3f", "dino", None),
        Output(KEY_EMBEDDED, "subject similarity (shapes-cnn32, cos)", "higher", ".3f", "dino"),
        Output(f"{KEY_EMBEDDED}_real", "subject similarity among real images (shapes-cnn32)", "none", ".3f", "dino", None),
    )
    needs_prompts = True
    needs_targets = True

    def check(self, spec, reference: ReferenceSet) -> None:
        _check_personalization(self.name, reference)
        if reference.embedded:
            shapes_digest("feature-net32")
        else:  # before any sampling: DINO must be in the local Hugging Face cache (one line on what to download)
            resolve_folder(DINO_HUB_ID)

    def protocol(self, spec, reference: ReferenceSet) -> dict[str, Any]:
        backbone = dino_backbone(reference)
        if backbone == EMBEDDED_DINO:
            what = {"weights": shapes_digest("feature-net32"),
                    "embedding": "shapes-cnn32 64-d embedding (supervised on the renderer's attributes): DINO-style"}
        else:
            what = {"embedding": "DINO ViT-S/16 [CLS] token of the last layer (transformers ViTModel)",
                    "preprocessing": "the checkpoint's image processor"}
        return {"backbone": backbone, **what, "formula": "mean cosine over (generated, real) pairs of one subject",
                "subjects": reference.identity()}

    def compute(self, ctx) -> dict[str, float]:
        embed = dino_embedder(dino_backbone(ctx.reference), ctx.device)
        score, ceiling = subject_fidelity(embed, ctx.take_samples, _subject_of_samples(ctx), _subjects_by_name(ctx.reference))
        key = KEY_EMBEDDED if ctx.reference.embedded else KEY_DINO
        return {key: score, f"{key}_real": ceiling}


# -- prior drift (used by the methods' prepare) ---------------------------------------------------------------------------
def frechet_distance(images_a: torch.Tensor, images_b: torch.Tensor, extractor: str) -> float:
    """FID between two uint8 image sets [N, 3, H, W] in a torch-fidelity feature extractor's features."""
    info = EXTRACTORS[extractor]
    if min(len(images_a), len(images_b)) < 2 * info.dim:
        raise BenchError(f"prior drift: FID on {info.dim}-d {extractor} features needs at least {2 * info.dim} "
                         f"samples per set, got {len(images_a)} and {len(images_b)}")
    info.preflight()
    fe = feature_extractor(info.name, info.layer, torch.device("cpu"))  # the process's shared one (bench.reuse)
    stats = []
    for images in (images_a, images_b):
        feats = get_featuresdict_from_dataset(UInt8Images(images), fe, 200, False, save_cpu_ram=True, verbose=False)
        stats.append(fid_features_to_statistics(feats[info.layer].double()))
    return float(fid_statistics_to_metric(stats[0], stats[1], verbose=False)[KEY_METRIC_FID])


def heldout_rate(images_uint8: torch.Tensor, subject_truth: dict | None) -> float:
    """Fraction of images in which the feature network sees the subject's held-out shape or color (embedded world).

    Class prompts never ask for them: an untouched model almost never draws them, a model whose class
    noun has drifted to the subject does. NaN when the subject has no held-out attribute.
    """
    obj = (subject_truth or {}).get("objects", [{}])[0]
    checks = []
    if obj.get("shape") in HELDOUT_SHAPES:
        checks.append(("shape", list(ALL_SHAPES).index(obj["shape"])))
    if obj.get("color") in HELDOUT_COLORS:
        checks.append(("color", list(ALL_COLORS).index(obj["color"])))
    if not checks:
        return float("nan")
    predicted = predict(load_network(WEIGHTS_DIR32), images_uint8)
    hit = np.zeros(len(images_uint8), dtype=bool)
    for head, index in checks:
        hit |= predicted[head] == index
    return float(hit.mean())
