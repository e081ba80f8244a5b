"""Flow-matching Euler: the sampler of rectified flow (Liu et al. 2023) as SD3 and FLUX ship it (Esser et al. 2024)."""

from __future__ import annotations

from typing import Any

from bench.claim import Claim, flow
from bench.interfaces import DiffusionModel, MethodCard
from methods.flow_matching import FlowMatchingSampler, flux_sigmas


class FlowEuler(FlowMatchingSampler):
    name = "flow-euler"
    summary = "Euler steps of the flow ODE (FlowMatchEulerDiscreteScheduler): SD3's and FLUX's own sampler"
    paper = "Esser et al. 2024, Scaling Rectified Flow Transformers for High-Resolution Image Synthesis"
    card = MethodCard(
        citation="Patrick Esser, Sumith Kulal, Andreas Blattmann, et al. Scaling Rectified Flow Transformers for "
        "High-Resolution Image Synthesis. ICML 2024 (arXiv 2403.03206).",
        url="https://arxiv.org/abs/2403.03206",
        reproduces="The Euler discretization of dx/dt = v(x, t) from sigma 1 to 0 on the shifted schedule (eq. 23, "
        "shift s from the model's scheduler config, or resolution-dependent, exp(mu), where it shifts dynamically), "
        "with the pipelines' sigmas and guidance. With the same latents it gives StableDiffusion3Pipeline's and "
        "FluxPipeline's images to 1e-4 (tests/test_flow_samplers.py); NFE = steps (x2 batch rows with SD3's CFG).",
        reference="No FID table on a public checkpoint is reproduced here (the checkpoints cannot be downloaded on "
        "this project's machines).",
        embedded_claim="",
    )
    claims = (
        Claim("fid-falls-with-steps", "on SD3-medium, FID at the pipeline's 28 Euler steps is below FID at 8 steps",
              "Esser et al. 2024 sample SD3 with Euler steps; StableDiffusion3Pipeline's default is 28 (no FID-versus-"
              "steps table for the released model: verify)", "fid",
              (("euler 28", flow("flow-euler", 28)), ("euler 8", flow("flow-euler", 8))), "less"),
    )

    def shift_overrides(self, model: DiffusionModel) -> dict[str, Any]:
        # the model's own shift (static, or dynamic with mu) unless --shift replaces it with a static one
        if self.args.shift is None:
            return {}
        return {"shift": float(self.args.shift), "use_dynamic_shifting": False}

    def set_timesteps(self, scheduler, model: DiffusionModel, steps: int) -> None:
        mu = self.mu(model)
        kwargs = {"mu": mu} if mu is not None else {}
        if model.family == "flux":
            scheduler.set_timesteps(sigmas=flux_sigmas(steps), **kwargs)
        else:
            scheduler.set_timesteps(steps, **kwargs)

    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    takes_mu = True
