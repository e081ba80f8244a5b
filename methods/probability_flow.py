"""Sampling by the probability-flow ODE with an adaptive solver: Song et al. 2021, "Score-Based Generative Modeling
through Stochastic Differential Equations", ICLR 2021, section 4.3 (eq. 13) and appendix D.3."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from bench import sampling
from bench.claim import Claim, pixel
from bench.errors import BenchError
from bench.interfaces import Batch, DiffusionModel, Method, MethodCard
from bench.sde import ATOL, RTOL, SCORE_VE, VE_SAMPLING_EPS, VP_SAMPLING_EPS, data_range, sde_of, solve_rk45
from bench.spec import RunSpec
from bench.validate import check_option

CITATION = ("Yang Song, Jascha Sohl-Dickstein, Diederik P. Kingma, Abhishek Kumar, Stefano Ermon, Ben Poole. "
            "Score-Based Generative Modeling through Stochastic Differential Equations. ICLR 2021 (arXiv 2011.13456).")
URL = "https://arxiv.org/abs/2011.13456"
STEPS = RunSpec.steps  # --steps: an adaptive solver has none; only the default is taken (one protocol per result)
NFE_BOUND = 250.0  # a quarter of ancestral sampling's 1000 steps: "far fewer"


def to_images(x: torch.Tensor, model: DiffusionModel) -> torch.Tensor:
    """Samples in the model's data range to images in [-1, 1]."""
    lo, hi = data_range(model)
    return ((x.float() - lo) / (hi - lo) * 2 - 1).clamp(-1, 1)


def sampling_eps(model: DiffusionModel) -> float:
    """Where sampling stops: 1e-3 for VP models, 1e-5 for VE (the official configs' sampling.eps)."""
    return VE_SAMPLING_EPS if model.kind == SCORE_VE else VP_SAMPLING_EPS


@dataclass(frozen=True)
class ProbabilityFlowArgs:
    rtol: float = field(default=RTOL, metadata={"help": "RK45's relative tolerance (the paper's 1e-5)"})
    atol: float = field(default=ATOL, metadata={"help": "RK45's absolute tolerance (the paper's 1e-5)"})

    def __post_init__(self) -> None:
        check_option("rtol", self.rtol, 0, 1, lo_open=True)
        check_option("atol", self.atol, 0, 1, lo_open=True)


class ProbabilityFlow(Method):
    name = "probability-flow"
    summary = "the probability-flow ODE (Song et al. 2021, eq. 13) from T to eps with adaptive RK45; NFE counted"
    paper = "Song et al. 2021, Score-Based Generative Modeling through Stochastic Differential Equations"
    card = MethodCard(
        citation=CITATION,
        url=URL,
        reproduces="Section 4.3 / appendix D.3: dx/dt = f(x, t) - g(t)^2/2 score(x, t) from x_T ~ the prior to t = eps "
        "(1e-3 for VP models, 1e-5 for VE), RK45 at rtol = atol = 1e-5 (options), the SDE from the model's "
        "schedule (bench.sde: VP linear or cosine with the epsilon network's score -eps/sigma_t, VE with NCSN++'s "
        "score). scipy's RK45 tableau and step rule with one step size per sample, so a sample does not depend on "
        "its batch. --steps has no meaning for an adaptive solver: only its default is taken; NFE is what the "
        "solver spent (nfe: the batch's denoiser calls; evaluations_per_sample: each sample's own). No final "
        "denoising step.",
        reference="CIFAR-10, DDPM++ cont. (VP): 2.99 bits/dim (abstract); the ODE sampler reaches FIDs close to "
        "the SDE samplers' with far fewer evaluations, adaptively (section 4.3, Figure 3).",
        embedded_claim="On shapes16 with embedded-ddpm: the ODE's FID is at most a stated margin above ancestral "
        "DDPM at 1000 steps, and it spends at most 250 NFE. Decided by `bench claims --method probability-flow`.",
    )
    Args = ProbabilityFlowArgs
    model_kinds = ("pixel-diffusion", SCORE_VE)
    claims = (
        Claim("ode-fid-near-ancestral-1000", "the adaptive probability-flow ODE reaches an FID at most 25% above "
              "ancestral DDPM sampling at 1000 steps",
              "Song et al. 2021, section 4.3 and Figure 3: ODE samples of quality close to the SDE's", "fid",
              (("probability-flow RK45", pixel("probability-flow", STEPS, quick_seeds=(0,))),
               ("ddpm 1000", pixel("ddpm", 1000, quick_seeds=(0,)))), "at-most", margin=0.25, relative=True,
              note="does not hold at --quick size (128 samples, one seed; the values: `bench claims --method "
              "probability-flow --quick`): the ODE's samples of the 5000-update embedded model are worse than "
              "ancestral sampling's (likely: an ODE keeps the model's errors, which fresh noise corrects; Karras "
              "et al. 2022, section 4); "
              "full size not measured yet"),
        Claim("far-fewer-nfe", "the adaptive ODE solver spends far fewer network evaluations than ancestral "
              "sampling's 1000 (at most a quarter)",
              "Song et al. 2021, section 4.3: adaptive RK45 on the probability-flow ODE, fewer NFE than the 1000 "
              "steps of ancestral sampling", "nfe",
              (("probability-flow RK45", pixel("probability-flow", STEPS, quick_seeds=(0,))),), "at-most",
              tolerance="margin", bound=NFE_BOUND,
              note="does not hold at --quick size (`bench claims --method probability-flow --quick` gives the "
              "NFE): at rtol = atol = 1e-5 RK45 spends more than a quarter of 1000 evaluations on the embedded "
              "model; fewer than ancestral sampling's 1000 all the same"),
    )

    def check(self, model: DiffusionModel, steps: int) -> None:
        super().check(model, steps)
        sde_of(model, owner=f"method {self.name!r}")
        if steps != STEPS:
            raise BenchError(f"method {self.name!r} solves the ODE adaptively: --steps means nothing to it (leave "
                             f"it at {STEPS}); set --rtol / --atol, and read the NFE the run counts")

    def protocol(self, model: DiffusionModel) -> dict[str, Any]:
        return {"sde": sde_of(model).identity(), "solver": "RK45, scipy's tableau and step rule, one step size per "
                "sample", "t": [1.0, sampling_eps(model)], "data_range": list(data_range(model))}

    @torch.no_grad()
    def generate(self, model: DiffusionModel, batch: Batch, denoiser) -> torch.Tensor:
        sde = sde_of(model)
        param = next(model.unet.parameters())
        _, h, w = model.sample_shape
        shape = (model.unet.config.in_channels, h, w)
        x = sampling.cpu_noise(sampling.generators(batch.seeds), shape) * sde.prior_std

        def fun(t: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            xs = y.reshape(len(y), *shape).to(param.device, torch.float32)
            tt = t.to(param.device, torch.float32)
            out = denoiser(xs.to(param.dtype), sde.label(tt)).float()
            return sde.ode_drift(xs, tt, sde.score(out, xs, tt)).double().cpu().flatten(1)

        sol = solve_rk45(fun, x.flatten(1).double(), sde.T, sampling_eps(model), self.args.rtol, self.args.atol)
        return to_images(sol.y.reshape(len(x), *shape), model).to(param.device)
