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
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from bench.claim import Claim
from bench.errors import BenchError

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    import torch

    from bench.denoiser import CountingDenoiser
    from bench.evaluation import EvalContext
    from bench.outputs import Output


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

    ``unet`` denoises latents of ``latent_shape``; ``sample_shape`` is the decoded image's. A pixel-space model
    (kind "text-to-image-pixel", an ``IFPipeline``) has no ``vae``: its ``latent_shape`` is ``sample_shape``.
    """

    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    latent_shape: tuple[int, int, int] = (4, 8, 8)
    pipeline: Any = None  # the loaded pipeline object (its parts are the fields above)

    def modules(self) -> list[Any]:
        return [m for m in (self.unet, self.vae, self.text_encoder) if m is not None]  # a pixel model has no VAE


@dataclass
class SDXLModel(TextToImageModel):
    """A ``StableDiffusionXLPipeline``'s parts (kind "text-to-image-xl", Podell et al. 2023): two text encoders
    (CLIP ViT-L and OpenCLIP bigG; their penultimate hidden states concatenated, the second's pooled embedding
    projected) and a UNet that also takes ``added_cond_kwargs`` (``text_embeds``: the pooled embedding;
    ``time_ids``: the micro-conditioning, original size, crop top-left, target size)."""

    text_encoder_2: Any = None
    tokenizer_2: Any = None

    def modules(self) -> list[Any]:
        return [self.unet, self.vae, self.text_encoder, self.text_encoder_2]


@dataclass
class FlowMatchingModel(DiffusionModel):
    """A flow-matching text-to-image model (kind "flow-matching": SD3's ``StableDiffusion3Pipeline``, FLUX's
    ``FluxPipeline``; Esser et al. 2024, Black Forest Labs 2024): ``unet`` holds the transformer
    (``SD3Transformer2DModel`` or ``FluxTransformer2DModel``), which predicts the velocity ``noise - x0`` at a
    sigma in [0, 1] (``prediction_type`` "flow"); ``scheduler_config`` is the folder's
    ``FlowMatchEulerDiscreteScheduler`` config (shift, dynamic shifting). DDPM-family samplers refuse it."""

    family: str = ""  # "sd3" or "flux"
    prediction_type: str = "flow"
    vae: Any = None
    text_encoders: tuple[Any, ...] = ()
    tokenizers: tuple[Any, ...] = ()
    latent_shape: tuple[int, int, int] = (16, 8, 8)
    pipeline: Any = None
    # the pipelines' max_sequence_length: the T5 tokens of the context (zeros where the folder has no T5 encoder);
    # a model trained with another count says so (the embedded flow: 0, its context is the CLIP tokens alone)
    max_sequence_length: int = 256

    def modules(self) -> list[Any]:
        return [self.unet, self.vae, *self.text_encoders]


@dataclass(frozen=True)
class Prompt:
    """One prompt of a prompt data set; ``attributes`` is the embedded world's ground truth (else None)."""

    text: str
    attributes: Mapping[str, Any] | None = None
    category: str = ""


@dataclass(frozen=True)
class EditItem:
    """One edit of an editing data set (PIE-Bench's fields): sample i of an editing run edits item i.

    ``mask`` is 1 where the edit should change the image and 0 where it should keep it (PIE-Bench's convention);
    ``target`` is the ground-truth edited image where the data set has one (the embedded world), else None;
    ``blend_words`` name the edited word in the source and the target prompt (Prompt-to-Prompt's local blend and
    re-weighting; PIE-Bench's ``blended_word``), empty where the data set does not say. ``control`` is a spatial
    condition image (ControlNet's: an object mask or an edge map) and ``exemplar`` a reference image (Paint-by-
    Example's), where the data set has them (issue 18).
    """

    key: str
    source: Any  # uint8 numpy [H, W, 3]
    source_prompt: str
    target_prompt: str
    mask: Any  # float32 numpy [H, W] in {0, 1}
    edit_type: str
    target: Any = None  # uint8 numpy [H, W, 3] or None
    blend_words: tuple[str, str] = ("", "")
    instruction: str = ""
    control: Any = None  # uint8 numpy [H, W, C] or None
    exemplar: Any = None  # uint8 numpy [h, w, 3] or None


def recorded_args(args: Any) -> dict[str, Any]:
    """A method's parsed ``Args`` as recorded in the run spec and hashed: every field, except a field whose metadata
    says ``omit_default`` while it has its default value (an option added to an existing method later, such as
    SDXL's micro-conditioning on ``cfg``: runs that do not use it keep the protocol hash they had before)."""
    full = dataclasses.asdict(args)
    return {f.name: full[f.name] for f in dataclasses.fields(args)
            if not (f.metadata.get("omit_default") and getattr(args, f.name) == f.default)}


def check_finite(method: str, option: str, value: Any) -> None:
    """Refuse nan and inf in a method option (a float, or floats in a list or mapping): one place for every adapter.

    An infinite guidance scale samples black images and a nan scale samples unguided, both with a number that
    looks like a result; neither is ever a setting.
    """
    import math

    if isinstance(value, Mapping):
        values = list(value.values())
    elif isinstance(value, (list, tuple)):
        values = list(value)
    else:
        values = [value]
    for v in values:
        if isinstance(v, (list, tuple, Mapping)):
            check_finite(method, option, v)
        elif isinstance(v, float) and not math.isfinite(v):
            raise BenchError(f"method {method!r}: --{option.replace('_', '-')} must be a finite number, got {v}")


CONDITIONINGS = ("none", "text", "classifier", "edit")


@dataclass(frozen=True)
class Batch:
    """One batch of a run: sample i of the batch is the run's sample ``indices[i]``, drawn from ``seeds[i]``.

    ``prompts``: the samples' prompts (conditioning "text"; "edit": the target prompts); ``edits``: the samples'
    edits (conditioning "edit"); ``targets``: the attributes each sample is asked to have (classifier guidance, or
    the prompts' attributes), empty where none. Sample i must depend on (seeds[i], prompts[i], edits[i]) alone.
    """

    seeds: tuple[int, ...]
    steps: int
    indices: tuple[int, ...] = ()
    prompts: tuple[str, ...] = ()
    edits: tuple[EditItem, ...] = ()
    targets: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        for name in ("seeds", "indices", "prompts", "edits", "targets"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.indices:
            object.__setattr__(self, "indices", tuple(range(len(self.seeds))))
        n = len(self.seeds)
        for name in ("indices", "prompts", "edits", "targets"):
            got = len(getattr(self, name))
            if got and got != n:
                raise ValueError(f"{got} {name} for {n} seeds")

    def __len__(self) -> int:
        return len(self.seeds)


class Method(ABC):
    """A method adapter: one paper, one class. Options are the fields of ``Args``.

    The contract: ``generate(model, batch, denoiser)``; ``conditioning`` says what a batch carries for it ("none":
    seeds alone; "text": prompts; "classifier": targets; "edit": edits and their target prompts). The hooks below
    (``check``, ``check_dataset``, ``prepare``, ``protocol``, ``targets``) have defaults that do nothing.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str]
    card: ClassVar[MethodCard]
    model_kinds: ClassVar[tuple[str, ...]] = ("pixel-diffusion",)
    Args: ClassVar[type] = NoArgs
    conditioning: ClassVar[str] = "none"  # "none" (a sampler), "text", "classifier", "edit" (CONDITIONINGS)
    default_dataset: ClassVar[str | None] = None  # used instead of the spec's default data set, if set
    claims: ClassVar[tuple[Claim, ...]] = ()  # the paper's claims, decided by `bench claims` (bench/claims.py)

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
        for key, value in values.items():  # before Args: nan and inf pass every comparison an Args might make
            check_finite(cls.name, key, value)
        try:
            args = cls.Args(**values)
        except (TypeError, ValueError) as exc:
            raise BenchError(f"method {cls.name!r}: {exc}") from None
        for f in dataclasses.fields(args):  # defaults and values Args derived
            check_finite(cls.name, f.name, getattr(args, f.name))
        return args

    def check(self, model: DiffusionModel, steps: int) -> None:
        """Raise BenchError if this method cannot run on ``model`` with ``steps``."""
        if model.kind not in self.model_kinds:
            if model.kind == "flow-matching":
                raise BenchError(
                    f"method {self.name!r} samples DDPM-family models; {model.name!r} is a flow-matching model "
                    f"(velocity prediction on FlowMatchEulerDiscreteScheduler sigmas): use a flow-matching sampler "
                    f"(flow-euler, flow-heun, flow-dpmsolver++)"
                )
            if model.kind == "consistency":
                raise BenchError(f"method {self.name!r} samples DDPM-family models; {model.name!r} is a consistency "
                                 f"model (CMStochasticIterativeScheduler sigmas): sample it with --method consistency")
            if model.kind == "score-ve":
                raise BenchError(f"method {self.name!r} samples DDPM-family models; {model.name!r} is a variance-"
                                 f"exploding score model (ScoreSdeVeScheduler sigmas): sample it with --method "
                                 f"score-sde, ncsn or probability-flow")
            raise BenchError(
                f"method {self.name!r} needs a model of kind {' or '.join(self.model_kinds)}, "
                f"but {model.name!r} is {model.kind}"
            )

    def check_dataset(self, reference: "ReferenceSet") -> None:
        """Raise BenchError if this method cannot run on the data set (personalization trains on it)."""

    def check_items(self, items: "list[EditItem]") -> None:
        """Raise BenchError if an editing run's items cannot be run (a control image of the wrong size), before the
        run exists. Default: nothing to check."""

    def protocol(self, model: DiffusionModel) -> dict[str, Any]:
        """What else defines this method's samples, recorded and hashed into the run (the resolved scheduler
        config, a guidance classifier's digest, ...). Default: nothing beyond the name and the options."""
        return {}

    @classmethod
    def takes_prompts(cls) -> bool:
        """Whether its batches carry prompts (text-conditioned and editing methods)."""
        return cls.conditioning in ("text", "edit")

    def prepare(self, model: DiffusionModel, spec: Any, workdir: "Path") -> dict[str, float]:
        """Fit the method before sampling, inside the run (personalization and alignment train here).

        ``workdir`` (the run's output folder / "method") holds what it saves; every file there is logged as an
        artifact. Returns the training budget as metrics (``train_steps``, ``train_params``, ``train_seconds``,
        ``train_peak_memory_bytes``, ``train_saved_bytes``, ...), recorded beside the quality metrics. Everything
        that changes the result must come from ``self.args``, ``spec`` and ``model`` (they are hashed).
        It may be called again with a ``workdir`` that already holds what it saved: by `bench run --resume`, and by
        every other process of a sharded run (on a copy of rank 0's workdir, after rank 0 finished). A method
        should then load its saved result instead of fitting again (a refit must give the same result: seed it).
        On resume the budget returned the first time is the one recorded. Default: nothing to fit.
        """
        return {}

    def targets(self, num_samples: int) -> list[Mapping[str, Any]] | None:
        """Attributes each sample is asked to have (e.g. a guidance target), for attribute accuracy; None: none."""
        return None

    @abstractmethod
    def generate(self, model: DiffusionModel, batch: Batch, denoiser: "CountingDenoiser") -> "torch.Tensor":
        """Images in [-1, 1], [len(batch), C, H, W]; sample i depends on batch item i alone (its seed, prompt, edit)."""


class TextToImageMethod(Method):
    """A method conditioned on text: sample i gets prompt i of the data set (and seed i), whatever the batching."""

    model_kinds: ClassVar[tuple[str, ...]] = ("text-to-image",)
    conditioning: ClassVar[str] = "text"
    default_dataset: ClassVar[str | None] = "shapes32"


class EditMethod(Method):
    """An image editor: sample i edits item i of the data set's edits (source image, prompts, mask), with seed i.

    Its prompts are the target prompts (CLIP score, attribute accuracy against the target's attributes).
    """

    model_kinds: ClassVar[tuple[str, ...]] = ("text-to-image",)
    conditioning: ClassVar[str] = "edit"
    default_dataset: ClassVar[str | None] = "embedded-edits"


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
    default_num_samples: ClassVar[int | None] = None  # used instead of the spec's default sample count (edit sets)

    def prompts(self, num_samples: int) -> "list[Prompt] | None":
        """Prompt i for sample i (``num_samples`` of them), or None for a data set without prompts."""
        return None

    def edits(self, num_samples: int) -> "list[EditItem] | None":
        """Edit i for sample i (an editing data set), or None for a data set without edits."""
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
    """A metric stage: protocol (recorded, hashed) and compute (over the run's context).

    ``outputs`` declares every value ``compute`` returns (key, label, direction, format, protocol family, nightly
    tolerance: ``bench.outputs.Output``); the runner refuses a value it does not declare, and the leaderboard,
    sweep, nightly, CLI and report read the declarations (``bench.outputs.lookup``).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    outputs: ClassVar[tuple["Output", ...]] = ()
    needs_prompts: ClassVar[bool] = False  # the run must have prompts (a text-to-image method)
    needs_targets: ClassVar[bool] = False  # the run must say which attributes each sample should have
    needs_edits: ClassVar[bool] = False  # the run must be an editing run (sample i edits item i)
    needs_model: ClassVar[bool] = False  # reads the run's model (``ctx.model``): a likelihood, not a sample metric

    def check(self, spec: Any, reference: ReferenceSet) -> None:
        """Raise BenchError before any sampling if the run cannot give a meaningful value."""

    def check_model(self, model: DiffusionModel) -> None:
        """Raise BenchError before any sampling if the metric cannot be computed on the run's model (once loaded)."""

    def protocol(self, spec: Any, reference: ReferenceSet) -> dict[str, Any]:
        return {}

    def sample_features(self, spec: Any, reference: ReferenceSet) -> tuple[tuple[str, str], ...]:
        """The per-sample features ``compute`` reads through ``ctx.sample_features``, as (extractor, layer) pairs:
        the runner extracts them as each batch is made (streamed), so the metric phase finds them ready."""
        return ()

    @abstractmethod
    def compute(self, ctx: "EvalContext") -> dict[str, float]:
        """Metric values by name."""
