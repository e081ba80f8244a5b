"""HyperDreamBooth's pieces on the embedded world: Lightweight DreamBooth (LiDB) and the HyperNetwork.

Ruiz et al. 2023 (arXiv 2307.06949), Sec. 3.1-3.2, at the scale of the embedded text-to-image model:

- **LiDB** (Sec. 3.1): a rank-``r`` LoRA ``delta W = B A`` on every attention projection (to_q, to_k, to_v,
  to_out.0) of the UNet whose down-projection is ``A = A_train A_aux`` and up-projection ``B = B_aux B_train``:
  ``A_aux`` (``a x n``, orthonormal rows) and ``B_aux`` (``m x b``, orthonormal columns) are random and frozen,
  only ``A_train`` (``r x a``) and ``B_train`` (``b x r``) are personalized: ``(a + b) r`` numbers per layer.
  ``LiDBBasis`` holds the frozen bases; ``lora_factors`` multiplies a subject's weights out into ordinary LoRA
  factors (``lora_A = A_train A_aux``, ``lora_B = B_aux B_train``), which is how they are saved and loaded.
- **Per-sample LiDB** (``lidb_forward``): forward hooks that add ``B_i A_i x`` with the weights of sample ``i`` of
  the batch, so one UNet pass trains many subjects' LiDB weights at once (the recipe's pre-optimization) or
  back-propagates into the HyperNetwork that predicted them. peft's LoRA layers hold one parameter per adapter; a
  weight that is the output of a network and differs per sample has to be injected like this.
- **HyperNetwork** (Sec. 3.2, Fig. 3): an image encoder, then a transformer decoder whose queries are one token per
  LiDB layer (a learned layer embedding plus the embedding of the current weight estimate) and whose memory is the
  image's feature tokens; a linear head turns each token into that layer's weight residual. Prediction is
  iterative: ``theta_0 = 0``, ``theta_k = theta_(k-1) + decoder(theta_(k-1), image)`` for ``iterations`` steps.
  The encoder is the trunk of the embedded feature network ``shapes-cnn32`` (its 4x4x128 feature map as 16
  tokens), frozen: it stands in for the paper's pre-trained ViT-H; it saw every attribute value of the world when it
  was trained to recognize them, as a ViT pre-trained on the web has seen faces, while the decoder, the part trained
  here, never sees the held-out concepts.

The recipe that trains it is ``bench.recipes.hyperdreambooth`` (``bench embedded train hyperdreambooth``); the
adapter that uses it is ``methods.hyperdreambooth``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from bench.embedded.feature_extractor import WEIGHTS_DIR32, load_network
from bench.embedded.feature_net import to_input
from bench.embedded.shapes import COLORS, SHAPES, SIZES, Scene, ShapeObject, scene_rng
from bench.errors import BenchError
from bench.files import file_digest

TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections (methods/lora.py's targets)
HYPERNET_FILE = "hypernetwork.safetensors"
HYPERNET_CONFIG = "hypernetwork.json"
BASIS_PREFIX = "basis."  # the frozen LiDB bases are stored beside the network's weights
SUBJECT_SEED = 23  # positions and backgrounds of the training subjects' images
IDENTIFIER = "sks"  # DreamBooth's rare token; the class noun follows it


def hypernetwork_folder() -> Path:
    from bench.models import EMBEDDED_WEIGHTS

    return EMBEDDED_WEIGHTS / "hyperdreambooth"


# -- LiDB --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LiDBConfig:
    rank: int = 1  # r
    aux_down: int = 32  # a: rows of A_aux (the paper's 100 for SD's 320-1280 wide layers; here they are 64-96 wide)
    aux_up: int = 16  # b: columns of B_aux (the paper's 50)
    alpha: float = 1.0  # the update is (alpha / r) B A, as peft's LoRA
    seed: int = 0  # of the random orthogonal bases

    @property
    def per_layer(self) -> int:
        return (self.aux_down + self.aux_up) * self.rank

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def target_layers(unet: nn.Module) -> list[str]:
    """Names of the UNet's attention projections, in module order."""
    return [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and n.endswith(TARGET_MODULES)
            and ".attn" in n]


def _orthonormal_rows(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    if rows > cols:
        raise BenchError(f"LiDB: {rows} orthonormal rows do not fit a {cols}-wide layer (lower --aux-down/--aux-up)")
    q, _ = torch.linalg.qr(torch.randn(cols, rows, generator=gen))
    return q.T.contiguous()


class LiDBBasis:
    """The frozen random bases of every layer: ``A_aux`` [a, n] (orthonormal rows), ``B_aux`` [m, b] (orthonormal
    columns)."""

    def __init__(self, config: LiDBConfig, layers: list[str], a_aux: dict[str, torch.Tensor],
                 b_aux: dict[str, torch.Tensor]):
        self.config, self.layers, self.a_aux, self.b_aux = config, list(layers), a_aux, b_aux

    @classmethod
    def create(cls, unet: nn.Module, config: LiDBConfig) -> "LiDBBasis":
        gen = torch.Generator().manual_seed(config.seed)
        layers = target_layers(unet)
        a_aux, b_aux = {}, {}
        for name in layers:
            out_features, in_features = unet.get_submodule(name).weight.shape
            a_aux[name] = _orthonormal_rows(config.aux_down, in_features, gen)
            b_aux[name] = _orthonormal_rows(config.aux_up, out_features, gen).T.contiguous()
        return cls(config, layers, a_aux, b_aux)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.layers:
            out[f"{BASIS_PREFIX}{name}.A_aux"] = self.a_aux[name]
            out[f"{BASIS_PREFIX}{name}.B_aux"] = self.b_aux[name]
        return out

    @classmethod
    def from_state_dict(cls, config: LiDBConfig, layers: list[str], state: dict[str, torch.Tensor]) -> "LiDBBasis":
        return cls(config, layers, {n: state[f"{BASIS_PREFIX}{n}.A_aux"] for n in layers},
                   {n: state[f"{BASIS_PREFIX}{n}.B_aux"] for n in layers})

    def split(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """theta [..., L, (a + b) r] -> A_train [..., L, r, a], B_train [..., L, b, r]."""
        c = self.config
        a_part, b_part = theta.split([c.aux_down * c.rank, c.aux_up * c.rank], dim=-1)
        return (a_part.unflatten(-1, (c.rank, c.aux_down)), b_part.unflatten(-1, (c.aux_up, c.rank)))

    def lora_factors(self, theta: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """One subject's theta [L, (a + b) r] multiplied out: {layer: (lora_A [r, n], lora_B [m, r])}, the scale
        alpha / r folded into lora_B (so the update is lora_B lora_A)."""
        a_train, b_train = self.split(theta)
        return {name: (a_train[i] @ self.a_aux[name], self.config.scale * (self.b_aux[name] @ b_train[i]))
                for i, name in enumerate(self.layers)}

    def init_weights(self, count: int, gen: torch.Generator) -> torch.Tensor:
        """LoRA's initialization in LiDB's space, one draw shared by ``count`` subjects: A_train Gaussian (std 1 / r),
        B_train zero: [count, L, (a + b) r]. Shared, so that what differs between subjects' weights is what they
        learned (the HyperNetwork regresses it; independent random A_train would be unpredictable noise)."""
        c = self.config
        theta = torch.zeros(len(self.layers), c.per_layer)
        theta[:, : c.aux_down * c.rank] = torch.randn(len(self.layers), c.aux_down * c.rank, generator=gen) / c.rank
        return theta.expand(count, -1, -1).clone()


@contextlib.contextmanager
def lidb_forward(unet: nn.Module, basis: LiDBBasis, theta: torch.Tensor) -> Iterator[None]:
    """Inside the block, every target layer of ``unet`` adds sample i's LiDB update (theta [B, L, (a + b) r])."""
    a_train, b_train = basis.split(theta)  # [B, L, r, a], [B, L, b, r]
    scale = basis.config.scale
    handles = []

    def hook(index: int, name: str):
        a_aux, b_aux = basis.a_aux[name], basis.b_aux[name]

        def add(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            x = inputs[0]  # [B, T, n]
            h = (x @ a_aux.to(x).T) @ a_train[:, index].transpose(1, 2).to(x)  # [B, T, r]
            h = (h @ b_train[:, index].transpose(1, 2).to(x)) @ b_aux.to(x).T  # [B, T, m]
            return output + scale * h

        return add

    for i, name in enumerate(basis.layers):
        handles.append(unet.get_submodule(name).register_forward_hook(hook(i, name)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# -- the HyperNetwork --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HyperConfig:
    width: int = 64  # the decoder's model dimension
    depth: int = 2  # transformer decoder layers
    heads: int = 4
    iterations: int = 4  # s: iterative refinement steps of the prediction
    encoder: str = "shapes-cnn32"  # the frozen image encoder's trunk (bench/embedded/weights/feature-net32)


class ImageEncoder(nn.Module):
    """The feature network's convolutional trunk, frozen: uint8 [B, 3, 32, 32] -> tokens [B, 16, 128]."""

    def __init__(self, folder: Path = WEIGHTS_DIR32):
        super().__init__()
        self.trunk = load_network(folder).body
        self.trunk.requires_grad_(False).eval()
        self.digest = file_digest([Path(folder) / "model.safetensors", Path(folder) / "config.json"])

    @property
    def channels(self) -> int:
        return [m for m in self.trunk if isinstance(m, nn.Conv2d)][-1].out_channels

    @torch.no_grad()
    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.trunk(to_input(images_uint8)).flatten(2).transpose(1, 2)

    def train(self, mode: bool = True) -> "ImageEncoder":  # stays frozen in eval mode
        return super().train(False)


class HyperNetwork(nn.Module):
    """Image feature tokens -> LiDB weights theta [B, L, (a + b) r] of every layer (Fig. 3)."""

    def __init__(self, config: HyperConfig, layers: int, per_layer: int, feature_tokens: int = 16,
                 feature_channels: int = 128):
        super().__init__()
        self.config = config
        w = config.width
        self.features = nn.Linear(feature_channels, w)
        self.feature_position = nn.Parameter(torch.randn(feature_tokens, w) * 0.02)
        self.layer_embedding = nn.Parameter(torch.randn(layers, w) * 0.02)
        self.weights_in = nn.Linear(per_layer, w)
        block = nn.TransformerDecoderLayer(w, config.heads, dim_feedforward=4 * w, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.decoder = nn.TransformerDecoder(block, config.depth, norm=nn.LayerNorm(w))
        self.head = nn.Linear(w, per_layer)
        nn.init.normal_(self.head.weight, std=1e-3)  # small first residuals: the model starts near the base model
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T, C] (the image encoder's) -> theta [B, L, (a + b) r]."""
        memory = self.features(tokens) + self.feature_position
        theta = tokens.new_zeros(tokens.shape[0], self.layer_embedding.shape[0], self.head.out_features)
        for _ in range(self.config.iterations):
            queries = self.layer_embedding + self.weights_in(theta)
            theta = theta + self.head(self.decoder(queries, memory))
        return theta


@dataclass
class LoadedHyperNetwork:
    """A trained HyperNetwork with its LiDB basis and image encoder, as the recipe saved it."""

    network: HyperNetwork
    basis: LiDBBasis
    encoder: ImageEncoder
    meta: dict[str, Any]
    digest: str

    @torch.no_grad()
    def predict(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, 32, 32] -> theta [B, L, (a + b) r]."""
        return self.network(self.encoder(images_uint8))


def save_hypernetwork(folder: Path, network: HyperNetwork, basis: LiDBBasis, meta: dict[str, Any]) -> None:
    """``hypernetwork.safetensors`` (the decoder's weights and the LiDB bases) and ``hypernetwork.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in network.state_dict().items()}
    state.update(basis.state_dict())
    save_file(state, str(folder / HYPERNET_FILE))
    config = {"lidb": asdict(basis.config), "hypernetwork": asdict(network.config), "layers": basis.layers, **meta}
    (folder / HYPERNET_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_hypernetwork(folder: Path | None = None) -> LoadedHyperNetwork:
    """The committed HyperNetwork (or one in ``folder``); a missing or damaged one is one line naming its recipe."""
    folder = Path(folder) if folder else hypernetwork_folder()
    try:
        meta = json.loads((folder / HYPERNET_CONFIG).read_text())
        state = load_file(str(folder / HYPERNET_FILE))
        lidb, config, layers = LiDBConfig(**meta["lidb"]), HyperConfig(**meta["hypernetwork"]), meta["layers"]
        basis = LiDBBasis.from_state_dict(lidb, layers, state)
        encoder = ImageEncoder()
        network = HyperNetwork(config, len(layers), lidb.per_layer, feature_channels=encoder.channels)
        network.load_state_dict({k: v for k, v in state.items() if not k.startswith(BASIS_PREFIX)})
    except Exception as exc:  # missing, truncated or mismatched files
        raise BenchError(f"cannot load the HyperDreamBooth hypernetwork from {folder} ({type(exc).__name__}); "
                         f"train it with `bench embedded train hyperdreambooth`") from None
    if meta.get("encoder_digest") not in (None, encoder.digest):
        raise BenchError(f"the HyperDreamBooth hypernetwork in {folder} was trained on another shapes-cnn32 encoder; "
                         f"retrain it with `bench embedded train hyperdreambooth`")
    digest = file_digest([folder / HYPERNET_FILE, folder / HYPERNET_CONFIG])
    return LoadedHyperNetwork(network.eval().requires_grad_(False), basis, encoder, meta, digest)


# -- the training subjects ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingSubject:
    """A subject the HyperNetwork trains on: a large object of a seen shape and color, named by a seen class noun."""

    shape: str
    color: str
    class_noun: str

    @property
    def name(self) -> str:
        return f"{self.color}_{self.shape}_as_{self.class_noun}"


def training_subjects() -> list[TrainingSubject]:
    """Every seen shape x seen color x seen class noun (3 x 6 x 3 = 54): the subject's class noun may be its own shape
    (as for the held-out orange circle, class "circle") or another one (as for the held-out diamond, class "square").
    The held-out shape and color never occur."""
    return [TrainingSubject(s, c, n) for s in SHAPES for c in COLORS for n in SHAPES]


def subject_scenes(index: int, images: int, size: str = "large") -> list[Scene]:
    """Scenes of training subject ``index``: seeded positions, the four backgrounds in turn (as embedded-concepts)."""
    from bench.embedded.shapes import BACKGROUNDS

    subject = training_subjects()[index]
    backgrounds = list(BACKGROUNDS)
    r = SIZES[size]
    lo, hi = r + 0.02, 1.0 - r - 0.02
    out = []
    for k in range(images):
        rng = scene_rng(SUBJECT_SEED, index * 1000 + k)
        obj = ShapeObject(subject.shape, subject.color, size, float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
        out.append(Scene((obj,), backgrounds[(index + k) % len(backgrounds)]))
    return out
