"""Claims as data: what a paper states, the runs that measure it, and the rule that decides it.

An adapter declares its claims (``Method.claims``); ``bench claims`` (bench/claims.py) plans the
runs (shared between claims, reused from MLflow when a FINISHED run with the same protocol hash
exists), runs what is missing and gives one verdict per claim: holds, does not hold, not measured.
This module is plain data at the bottom of the layers: it imports nothing of the harness.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

RELATIONS = ("less", "greater", "within", "at-most", "at-least", "minimum-inside", "decreasing", "increasing")
TOLERANCES = ("ci", "margin")
VERDICTS = ("holds", "does not hold", "not measured")


@dataclass(frozen=True)
class Arm:
    """One configuration a claim measures: a ``bench run`` per seed, at full size and at --quick size.

    ``None`` fields take the run spec's resolved defaults (the method's data set, sample count, metrics).
    """

    method: str
    steps: int = 50
    options: Mapping[str, Any] = field(default_factory=dict)
    model: str | None = None
    dataset: str | None = None
    num_samples: int | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    quick_num_samples: int | None = None  # --quick and the default test suite
    quick_seeds: tuple[int, ...] | None = None  # None: the first two of ``seeds``
    quick_steps: int | None = None  # --quick: fewer sampling steps (None: ``steps``)
    quick_options: Mapping[str, Any] = field(default_factory=dict)  # --quick: options over ``options`` (budgets)
    metrics: tuple[str, ...] | None = None
    batch_size: int | None = None


@dataclass(frozen=True)
class Claim:
    """A paper's statement, decided by ``relation`` over the values of ``metric`` in ``arms`` (in order).

    Relations: ``less`` / ``greater`` (the first arm's value against the second's, beyond ``margin``), ``within``
    (|a - b| <= margin: "near"), ``at-most`` / ``at-least`` (the first arm against ``bound``, or with two arms and
    no bound against the second arm plus / minus ``margin``: "at or below"), ``minimum-inside`` (an inner arm is
    below both ends: a U shape), ``decreasing`` / ``increasing`` (along the arms). Tolerance ``ci``: the 95%
    t-interval of the difference over seeds (paired by seed) must lie on the claimed side (``within``: the mean
    difference is inside the margin or inside its own interval: no difference the seeds can show); ``margin``:
    the means alone are compared. With one paired seed (``--quick``) a ``ci``
    claim compares the means with ``margin``, and says so. ``relative``: ``margin`` is a fraction of the other
    arm's mean.
    """

    id: str  # unique within its method, e.g. "more-steps-lower-fid"
    statement: str  # what the paper says, in words
    reference: str  # the paper's numbers and where they are (table, figure)
    metric: str  # an output key, e.g. "fid"
    arms: tuple[tuple[str, Arm], ...]  # (label, arm) in the order the relation reads them
    relation: str = "less"
    tolerance: str = "ci"
    margin: float = 0.0
    relative: bool = False  # margin is a fraction of the last compared arm's mean (0.1: 10%)
    bound: float | None = None
    note: str = ""  # why it may not hold on the embedded world, what differs from the paper

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"claim {self.id!r}: relation {self.relation!r} is not one of {', '.join(RELATIONS)}")
        if self.tolerance not in TOLERANCES:
            raise ValueError(f"claim {self.id!r}: tolerance {self.tolerance!r} is not one of {', '.join(TOLERANCES)}")
        if self.relation in ("at-most", "at-least") and self.bound is None and len(self.arms) != 2:
            raise ValueError(f"claim {self.id!r}: relation {self.relation!r} needs a bound or two arms")
        if self.relation in ("less", "greater", "within") and len(self.arms) != 2:
            raise ValueError(f"claim {self.id!r}: relation {self.relation!r} needs two arms")
        if self.relation in ("minimum-inside",) and len(self.arms) < 3:
            raise ValueError(f"claim {self.id!r}: relation {self.relation!r} needs three arms or more")
        if not self.arms:
            raise ValueError(f"claim {self.id!r} has no arms")


# -- the arms most claims use (plain data: the embedded world's models, data sets and sizes) -------------------

PIXEL_METRICS = ("fid", "latency")
T2I_METRICS = ("fid", "attribute-accuracy", "latency")


def pixel(method: str, steps: int, quick_num_samples: int = 128, quick_seeds: tuple[int, ...] = (0, 1),
          **options: Any) -> Arm:
    """A sampler on the embedded pixel DDPM against shapes16: 1000 samples x 3 seeds (--quick: 128 x 2; FID needs
    twice its 64 feature dimensions)."""
    return Arm(method, steps, dict(options), model="embedded-ddpm", dataset="shapes16", num_samples=1000,
               seeds=(0, 1, 2), quick_num_samples=quick_num_samples, quick_seeds=quick_seeds, metrics=PIXEL_METRICS)


def text_to_image(method: str, steps: int = 50, metrics: tuple[str, ...] = T2I_METRICS,
                  quick_seeds: tuple[int, ...] = (0, 1), **options: Any) -> Arm:
    """A text-to-image method on the embedded t2i model against shapes32: 256 samples x 3 seeds, 50 steps
    (--quick: 128 samples x 2 seeds, 10 steps; FID needs twice its 64 feature dimensions)."""
    return Arm(method, steps, dict(options), model="embedded-t2i", dataset="shapes32", num_samples=256,
               seeds=(0, 1, 2), quick_num_samples=128, quick_seeds=quick_seeds, quick_steps=10, metrics=metrics)


SDXL_MODEL = "embedded-sdxl"
MICRO_CONDITIONING_METRICS = ("cutoff", "sharpness")


def text_to_image_xl(method: str, steps: int = 50, metrics: tuple[str, ...] = MICRO_CONDITIONING_METRICS,
                     **options: Any) -> Arm:
    """A text-to-image method on the embedded SDXL-layout model (micro-conditioning, issue 16) against shapes32's
    prompts, at ``text_to_image``'s sizes (256 samples x 3 seeds, 50 steps; --quick: 128 x 2, 10 steps). Until the
    model's weights exist its claims are "not measured" with the one line that says so."""
    return replace(text_to_image(method, steps, metrics, **options), model=SDXL_MODEL)


FLOW_MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"


def flow(method: str, steps: int, **options: Any) -> Arm:
    """A flow-matching sampler on SD3-medium against COCO-2014 captions (FID with Inception-v3): 5000 samples x 3 seeds
    (--quick: 128 x 1). No embedded flow model exists yet (issue 16), so these arms need the public checkpoint and
    the COCO download; offline the claim is "not measured" with the one line that says what to download."""
    return Arm(method, steps, dict(options), model=FLOW_MODEL, dataset="coco2014-captions", num_samples=5000,
               seeds=(0, 1, 2), quick_num_samples=128, quick_seeds=(0,), metrics=PIXEL_METRICS)


def embedded_flow(method: str, steps: int, model: str = "embedded-flow", metrics: tuple[str, ...] = T2I_METRICS,
                  **options: Any) -> Arm:
    """A flow-matching sampler on the embedded SD3-layout flow against shapes32: 256 samples x 3 seeds (--quick: 128
    x 2; the steps are the claim's, few already)."""
    return Arm(method, steps, dict(options), model=model, dataset="shapes32", num_samples=256, seeds=(0, 1, 2),
               quick_num_samples=128, quick_seeds=(0, 1), metrics=metrics)


EDIT_METRICS = ("edit-background", "edit-clip", "reconstruction")


def edit(method: str, steps: int = 50, quick_options: Mapping[str, Any] | None = None, **options: Any) -> Arm:
    """An editor on embedded-edits: 64 edits, one seed, 50 steps (--quick: 8 edits, 10 steps)."""
    return Arm(method, steps, dict(options), model="embedded-t2i", dataset="embedded-edits", num_samples=64,
               seeds=(0,), quick_num_samples=8, quick_seeds=(0,), quick_steps=10, metrics=EDIT_METRICS,
               quick_options=dict(quick_options or {}))


PERSONALIZATION_METRICS = ("clip-i", "dino", "latency")
PERSONALIZATION_QUICK = {"train_steps": 40, "drift_samples": 0}


def personalize(method: str, steps: int = 25, metrics: tuple[str, ...] = PERSONALIZATION_METRICS,
                quick_options: Mapping[str, Any] | None = None, **options: Any) -> Arm:
    """A personalization method on embedded-concepts (suites/personalization.yaml): 96 samples (2 subjects x 6
    prompts x 8), one seed, DDIM 25 steps; --quick: 12 samples, 10 steps, 40 training steps, no prior-drift
    samples."""
    quick = {**PERSONALIZATION_QUICK, **(quick_options or {})}
    if options.get("train_steps") == 0:
        quick.pop("train_steps")
    return Arm(method, steps, dict(options), model="embedded-t2i", dataset="embedded-concepts", num_samples=96,
               seeds=(0,), quick_num_samples=12, quick_seeds=(0,), quick_steps=10, metrics=metrics,
               batch_size=96, quick_options=quick)


RESTORATION_METRICS = ("restoration", "fid", "latency")


def restore(method: str, steps: int = 100, quick_steps: int = 20, **options: Any) -> Arm:
    """A restorer on embedded-restoration (inpainting, 4x SR and colorization in turn) with the embedded pixel DDPM:
    1000 items x 3 seeds at 100 steps (DDNM's); --quick: 128 items (FID needs twice shapes-cnn16's 64 dimensions),
    one seed, 20 steps. A method without network calls (pseudo-inverse) passes steps=1, quick_steps=1."""
    return Arm(method, steps, dict(options), model="embedded-ddpm", dataset="embedded-restoration", num_samples=1000,
               seeds=(0, 1, 2), quick_num_samples=128, quick_seeds=(0,), quick_steps=quick_steps,
               metrics=RESTORATION_METRICS)
