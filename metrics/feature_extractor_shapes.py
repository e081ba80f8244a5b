"""torch-fidelity feature extractor ``shapes-cnn16``: the embedded feature network's 64-d embedding.

Registered with ``torch_fidelity.register_feature_extractor`` so that torch-fidelity's
FID, KID and precision/recall stages run on the shapes world exactly as they run on
Inception features for real data sets.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from bench.embedded.feature_net import HEADS, ShapesCNN, to_input

NAME = "shapes-cnn16"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "bench" / "embedded" / "weights" / "feature-net"
FEATURES = ("embedding",) + tuple(f"logits_{k}" for k in HEADS)


def load_network(weights_dir: Path = WEIGHTS_DIR) -> ShapesCNN:
    from safetensors.torch import load_file

    from bench.errors import BenchError

    try:
        config = json.loads((Path(weights_dir) / "config.json").read_text())
        state = load_file(str(Path(weights_dir) / "model.safetensors"))
        net = ShapesCNN(config["resolution"], config["embed_dim"])
        net.load_state_dict(state)
    except Exception as exc:  # missing, truncated or mismatched files
        raise BenchError(
            f"cannot load the embedded feature network from {weights_dir} ({type(exc).__name__}); "
            f"rebuild it with `bench embedded train feature-net`"
        ) from None
    return net.eval().requires_grad_(False)


class ShapesFeatureExtractor(FeatureExtractorBase):
    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net = load_network(Path(feature_extractor_weights_path) if feature_extractor_weights_path else WEIGHTS_DIR)

    @staticmethod
    def get_provided_features_list():
        return FEATURES

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "embedding"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

    def forward(self, x: torch.Tensor):
        if x.dtype != torch.uint8:
            raise TypeError(f"{NAME} takes uint8 images, got {x.dtype}")
        r = self.net.resolution
        x = to_input(x)
        if x.shape[-2:] != (r, r):  # bilinear with antialiasing; the protocol records it
            x = F.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        out = self.net(x)
        features = {"embedding": out["embedding"], **{f"logits_{k}": out[k] for k in HEADS}}
        return tuple(features[name] for name in self.features_list)


def register() -> None:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(NAME, ShapesFeatureExtractor)
