"""Flow-matching Heun: Heun's second-order method (Karras et al. 2022, Algorithm 1) on the flow ODE."""

from __future__ import annotations

from bench.claim import Claim, embedded_flow, flow
from bench.interfaces import MethodCard
from methods.flow_matching import FlowMatchingSampler


class FlowHeun(FlowMatchingSampler):
    name = "flow-heun"
    summary = "Heun steps of the flow ODE (FlowMatchHeunDiscreteScheduler); two NFE per step but the last"
    paper = "Karras et al. 2022, Elucidating the Design Space of Diffusion-Based Generative Models"
    card = MethodCard(
        citation="Tero Karras, Miika Aittala, Timo Aila, Samuli Laine. Elucidating the Design Space of "
        "Diffusion-Based Generative Models. NeurIPS 2022 (arXiv 2206.00364).",
        url="https://arxiv.org/abs/2206.00364",
        reproduces="Algorithm 1 (Heun's 2nd order, deterministic) on the velocity of a flow-matching model, by "
        "diffusers' FlowMatchHeunDiscreteScheduler: an Euler step corrected by the velocity at its end, first order "
        "on the last step to sigma 0, so NFE = 2 steps - 1 (counted). Its sigmas are its own (the scheduler's "
        "linspace with the static shift; a dynamically shifted model's exp(mu) as that shift, the same sigma map); "
        "FluxPipeline cannot run it (it passes sigmas, which the scheduler does not take).",
        reference="",
        embedded_claim="",
    )
    claims = (
        Claim("at-or-below-euler-at-equal-nfe", "on SD3-medium, Heun at 14 steps (27 NFE) is at or below Euler at 28 "
              "steps (28 NFE) in FID, within 10%",
              "Karras et al. 2022, Sec. 3 and Fig. 2: Heun's second-order step beats Euler at equal NFE on the "
              "probability-flow ODE (verify for flow matching)", "fid",
              (("heun 14", flow("flow-heun", 14)), ("euler 28", flow("flow-euler", 28))), "at-most", margin=0.1,
              relative=True),
        Claim("embedded-at-or-below-euler-at-equal-nfe", "on the embedded SD3-layout flow, Heun at 14 steps (27 NFE) "
              "is at or below Euler at 28 steps (28 NFE) in FID, within 10%",
              "Karras et al. 2022, Sec. 3 and Fig. 2 (on diffusion ODEs; for flow matching: verify)", "fid",
              (("heun 14", embedded_flow("flow-heun", 14)), ("euler 28", embedded_flow("flow-euler", 28))), "at-most",
              margin=0.1, relative=True),
    )
    scheduler_class = "FlowMatchHeunDiscreteScheduler"
