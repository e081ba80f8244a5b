"""The contracts that methods, metrics, data sets and models fulfil.

A method adapter reproduces one paper; a metric is a small pure stage over the
run's samples and timings; a data set supplies the reference images and names
the feature extractor of its protocol; a model bundles a denoiser with its
training-time noise schedule and the digest of its weights.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

from bench.errors import BenchError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from bench.denoiser import CountingDenoiser
    from bench.evaluation import EvalContext


@dataclass(frozen=True)
class MethodCard:
    """What a method adapter reproduces, and how closely (shown by ``bench ls methods --cards``)."""

    citation: str
    url: str
    reproduces: str
    reference: str = ""  # the paper's numbers (../shared/REFERENCE.md)
    embedded_claim: str = ""  # the claim checked on the embedded world, with its status


@dataclass(frozen=True)
class NoArgs:
    """A method without options of its own."""


@dataclass
class DiffusionModel:
    """A denoiser and the noise schedule it was trained with."""

    name: str
    source: str  # hub id or folder
    digest: str  # sha256 over the weight files: part of the protocol
    kind: str  # e.g. "pixel-diffusion"
    unet: Any  # a diffusers model whose forward is (sample, timestep, ...) -> .sample
    scheduler_config: Mapping[str, Any]
    sample_shape: tuple[int, int, int]  # (C, H, W)
    embedded: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "digest": self.digest, "kind": self.kind}

    def modules(self) -> list[Any]:
        """The torch modules a run moves to its device and dtype."""
        return [self.unet]


@dataclass
class TextToImageModel(DiffusionModel):
    """A latent text-to-image model: the parts of a ``StableDiffusionPipeline`` (kind "text-to-image").

    ``unet`` denoises latents of ``latent_shape``; ``sample_shape`` is the decoded image's.
    """

    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    latent_shape: tuple[int, int, int] = (4, 8, 8)
    pipeline: Any = None  # the loaded pipeline object (its parts are the fields above)

    def modules(self) -> list[Any]:
        return [self.unet, self.vae, self.text_encoder]


@dataclass(frozen=True)
class Prompt:
    """One prompt of a prompt data set; ``attributes`` is the embedded world's ground truth (else None)."""

    text: str
    attributes: Mapping[str, Any] | None = None
    category: str = ""


class Method(ABC):
    """A method adapter: one paper, one class. Options are the fields of ``Args``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str]
    card: ClassVar[MethodCard]
    model_kinds: ClassVar[tuple[str, ...]] = ("pixel-diffusion",)
    Args: ClassVar[type] = NoArgs
    text_conditioned: ClassVar[bool] = False  # True: generate() takes the prompts of its samples
    conditioning: ClassVar[str] = "none"  # "none" (a sampler), "text", "classifier": which contract tests apply
    default_dataset: ClassVar[str | None] = None  # used instead of the spec's default data set, if set

    def __init__(self, args: Any):
        self.args = args

    @classmethod
    def parse_args(cls, values: Mapping[str, Any]) -> Any:
        """Build ``Args`` from a mapping, failing loudly on unknown names and bad values."""
        known = {f.name: f for f in dataclasses.fields(cls.Args)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            opts = ", ".join(f"--{n.replace('_', '-')}" for n in known) or "none"
            raise BenchError(f"method {cls.name!r} has no option {', '.join(unknown)} (its options: {opts})")
        try:
            return cls.Args(**values)
        except (TypeError, ValueError) as exc:
            raise BenchError(f"method {cls.name!r}: {exc}") from None

    def check(self, model: DiffusionModel, steps: int) -> None:
        """Raise BenchError if this method cannot run on ``model`` with ``steps``."""
        if model.kind not in self.model_kinds:
            raise BenchError(
                f"method {self.name!r} needs a model of kind {' or '.join(self.model_kinds)}, "
                f"but {model.name!r} is {model.kind}"
            )

    def targets(self, num_samples: int) -> list[Mapping[str, Any]] | None:
        """Attributes each sample is asked to have (e.g. a guidance target), for attribute accuracy; None: none."""
        return None

    @abstractmethod
    def generate(
        self, model: DiffusionModel, seeds: Sequence[int], steps: int, denoiser: "CountingDenoiser"
    ) -> "torch.Tensor":
        """Images in [-1, 1], [len(seeds), C, H, W]; sample i depends on seeds[i] alone."""


class TextToImageMethod(Method):
    """A method conditioned on text: sample i gets prompt i of the data set (and seed i), whatever the batching."""

    model_kinds: ClassVar[tuple[str, ...]] = ("text-to-image",)
    text_conditioned: ClassVar[bool] = True
    conditioning: ClassVar[str] = "text"
    default_dataset: ClassVar[str | None] = "shapes32"

    @abstractmethod
    def generate(  # type: ignore[override]
        self, model: DiffusionModel, seeds: Sequence[int], steps: int, denoiser: "CountingDenoiser",
        prompts: Sequence[str] = (),
    ) -> "torch.Tensor":
        """Images in [-1, 1], [len(seeds), C, H, W]; sample i depends on (seeds[i], prompts[i]) alone."""


class ReferenceSet(ABC):
    """A data set's reference images and the metric protocol that goes with them."""

    name: ClassVar[str]
    summary: ClassVar[str]
    resolution: ClassVar[int]
    default_model: ClassVar[str]
    feature_extractor: ClassVar[str]  # a torch-fidelity feature extractor name
    embedded: ClassVar[bool] = False
    has_images: ClassVar[bool] = True  # False: a prompt-only data set (no FID/KID)
    clip_backbone: ClassVar[str] = "ViT-B/32"  # the CLIP of its CLIP score (the embedded world has its own)
    default_metrics: ClassVar[tuple[str, ...] | None] = None  # used instead of the spec's default metrics

    def prompts(self, num_samples: int) -> "list[Prompt] | None":
        """Prompt i for sample i (``num_samples`` of them), or None for a data set without prompts."""
        return None

    def prompts_identity(self) -> dict[str, Any]:
        """What defines the prompts (beyond their texts, which the run hashes): file digests, seeds."""
        return self.identity()

    def preflight(self) -> None:
        """Raise BenchError (one line: what to download, where to put it) if the data is missing."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """Everything that defines the reference set (goes into the metric protocol)."""

    @abstractmethod
    def dataset(self) -> Any:
        """A torch Dataset of uint8 [3, H, W] tensors."""


class Metric(ABC):
    """A metric stage: protocol (recorded, hashed) and compute (over the run's context)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    needs_prompts: ClassVar[bool] = False  # the run must have prompts (a text-to-image method)
    needs_targets: ClassVar[bool] = False  # the run must say which attributes each sample should have

    def check(self, spec: Any, reference: ReferenceSet) -> None:
        """Raise BenchError before any sampling if the run cannot give a meaningful value."""

    def protocol(self, spec: Any, reference: ReferenceSet) -> dict[str, Any]:
        return {}

    @abstractmethod
    def compute(self, ctx: "EvalContext") -> dict[str, float]:
        """Metric values by name."""
