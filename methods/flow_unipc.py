"""UniPC on flow sigmas: Zhao et al. 2023's predictor-corrector with a flow-matching model's velocity."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.claim import Claim, embedded_flow, flow
from bench.interfaces import DiffusionModel, MethodCard
from methods.flow_matching import FlowArgs, FlowMatchingSampler
from methods.sampling import check_order
from methods.unipc import UniPC


@dataclass(frozen=True)
class FlowUniPCArgs(FlowArgs):
    solver_order: int = field(default=2, metadata={"help": "order p of the UniP predictor (UniC raises it by one)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_order("solver_order", self.solver_order, 1, 3)


class FlowUniPC(FlowMatchingSampler):
    name = "flow-unipc"
    summary = "UniPC (UniP-2 with UniC, bh2) on flow sigmas (use_flow_sigmas, flow_prediction, flow_shift)"
    paper = "Zhao et al. 2023, UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models"
    card = MethodCard(
        citation=UniPC.card.citation,
        url=UniPC.card.url,
        reproduces="UniP-p with UniC-p (B(h) = e^h - 1) with alpha_t = 1 - sigma, sigma_t = sigma and the data "
        "prediction x0 = x - sigma v, by diffusers' UniPCMultistepScheduler(use_flow_sigmas=True, "
        "prediction_type='flow_prediction', flow_shift): the scheduler's own flow sigmas, shifted by flow_shift "
        "(--shift, else the model's shift, else exp(mu) of a dynamically shifted model); NFE = steps.",
        reference="",
        embedded_claim="",
    )
    claims = (
        Claim("10-steps-near-euler-28", "on SD3-medium, UniPC (flow sigmas) at 10 steps is at or below Euler at 28 "
              "steps in FID, within 10%",
              "Zhao et al. 2023, Sec. 5: UniPC improves few-step sampling at 5-10 NFE (on diffusion models; on flow "
              "sigmas: verify)", "fid",
              (("unipc 10", flow("flow-unipc", 10)), ("euler 28", flow("flow-euler", 28))), "at-most", margin=0.1,
              relative=True),
        Claim("embedded-10-steps-near-euler-28", "on the embedded SD3-layout flow, UniPC (flow sigmas) at 10 steps is at "
              "or below Euler at 28 steps in FID, within 10%", "the same claim as on SD3-medium, on the embedded world",
              "fid", (("unipc 10", embedded_flow("flow-unipc", 10)), ("euler 28", embedded_flow("flow-euler", 28))),
              "at-most", margin=0.1, relative=True),
    )
    Args = FlowUniPCArgs
    scheduler_class = "UniPCMultistepScheduler"

    def shift_overrides(self, model: DiffusionModel) -> dict[str, Any]:
        return {"flow_shift": self.static_shift(model), "use_dynamic_shifting": False}

    def scheduler_overrides(self, model: DiffusionModel) -> dict[str, Any]:
        return {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "solver_order": self.args.solver_order}
