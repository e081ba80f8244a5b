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


class Method(ABC):
    """A method adapter: one paper, one class. Options are the fields of ``Args``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str]
    card: ClassVar[MethodCard]
    model_kinds: ClassVar[tuple[str, ...]] = ("pixel-diffusion",)
    Args: ClassVar[type] = NoArgs

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

    @abstractmethod
    def generate(
        self, model: DiffusionModel, seeds: Sequence[int], steps: int, denoiser: "CountingDenoiser"
    ) -> "torch.Tensor":
        """Images in [-1, 1], [len(seeds), C, H, W]; sample i depends on seeds[i] alone."""


class ReferenceSet(ABC):
    """A data set's reference images and the metric protocol that goes with them."""

    name: ClassVar[str]
    summary: ClassVar[str]
    resolution: ClassVar[int]
    default_model: ClassVar[str]
    feature_extractor: ClassVar[str]  # a torch-fidelity feature extractor name
    embedded: ClassVar[bool] = False

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

    def check(self, spec: Any, reference: ReferenceSet) -> None:
        """Raise BenchError before any sampling if the run cannot give a meaningful value."""

    def protocol(self, spec: Any, reference: ReferenceSet) -> dict[str, Any]:
        return {}

    @abstractmethod
    def compute(self, ctx: "EvalContext") -> dict[str, float]:
        """Metric values by name."""
