"""torch-fidelity feature extractors ``shapes-cnn16`` and ``shapes-cnn32``: the embedded feature networks' 64-d embedding.

Registered with ``torch_fidelity.register_feature_extractor`` so that torch-fidelity's
FID, KID and precision/recall stages run on the shapes world exactly as they run on
Inception features for real data sets. ``shapes-cnn32`` is the network of the 32x32
text-to-image world (one or two objects).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from bench.embedded.feature_net import HEADS, HEADS_TWO_OBJECTS, ShapesCNN, to_input
from bench.errors import BenchError

NAME = "shapes-cnn16"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "feature-net"
FEATURES = ("embedding",) + tuple(f"logits_{k}" for k in HEADS)
NAME32 = "shapes-cnn32"
WEIGHTS_DIR32 = WEIGHTS_DIR.parent / "feature-net32"
FEATURES32 = ("embedding",) + tuple(f"logits_{k}" for k in HEADS_TWO_OBJECTS)


def load_network(weights_dir: Path = WEIGHTS_DIR) -> ShapesCNN:
    try:
        config = json.loads((Path(weights_dir) / "config.json").read_text())
        state = load_file(str(Path(weights_dir) / "model.safetensors"))
        net = ShapesCNN(config["resolution"], config["embed_dim"], config.get("heads"))
        net.load_state_dict(state)
        net.feature_scale = float(config.get("feature_scale", 1.0))
    except Exception as exc:  # missing, truncated or mismatched files
        raise BenchError(
            f"cannot load the embedded feature network from {weights_dir} ({type(exc).__name__}); "
            f"rebuild it with `bench embedded train {Path(weights_dir).name}`"
        ) from None
    return net.eval().requires_grad_(False)


class ShapesFeatureExtractor(FeatureExtractorBase):
    weights_dir = WEIGHTS_DIR

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net = load_network(Path(feature_extractor_weights_path) if feature_extractor_weights_path else self.weights_dir)

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
        # the embedding on a unit scale (bench.embedded.feature_net.embedding_scale)
        features = {"embedding": out["embedding"] / self.net.feature_scale, **{f"logits_{k}": out[k] for k in self.net.heads}}
        return tuple(features[name] for name in self.features_list)


class ShapesFeatureExtractor32(ShapesFeatureExtractor):
    weights_dir = WEIGHTS_DIR32

    @staticmethod
    def get_provided_features_list():
        return FEATURES32

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)


def register() -> None:
    if NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(NAME, ShapesFeatureExtractor)
    if NAME32 not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(NAME32, ShapesFeatureExtractor32)
