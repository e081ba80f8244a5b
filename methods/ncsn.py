"""Annealed Langevin dynamics: Song and Ermon 2019, "Generative Modeling by Estimating Gradients of the Data
Distribution", NeurIPS 2019, Algorithm 1."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from bench import sampling
from bench.claim import Claim
from bench.errors import BenchError
from bench.interfaces import Batch, DiffusionModel, Method, MethodCard
from bench.sde import SCORE_VE, data_range, sde_of
from bench.validate import check_bool, check_option
from methods.probability_flow import to_images
from methods.score_sde import ncsn_arm


def arm(steps: int, quick_steps: int, **options: Any):
    """annealed Langevin on embedded-ncsn: 128 samples (FID's minimum) x 3 seeds, --quick 128 x 2 at fewer steps."""
    from dataclasses import replace

    return replace(ncsn_arm("ncsn", steps, quick_steps=quick_steps, **options), num_samples=128)


@dataclass(frozen=True)
class NCSNArgs:
    levels: int = field(default=10, metadata={"help": "noise levels L, geometric from sigma_1 to sigma_L (paper: 10)"})
    steps_per_level: int | None = field(default=None, metadata={
        "help": "Langevin steps per level T (paper: 100, i.e. --steps 1000); default: --steps / --levels"})
    step_size: float = field(default=2e-5, metadata={
        "help": "epsilon: level i takes steps alpha_i = epsilon sigma_i^2 / sigma_L^2 (paper: 2e-5)"})
    sigma_max: float | None = field(default=None, metadata={
        "help": "sigma_1, the largest level; default: the model's sigma_max"})
    sigma_min: float | None = field(default=None, metadata={
        "help": "sigma_L, the smallest level; default: the model's sigma_min"})
    single_level: bool = field(default=False, metadata={
        "help": "every step at sigma_L with step epsilon (the paper's failure case, section 3.2.1)"})
    denoise: bool = field(default=False, metadata={
        "help": "a final Tweedie step x + sigma_L^2 s(x, sigma_L) (NCSNv2; one more NFE); the paper has none"})

    def __post_init__(self) -> None:
        check_option("levels", self.levels, 1, integer=True)
        check_option("steps_per_level", self.steps_per_level, 1, integer=True, optional=True)
        check_option("step_size", self.step_size, 0, lo_open=True)
        check_option("sigma_max", self.sigma_max, 0, lo_open=True, optional=True)
        check_option("sigma_min", self.sigma_min, 0, lo_open=True, optional=True)
        check_bool("single_level", self.single_level)
        check_bool("denoise", self.denoise)
        if self.sigma_max is not None and self.sigma_min is not None and self.sigma_min >= self.sigma_max:
            raise ValueError(f"--sigma-min {self.sigma_min} must be below --sigma-max {self.sigma_max}")


class NCSN(Method):
    name = "ncsn"
    summary = "annealed Langevin dynamics over geometric noise levels (Song and Ermon 2019, Algorithm 1)"
    paper = "Song and Ermon 2019, Generative Modeling by Estimating Gradients of the Data Distribution"
    card = MethodCard(
        citation="Yang Song, Stefano Ermon. Generative Modeling by Estimating Gradients of the Data Distribution. "
        "NeurIPS 2019 (arXiv 1907.05600).",
        url="https://arxiv.org/abs/1907.05600",
        reproduces="Algorithm 1 on a noise-conditional score model (a ScoreSdeVe folder: the UNet takes sigma and "
        "returns the score): L levels geometric from sigma_1 to sigma_L (the model's sigma_max and sigma_min "
        "unless given), T Langevin steps each, x <- x + alpha_i/2 s(x, sigma_i) + sqrt(alpha_i) z with alpha_i = "
        "epsilon sigma_i^2 / sigma_L^2, from uniform noise over the data range. --steps is the total L x T (the "
        "NFE; the paper's L = 10, T = 100 is --steps 1000); --single-level puts every step at sigma_L (section "
        "3.2.1's failure case), --denoise adds NCSNv2's final Tweedie step.",
        reference="CIFAR-10: inception score 8.87, FID 25.32 (Table 1); without annealing Langevin dynamics fails "
        "to mix between modes and gets their weights wrong (section 3.2.1, Figure 3).",
        embedded_claim="On shapes16 with embedded-ncsn: annealing beats a single noise level at equal NFE, and T = "
        "100 steps per level beats T = 10. Decided by `bench claims --method ncsn`.",
    )
    Args = NCSNArgs
    model_kinds = (SCORE_VE,)
    claims = (
        Claim("annealing-beats-single-level", "annealed Langevin dynamics (10 levels x 20 steps) beats Langevin "
              "dynamics at the smallest noise level alone at equal NFE (200)",
              "Song and Ermon 2019, section 3.2.1 and Figure 3: without annealing, Langevin dynamics cannot recover "
              "the relative weights of the modes", "fid",
              (("annealed 10 x 20", arm(200, 100)), ("single level 200", arm(200, 100, single_level=True))), "less"),
        Claim("more-steps-per-level-help", "T = 100 Langevin steps per level beat T = 10 (10 levels each)",
              "Song and Ermon 2019, section 4.2: T = 100, the steps the samples of Table 1 took", "fid",
              (("T = 100", arm(1000, 500)), ("T = 10", arm(100, 50))), "less"),
    )

    def check(self, model: DiffusionModel, steps: int) -> None:
        if model.kind != SCORE_VE:
            raise BenchError(f"method {self.name!r} samples a noise-conditional score model (a ScoreSdeVe folder, "
                             f"kind {SCORE_VE}); {model.name!r} is {model.kind}: sample it with score-sde or "
                             f"probability-flow")
        sde_of(model, owner=f"method {self.name!r}")
        self.per_level(steps)
        lo, hi = self.sigmas(model)
        if lo >= hi:
            raise BenchError(f"method {self.name!r}: sigma_L {lo} must be below sigma_1 {hi}")

    def per_level(self, steps: int) -> int:
        """T: --steps-per-level, or --steps / --levels; --steps must be L x T."""
        levels, per = self.args.levels, self.args.steps_per_level
        if per is None:
            if steps % levels:
                raise BenchError(f"method {self.name!r}: --steps {steps} (L x T Langevin steps) is not a multiple of "
                                 f"--levels {levels}")
            per = steps // levels
        elif levels * per != steps:
            raise BenchError(f"method {self.name!r}: --levels {levels} x --steps-per-level {per} = {levels * per} "
                             f"Langevin steps, but --steps is {steps}")
        return per

    def sigmas(self, model: DiffusionModel) -> tuple[float, float]:
        """(sigma_L, sigma_1)."""
        config = model.scheduler_config
        lo = self.args.sigma_min if self.args.sigma_min is not None else float(config["sigma_min"])
        hi = self.args.sigma_max if self.args.sigma_max is not None else float(config["sigma_max"])
        return lo, hi

    def levels(self, model: DiffusionModel) -> list[float]:
        """sigma_1 > ... > sigma_L, geometric; --single-level: sigma_L alone."""
        lo, hi = self.sigmas(model)
        if self.args.single_level:
            return [lo]
        n = self.args.levels
        return [hi * (lo / hi) ** (i / (n - 1)) if n > 1 else lo for i in range(n)]

    def protocol(self, model: DiffusionModel) -> dict[str, Any]:
        lo, hi = self.sigmas(model)
        return {"sigma_L": lo, "sigma_1": hi, "init": "uniform over the data range", "data_range":
                list(data_range(model))}

    @torch.no_grad()
    def generate(self, model: DiffusionModel, batch: Batch, denoiser) -> torch.Tensor:
        param = next(model.unet.parameters())
        _, h, w = model.sample_shape
        shape = (model.unet.config.in_channels, h, w)
        gens = sampling.generators(batch.seeds)
        lo, hi = data_range(model)
        x = torch.stack([torch.rand(shape, generator=g) for g in gens]).to(param.device) * (hi - lo) + lo
        per = self.per_level(batch.steps)
        levels = self.levels(model)
        if self.args.single_level:
            per = batch.steps
        sigma_l = self.sigmas(model)[0]

        def score(x: torch.Tensor, sigma: float) -> torch.Tensor:
            return denoiser(x.to(param.dtype), torch.full((len(x),), sigma, device=param.device)).float()

        for sigma in levels:
            alpha = self.args.step_size * sigma**2 / sigma_l**2
            for _ in range(per):
                z = sampling.cpu_noise(gens, shape).to(param.device)
                x = x + alpha / 2 * score(x, sigma) + math.sqrt(alpha) * z
        if self.args.denoise:
            x = x + sigma_l**2 * score(x, sigma_l)
        return to_images(x, model)
