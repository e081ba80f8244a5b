"""InstantBooth's encoders and adapter layers for the embedded text-to-image model (Shi et al. 2023, arXiv 2304.03411).

The model of the paper's Fig. 2 at the embedded scale:

- a **concept encoder**: the images' global features, averaged over the input images, mapped by an MLP to one
  word embedding that stands for the identifier token V* ("sks") in the prompt (written into the text encoder's
  token-embedding output wherever the identifier occurs);
- a **patch encoder**: each image's local features (a 4x4 grid), projected to patch tokens with a learned
  position embedding; the tokens of all input images are concatenated;
- **adapter layers**: one gated self-attention per transformer block of the UNet, after its self-attention and
  before its cross-attention (GLIGEN's place): ``h <- h + beta tanh(gamma) SelfAttn([h; M p])[:n_visual]``, with
  gamma a learned scalar initialized to 0 (so the frozen model is unchanged at the start) and beta the
  inference-time scale of the adapter (``beta = 0``: the global embedding alone). They are diffusers' GLIGEN
  layers (``GatedSelfAttentionDense``, set as the block's ``fuser``) without the dense branch.

The two encoders share a backbone: the trunk of the embedded feature network ``shapes-cnn32`` (its convolutions
for the patch features, its 64-d embedding for the global ones), **frozen** (the paper's encoders start from a
pre-trained CLIP image encoder). That network was trained on attribute labels that include the world's held-out
values; the InstantBooth layers themselves are trained on seen shapes and colors only (bench/recipes/instantbooth.py).

``Injection`` installs the layers on a model for the duration of a block; ``load`` reads a trained folder
(``instantbooth.safetensors`` + ``config.json``, written by ``bench embedded train instantbooth``).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from diffusers.models.attention import BasicTransformerBlock, GatedSelfAttentionDense
from safetensors.torch import load_file, save_file

from bench.embedded.feature_extractor import WEIGHTS_DIR32, load_network
from bench.embedded.feature_net import ShapesCNN, to_input
from bench.errors import BenchError
from bench.files import file_digest

IDENTIFIER = "sks"  # the prompt's V*: a rare token whose embedding the concept encoder replaces
WEIGHTS_FILE = "instantbooth.safetensors"
CONFIG_FILE = "config.json"
TRAIN_COMMAND = "bench embedded train instantbooth"


@dataclass(frozen=True)
class InstantBoothConfig:
    token_dim: int  # the text encoder's width (the concept embedding is one of its word embeddings)
    blocks: tuple[tuple[str, int, int], ...]  # (UNet module path, width, heads) of each transformer block
    patch_dim: int = 64
    hidden_dim: int = 256  # the concept encoder's MLP
    trunk_channels: int = 128  # shapes-cnn32's last conv block
    trunk_embed: int = 64
    grid: int = 4  # the trunk's spatial grid at 32x32 (patches per side)
    resolution: int = 32
    identifier: str = IDENTIFIER

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InstantBoothConfig":
        return cls(**{**d, "blocks": tuple(tuple(b) for b in d["blocks"])})


def transformer_blocks(unet: nn.Module) -> list[tuple[str, BasicTransformerBlock]]:
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]


def config_for(model: Any, **options: Any) -> InstantBoothConfig:
    blocks = tuple((n, int(b.norm1.normalized_shape[0]), int(b.attn1.heads)) for n, b in transformer_blocks(model.unet))
    return InstantBoothConfig(token_dim=int(model.text_encoder.get_input_embeddings().weight.shape[1]), blocks=blocks,
                              **options)


class Adapter(GatedSelfAttentionDense):
    """InstantBooth's adapter layer: GLIGEN's gated self-attention over [visual tokens; patch tokens], no dense branch.

    ``h + scale * tanh(alpha_attn) * Attn(LN([h; Linear(p)]))[:, :n_visual]``; ``scale`` is the paper's beta.
    """

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__(dim, context_dim, heads, dim // heads)
        del self.ff, self.norm2, self.alpha_dense  # InstantBooth's adapter is the attention term alone
        self.scale = 1.0

    def forward(self, x: torch.Tensor, objs: torch.Tensor) -> torch.Tensor:
        if self.scale == 0 or not self.enabled:
            return x
        n_visual = x.shape[1]
        out = self.attn(self.norm1(torch.cat([x, self.linear(objs)], dim=1)))[:, :n_visual, :]
        return x + self.scale * self.alpha_attn.tanh() * out


class InstantBooth(nn.Module):
    """The trainable parts (concept encoder, patch encoder, adapters) over a frozen shapes-cnn32 trunk."""

    def __init__(self, config: InstantBoothConfig, trunk: ShapesCNN | None = None):
        super().__init__()
        self.config = config
        c = config
        self.concept = nn.Sequential(nn.Linear(c.trunk_embed, c.hidden_dim), nn.GELU(), nn.Linear(c.hidden_dim, c.token_dim))
        self.patch = nn.Linear(c.trunk_channels, c.patch_dim)
        self.position = nn.Parameter(torch.zeros(c.grid * c.grid, c.patch_dim))
        self.adapters = nn.ModuleDict({key(n): Adapter(dim, c.patch_dim, heads) for n, dim, heads in c.blocks})
        trunk = trunk if trunk is not None else load_network(WEIGHTS_DIR32)
        self.__dict__["trunk"] = trunk.eval().requires_grad_(False)  # frozen, and not part of the saved state

    @torch.no_grad()
    def features(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen trunk: (global [N, 64], local [N, 16, 128]) of uint8 images [N, 3, 32, 32]."""
        if tuple(images_uint8.shape[-2:]) != (self.config.resolution,) * 2:
            raise BenchError(f"InstantBooth's embedded encoder reads {self.config.resolution}x{self.config.resolution} "
                             f"images, not {tuple(images_uint8.shape[-2:])}")
        x = to_input(images_uint8.cpu())
        body = self.trunk.body(x)
        return self.trunk.embedding(x), body.flatten(2).transpose(1, 2)

    def concept_embedding(self, global_features: torch.Tensor) -> torch.Tensor:
        """[B, K, 64] (K images of each subject) -> [B, token_dim]: the mean over images, then the MLP."""
        return self.concept(global_features.mean(dim=1))

    def patch_tokens(self, local_features: torch.Tensor) -> torch.Tensor:
        """[B, K, 16, 128] -> [B, K x 16, patch_dim]: projected, with the grid position, images concatenated."""
        tokens = self.patch(local_features) + self.position
        return tokens.flatten(1, 2)

    def encode(self, images_uint8: torch.Tensor) -> dict[str, torch.Tensor]:
        """One subject's images [K, 3, 32, 32] -> {"concept": [1, token_dim], "patches": [1, K x 16, patch_dim]}."""
        g, p = self.features(images_uint8)
        param = self.position
        g, p = g.to(param.device, param.dtype), p.to(param.device, param.dtype)
        with torch.no_grad():
            return {"concept": self.concept_embedding(g[None]), "patches": self.patch_tokens(p[None])}

    def set_scale(self, scale: float) -> None:
        for adapter in self.adapters.values():
            adapter.scale = float(scale)

    def save(self, folder: Path, extra: dict[str, Any] | None = None) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_FILE))
        record = {**asdict(self.config), "trunk": {"name": "shapes-cnn32",
                                                    "digest": file_digest([WEIGHTS_DIR32 / "model.safetensors"])},
                  **(extra or {})}
        (folder / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")


def key(block_path: str) -> str:
    return block_path.replace(".", "_")


def read_config(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise BenchError(f"InstantBooth's encoder and adapters are missing in {folder}; make them with `{TRAIN_COMMAND}`")
    try:
        return json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read {folder / CONFIG_FILE}: {exc}; remake it with `{TRAIN_COMMAND}`") from None


def load(folder: Path) -> InstantBooth:
    """A trained folder (safetensors + config.json) -> InstantBooth, eval mode, frozen."""
    record = read_config(folder)
    fields = set(InstantBoothConfig.__dataclass_fields__)
    net = InstantBooth(InstantBoothConfig.from_dict({k: v for k, v in record.items() if k in fields}))
    try:
        net.load_state_dict(load_file(str(Path(folder) / WEIGHTS_FILE)))
    except (OSError, RuntimeError, ValueError) as exc:
        raise BenchError(f"cannot load {Path(folder) / WEIGHTS_FILE}: {str(exc).splitlines()[0]}; remake it with "
                         f"`{TRAIN_COMMAND}`") from None
    return net.eval().requires_grad_(False)


class Injection:
    """InstantBooth's layers on a model while active: the concept embedding at V*, the adapters in the UNet's blocks.

    ``concept`` [B or 1, token_dim] and ``patches`` [B or 1, N, patch_dim] are set per use (``set``); a batch of 1
    is broadcast (the classifier-free guidance batch of both branches gets the same patch tokens: the image
    condition is not the text that CFG drops).
    """

    def __init__(self, net: InstantBooth, model: Any):
        self.net, self.model = net, model
        ids = model.tokenizer(net.config.identifier, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise BenchError(f"identifier {net.config.identifier!r} is {len(ids)} tokens of this tokenizer; it must be one")
        self.token_id = ids[0]
        blocks = dict(transformer_blocks(model.unet))
        if sorted(blocks) != sorted(n for n, _, _ in net.config.blocks):
            raise BenchError("InstantBooth's adapters were trained for another UNet (its transformer blocks differ); "
                             f"remake them with `{TRAIN_COMMAND}`")
        self.blocks = blocks
        self.concept: torch.Tensor | None = None
        self.patches: torch.Tensor | None = None

    def set(self, concept: torch.Tensor | None, patches: torch.Tensor | None) -> None:
        self.concept, self.patches = concept, patches

    def _word(self, module: Any, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.concept is None:
            return output
        where = (inputs[0] == self.token_id).unsqueeze(-1)
        return torch.where(where, self.concept.to(output.device, output.dtype).unsqueeze(1), output)

    def _objs(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.patches is None:
            return args, kwargs
        hidden = args[0] if args else kwargs["hidden_states"]
        patches = self.patches.to(hidden.device, hidden.dtype)
        if patches.shape[0] != hidden.shape[0]:
            if hidden.shape[0] % patches.shape[0]:
                raise ValueError(f"{patches.shape[0]} patch-token sets for a batch of {hidden.shape[0]}")
            patches = patches.repeat(hidden.shape[0] // patches.shape[0], 1, 1)  # CFG: [uncond; cond]
        kwargs = dict(kwargs)
        kwargs["cross_attention_kwargs"] = {**(kwargs.get("cross_attention_kwargs") or {}), "gligen": {"objs": patches}}
        return args, kwargs

    @contextlib.contextmanager
    def installed(self) -> Iterator["Injection"]:
        handles = [self.model.text_encoder.get_input_embeddings().register_forward_hook(self._word)]
        try:
            for name, block in self.blocks.items():
                if hasattr(block, "fuser"):
                    raise BenchError(f"transformer block {name} already has a GLIGEN fuser")
                block.fuser = self.net.adapters[key(name)]
                handles.append(block.register_forward_pre_hook(self._objs, with_kwargs=True))
            yield self
        finally:
            for h in handles:
                h.remove()
            for block in self.blocks.values():
                if "fuser" in block._modules:
                    del block.fuser
