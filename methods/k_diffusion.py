"""Samplers of Katherine Crowson's k-diffusion (github.com/crowsonkb/k-diffusion) that have no paper of their own:
ancestral Euler, linear multistep and DPM-Solver-2 in the sigma parametrisation of Karras et al. 2022."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.claim import Claim, pixel
from bench.interfaces import MethodCard
from methods.sampling import (
    KarrasSigmasArgs,
    SchedulerSampler,
    TimestepSpacingArgs,
    ZeroTerminalSNRArgs,
    check_order,
)

CITATION = "Katherine Crowson. k-diffusion: Karras et al. (2022) diffusion models for PyTorch. GitHub, 2022."
URL = "https://github.com/crowsonkb/k-diffusion"


@dataclass(frozen=True)
class EulerAncestralArgs(ZeroTerminalSNRArgs):
    pass


class EulerAncestral(SchedulerSampler):
    name = "euler-ancestral"
    summary = "ancestral sampling with Euler steps: Euler to sigma_down, then fresh noise up to sigma_next"
    paper = "Crowson 2022, k-diffusion (sample_euler_ancestral)"
    card = MethodCard(
        citation=CITATION,
        url=URL,
        reproduces="k-diffusion's sample_euler_ancestral with eta=1: the DDPM posterior's noise split into "
        "sigma_down and sigma_up; one NFE per step, per-sample noise from each sample's seed.",
        reference="",
        embedded_claim="At 50 steps its FID is near DDPM's at 1000 on shapes16, and worse than Euler's at 10 "
        "steps. Decided "
        "by `bench claims --method euler-ancestral` (the verdict and the values: its latest MLflow claims "
        "run, `bench report`).",
    )
    Args = EulerAncestralArgs
    claims = (
        Claim("50-steps-near-ddpm-1000", "ancestral Euler at 50 steps is near DDPM at 1000 steps",
              "k-diffusion (no paper table)", "fid",
              (("euler-a 50", pixel("euler-ancestral", 50, quick_seeds=(0,))),
               ("ddpm 1000", pixel("ddpm", 1000, quick_seeds=(0,)))), "within", margin=0.1,
              relative=True),
        Claim("10-steps-worse-than-euler", "at 10 steps the ancestral sampler is worse than the ODE Euler sampler",
              "k-diffusion (no paper table)", "fid",
              (("euler-a 10", pixel("euler-ancestral", 10, quick_seeds=(0,))),
               ("euler 10", pixel("euler", 10, quick_seeds=(0,)))), "greater"),
    )
    scheduler_class = "EulerAncestralDiscreteScheduler"


@dataclass(frozen=True)
class LMSArgs(KarrasSigmasArgs, TimestepSpacingArgs):
    order: int = field(default=4, metadata={"help": "number of past derivatives of the linear multistep (1: Euler)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_order("order", self.order, 1, 4)


class LMS(SchedulerSampler):
    name = "lms"
    summary = "linear multistep in sigma: Adams-Bashforth weights integrated over the sigma steps, order 4"
    paper = "Crowson 2022, k-diffusion (sample_lms)"
    card = MethodCard(
        citation=CITATION,
        url=URL,
        reproduces="k-diffusion's sample_lms: the derivative (x - D(x)) / sigma of the last `order` steps "
        "combined with Lagrange-polynomial weights integrated numerically over each sigma step; NFE = steps.",
        reference="",
        embedded_claim="LMS at 20 steps has an FID near Euler at 50 on shapes16. Decided by `bench claims "
        "--method lms` (the "
        "verdict and the values: its latest MLflow claims run, `bench report`).",
    )
    Args = LMSArgs
    claims = (
        Claim("20-steps-near-euler-50", "LMS at 20 steps is near Euler at 50 steps",
              "k-diffusion (no paper table)", "fid",
              (("lms 20", pixel("lms", 20, quick_seeds=(0,))), ("euler 50", pixel("euler", 50, quick_seeds=(0,)))),
              "within", margin=0.1,
              relative=True),
    )
    scheduler_class = "LMSDiscreteScheduler"

    def step_kwargs(self) -> dict[str, Any]:
        return {"order": self.args.order}


@dataclass(frozen=True)
class KDPM2Args(KarrasSigmasArgs, TimestepSpacingArgs):
    pass


class KDPM2(SchedulerSampler):
    name = "kdpm2"
    summary = "k-diffusion's DPM-Solver-2: a midpoint step at the geometric-mean sigma, 2 NFE per step but the last"
    paper = "Crowson 2022, k-diffusion (sample_dpm_2), after Lu et al. 2022 and Karras et al. 2022"
    card = MethodCard(
        citation=CITATION + " After Lu et al., DPM-Solver, NeurIPS 2022, and Karras et al., EDM, NeurIPS 2022.",
        url=URL,
        reproduces="k-diffusion's sample_dpm_2: an Euler half step to sigma_mid = sqrt(sigma * sigma_next), then "
        "the full step with the derivative there (DPM-Solver-2 in sigma, the second-order step of Karras et "
        "al.'s Algorithm 2); the last step to sigma 0 is Euler, so NFE = 2 * steps - 1.",
        reference="",
        embedded_claim="KDPM2 at 10 steps (19 NFE) has an FID near Heun at 10 steps (19 NFE) on shapes16. Decided "
        "by `bench "
        "claims --method kdpm2` (the verdict and the values: its latest MLflow claims run, `bench report`).",
    )
    Args = KDPM2Args
    claims = (
        Claim("near-heun-equal-nfe", "KDPM2 at 10 steps is near Heun at 10 steps (both 19 NFE)",
              "k-diffusion (no paper table); Karras et al. 2022, Algorithm 2", "fid",
              (("kdpm2 10", pixel("kdpm2", 10, quick_seeds=(0,))),
               ("heun 10", pixel("heun", 10))), "within", margin=0.1,
              relative=True),
    )
    scheduler_class = "KDPM2DiscreteScheduler"
