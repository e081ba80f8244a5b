"""Flow-matching Euler: the sampler of rectified flow (Liu et al. 2023) as SD3 and FLUX ship it (Esser et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.claim import Claim, embedded_flow, flow
from bench.interfaces import Batch, DiffusionModel, MethodCard
from bench.validate import check_option
from methods.flow_matching import FlowArgs, FlowMatchingSampler, flux_sigmas

PROBE_MAX = 1024


@dataclass(frozen=True)
class FlowEulerArgs(FlowArgs):
    straightness_probe: int = field(default=0, metadata={
        "omit_default": True,
        "help": "measure the flow's path straightness (Liu et al. 2023, eq. 2) before sampling on the run's first N "
                "samples (their seeds and prompts; the run's steps and guidance), recorded as path_straightness; "
                "0: off"})

    uniform_sigmas: bool = field(default=False, metadata={
        "omit_default": True,
        "help": "Euler on uniform sigmas k/N (Liu et al.'s steps; FluxPipeline's linspace(1, 1/N, N)) instead of the "
                "SD3 pipeline's linspace(1, 1/1000, N), whose last step runs from sigma 0.001 to 0 (so that its 2 "
                "steps are about 1); shifted as the model's shift says"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option("straightness_probe", self.straightness_probe, 0, PROBE_MAX, integer=True)


def path_straightness(velocities: list[torch.Tensor], sigmas: torch.Tensor) -> torch.Tensor:
    """Per sample, Liu et al.'s straightness of an Euler trajectory, made scale-free: the sigma-weighted mean of
    ||v_k - D||^2 over the steps, over ||D||^2, where D = sum_k dsigma_k v_k / sum_k dsigma_k is the straight
    line's velocity (the chord from the noise to the sample). 0: a straight path (one Euler step is exact)."""
    dsigma = (sigmas[:-1] - sigmas[1:]).to(velocities[0])
    v = torch.stack([u.flatten(1) for u in velocities])  # [steps, n, d]
    w = dsigma.view(-1, 1, 1)
    chord = (w * v).sum(0) / dsigma.sum()
    deviation = (w * (v - chord).pow(2).sum(-1, keepdim=True)).sum(0).squeeze(-1) / dsigma.sum()
    return deviation / chord.pow(2).sum(-1).clamp_min(1e-12)


class FlowEuler(FlowMatchingSampler):
    Args = FlowEulerArgs
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
        Claim("embedded-fid-falls-with-steps", "on the embedded SD3-layout flow, FID at 28 Euler steps is below FID "
              "at 8 steps", "the same claim as on SD3-medium, on the embedded world", "fid",
              (("euler 28", embedded_flow("flow-euler", 28)), ("euler 8", embedded_flow("flow-euler", 8))), "less"),
        # reflow (Liu et al. 2023) on the embedded SD3-layout flow; no guidance: the flows the paper straightens
        Claim("reflow-straightens", "reflow (the 2-rectified flow, trained on the 1-rectified flow's own noise-image "
              "pairs) makes the ODE's paths straighter",
              "Liu et al. 2023, Fig. 7 and 4.1: straightness S(Z) falls with each reflow (1-RF to 2-RF); here S is made "
              "scale-free (path_straightness, methods/flow_euler.py) and measured on 64 Euler-16 trajectories",
              "path_straightness",
              (("2-rectified flow", embedded_flow("flow-euler", 16, "embedded-flow-reflow", ("fid",), guidance=1,
                                                  straightness_probe=64)),
               ("1-rectified flow", embedded_flow("flow-euler", 16, "embedded-flow", ("fid",), guidance=1,
                                                  straightness_probe=64))), "less"),
        Claim("logit-normal-beats-uniform", "at equal training budget, rectified flow trained with logit-normal "
              "timestep sampling samples better (FID) than with uniform t",
              "Esser et al. 2024, Table 1 and 5.1: rf/lognorm(0.00, 1.00) is the best-ranked rectified-flow variant, "
              "above rf with uniform t, across 25 and 50 sampling steps (verify the ranks)", "fid",
              (("logit-normal t", embedded_flow("flow-euler", 25)),
               ("uniform t", embedded_flow("flow-euler", 25, "embedded-flow-uniform"))), "less",
              note="embedded-flow-uniform is embedded-flow's recipe (3000 x 64, the same seed) with uniform t "
              "(`bench embedded train flow-uniform`); 256 samples x 3 seeds at Euler 25 with CFG 7"),
        Claim("reflow-one-step-fid", "after reflow, one Euler step samples far better than the 1-rectified flow's "
              "one step (FID)",
              "Liu et al. 2023, Table 1 (CIFAR-10, one Euler step): 1-rectified flow FID 378 against 2-rectified flow "
              "12.21 (no distillation in either; as recalled from the paper: verify)", "fid",
              (("2-rectified flow, 1 step", embedded_flow("flow-euler", 1, "embedded-flow-reflow", guidance=1)),
               ("1-rectified flow, 1 step", embedded_flow("flow-euler", 1, "embedded-flow", guidance=1))), "less"),
        Claim("reflow-two-step-fid", "after reflow, two Euler steps sample better than the 1-rectified flow's two",
              "Liu et al. 2023, Fig. 9: the 2-rectified flow's FID at few Euler steps is below the 1-rectified "
              "flow's", "fid",
              (("2-rectified flow, 2 steps", embedded_flow("flow-euler", 2, "embedded-flow-reflow", guidance=1,
                                                           uniform_sigmas=True)),
               ("1-rectified flow, 2 steps", embedded_flow("flow-euler", 2, "embedded-flow", guidance=1,
                                                           uniform_sigmas=True))), "less",
              note="Liu et al.'s uniform Euler steps (--uniform-sigmas): the SD3 pipeline's 2-step schedule is "
              "sigma 1, 0.001, 0, one step in effect (measured: the same FID as 1 step)"),
    )

    def shift_overrides(self, model: DiffusionModel) -> dict[str, Any]:
        # the model's own shift (static, or dynamic with mu) unless --shift replaces it with a static one
        if self.args.shift is None:
            return {}
        return {"shift": float(self.args.shift), "use_dynamic_shifting": False}

    def set_timesteps(self, scheduler, model: DiffusionModel, steps: int) -> None:
        mu = self.mu(model)
        kwargs = {"mu": mu} if mu is not None else {}
        if model.family == "flux" or self.args.uniform_sigmas:
            scheduler.set_timesteps(sigmas=flux_sigmas(steps), **kwargs)
        else:
            scheduler.set_timesteps(steps, **kwargs)

    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    takes_mu = True

    def protocol(self, model: DiffusionModel) -> dict[str, Any]:
        out = super().protocol(model)
        if self.args.uniform_sigmas:
            out["schedule"] = "uniform: sigmas linspace(1, 1/steps, steps), then the model's shift"
        if self.args.straightness_probe:
            out["straightness"] = ("path_straightness: Liu et al. 2023 eq. 2 on the Euler trajectories of the run's "
                                   "first straightness_probe samples, scale-free (methods/flow_euler.py)")
        return out

    def prepare(self, model: DiffusionModel, spec: Any, workdir: Path) -> dict[str, float]:
        n = min(self.args.straightness_probe, spec.num_samples)
        if not n:
            return {}
        from bench.datasets import load_dataset
        from bench.denoiser import sample_seed

        prompts = [p.text for p in load_dataset(spec.dataset).prompts(n)]
        seeds = [sample_seed(spec.seed, i) for i in range(n)]
        unet = model.unet

        def plain(x, timestep, **kwargs):  # not the run's counting denoiser: the probe's NFE are not the run's
            return unet(hidden_states=x, timestep=timestep, **kwargs).sample

        values = []
        with torch.no_grad():
            for a in range(0, n, spec.batch_size):
                trace: dict = {}
                batch = Batch(tuple(seeds[a:a + spec.batch_size]), spec.steps, prompts=tuple(prompts[a:a + spec.batch_size]))
                self.sample(model, batch, plain, trace)
                values.append(path_straightness(trace["velocities"], trace["sigmas"]))
        return {"path_straightness": float(torch.cat(values).mean())}
