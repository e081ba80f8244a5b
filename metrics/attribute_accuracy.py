"""Attribute accuracy, GenEval-style (Ghosh et al. 2023): does each image have what its prompt asked for?

GenEval checks generated images with an object detector; the embedded world checks
them with the feature network's attribute heads (``shapes-cnn16`` or
``shapes-cnn32``), which know the renderer's attributes exactly. Each sample has a
target: its prompt's ground-truth attributes (text-to-image runs on shapes32) or a
guidance target (classifier guidance asks for a color). Checked: the object count,
every object's shape and color (objects are in caption order, left to right), the
background; the size is reported but, as in GenEval, not part of ``attr_acc_all``
(the fraction of images with every checked attribute right).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bench.embedded.feature_extractor import WEIGHTS_DIR, load_network
from bench.embedded.feature_net import to_input
from bench.embedded.shapes import ALL_COLORS, ALL_SHAPES, BACKGROUNDS, SIZES
from bench.errors import BenchError
from bench.extractors import shapes_digest
from bench.interfaces import Metric, ReferenceSet
from bench.outputs import Output

KEY_ALL = "attr_acc_all"
KEY_MEAN = "attr_acc_mean"
CHECKED = ("count", "shape", "color", "background")  # in attr_acc_all and attr_acc_mean
REPORTED = CHECKED + ("size",)
NETWORKS = {"shapes-cnn16": "feature-net", "shapes-cnn32": "feature-net32"}
BATCH = 500


def network_folder(reference: ReferenceSet):
    return WEIGHTS_DIR.parent / NETWORKS[reference.feature_extractor]


@torch.no_grad()
def predict(net, images_uint8: torch.Tensor) -> dict[str, np.ndarray]:
    """Argmax of every attribute head: uint8 [N, 3, H, W] -> {head: int array [N]}."""
    out: dict[str, list[np.ndarray]] = {k: [] for k in net.heads}
    r = net.resolution
    for a in range(0, len(images_uint8), BATCH):
        x = to_input(images_uint8[a : a + BATCH])
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        logits = net(x)
        for k in net.heads:
            out[k].append(logits[k].argmax(1).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def score(predicted: Mapping[str, np.ndarray], targets: Sequence[Mapping[str, Any] | None]) -> dict[str, float]:
    """Per-attribute accuracy over every target that names the attribute, and the all-correct fraction."""
    tables = {"shape": list(ALL_SHAPES), "color": list(ALL_COLORS), "size": list(SIZES)}
    hits: dict[str, list[bool]] = {k: [] for k in REPORTED}
    all_right = []
    for i, target in enumerate(targets):
        if not target:
            continue
        right = True

        def check(attribute: str, ok: bool) -> None:
            nonlocal right
            hits[attribute].append(ok)
            if attribute in CHECKED:
                right = right and ok

        if "background" in target and "background" in predicted:
            check("background", int(predicted["background"][i]) == list(BACKGROUNDS).index(target["background"]))
        objects = list(target.get("objects", []))
        if "count" in target and "count" in predicted:
            check("count", int(predicted["count"][i]) + 1 == int(target["count"]))
        for slot, obj in enumerate(objects[:2]):
            for attribute in ("shape", "color", "size"):
                head = attribute if slot == 0 else f"{attribute}2"
                if attribute in obj and head in predicted:
                    check(attribute, int(predicted[head][i]) == tables[attribute].index(obj[attribute]))
        all_right.append(right)
    values = {f"attr_acc_{k}": float(np.mean(v)) for k, v in hits.items() if v}
    checked = [values[f"attr_acc_{k}"] for k in CHECKED if f"attr_acc_{k}" in values]
    if not all_right:
        raise BenchError("attribute accuracy: no sample has a target to check")
    values[KEY_MEAN] = float(np.mean(checked)) if checked else float("nan")
    values[KEY_ALL] = float(np.mean(all_right))
    return values


class AttributeAccuracy(Metric):
    name = "attribute-accuracy"
    summary = "GenEval-style attribute accuracy (count, shape, color, background) by the embedded feature network's heads"
    outputs = (
        Output(KEY_ALL, "attribute accuracy, all correct (shapes-cnn heads)", "higher", ".3f", "attribute-accuracy"),
        Output(KEY_MEAN, "attribute accuracy, mean (shapes-cnn heads)", "higher", ".3f", "attribute-accuracy"),
        Output("attr_acc_*", "attribute accuracy (shapes-cnn heads)", "higher", ".3f", "attribute-accuracy"),
    )
    needs_targets = True

    def check(self, spec, reference: ReferenceSet) -> None:
        if reference.feature_extractor not in NETWORKS:
            raise BenchError(
                f"attribute-accuracy needs the embedded world's attribute heads (data sets shapes16 or shapes32), "
                f"not {reference.name}"
            )
        self._digest(reference)

    def _digest(self, reference: ReferenceSet) -> str:
        return shapes_digest(NETWORKS[reference.feature_extractor])

    def protocol(self, spec, reference: ReferenceSet) -> dict[str, Any]:
        return {
            "classifier": f"{reference.feature_extractor} attribute heads (embedded)",
            "classifier_digest": self._digest(reference),
            "checked": list(CHECKED),
            "reported": list(REPORTED),
            "all": "every checked attribute of the target right (size not checked, as in GenEval)",
            "targets": "the prompt's ground-truth attributes, or the method's guidance target",
            "resize": "bilinear-antialias to the network's resolution if needed",
        }

    def compute(self, ctx) -> dict[str, float]:
        if ctx.targets is None:
            raise BenchError("attribute-accuracy: this run has no per-sample targets (prompts with attributes)")
        net = load_network(network_folder(ctx.reference))
        # a chunk of BATCH samples at a time (predict's own batches); predictions per sample, not images, are kept
        return score(ctx.map_samples(lambda _, chunk: predict(net, chunk), BATCH), ctx.targets)
