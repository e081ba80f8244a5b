"""DDIM: Song, Meng and Ermon, "Denoising Diffusion Implicit Models", ICLR 2021 (arXiv 2010.02502)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.claim import Claim, pixel
from bench.interfaces import MethodCard
from bench.validate import check_option
from methods.sampling import SchedulerSampler, ZeroTerminalSNRArgs


@dataclass(frozen=True)
class DDIMArgs(ZeroTerminalSNRArgs):
    eta: float = field(default=0.0, metadata={"help": "0: deterministic DDIM; 1: DDPM-like noise (Song et al. eq. 16)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option("eta", self.eta, 0.0, 1.0)


class DDIM(SchedulerSampler):
    name = "ddim"
    summary = "DDIM sampler (eta interpolates deterministic DDIM and DDPM-like noise)"
    paper = "Song et al. 2021, Denoising Diffusion Implicit Models"
    card = MethodCard(
        citation="Jiaming Song, Chenlin Meng, Stefano Ermon. Denoising Diffusion Implicit Models. ICLR 2021.",
        url="https://arxiv.org/abs/2010.02502",
        reproduces="Table 1: FID falls with the number of steps, and eta=0 beats eta=1 at few steps. eta=0 matches "
        "a from-the-paper eq. 12 to 1e-5 relative (tests/test_samplers.py).",
        reference="CIFAR-10 FID, eta=0: 13.36 / 6.84 / 4.67 / 4.16 / 4.04 at 10 / 20 / 50 / 100 / 1000 steps.",
        embedded_claim="FID falls with the steps (50 against 5), eta = 0 beats eta = 1 at 10 steps, and DDIM "
        "beats DDPM's "
        "ancestral sampler at 10 and 20 steps on shapes16. Decided by `bench claims --method ddim` (the "
        "verdict and the values: its latest MLflow claims run, `bench report`).",
    )
    Args = DDIMArgs
    claims = (
        Claim("more-steps-lower-fid", "FID falls with the number of steps: DDIM 50 steps is clearly below DDIM 5",
              "CIFAR-10 FID, eta=0 (Table 1): 13.36 / 6.84 / 4.67 at 10 / 20 / 50 steps", "fid",
              (("ddim 50", pixel("ddim", 50)), ("ddim 5", pixel("ddim", 5))), "less"),
        Claim("eta0-beats-eta1", "at few steps the deterministic sampler (eta = 0) beats eta = 1 (DDPM-like noise)",
              "CIFAR-10 FID at 10 steps (Table 1): eta=0 13.36, eta=1 41.07", "fid",
              (("eta 0", pixel("ddim", 10)), ("eta 1", pixel("ddim", 10, eta=1.0))), "less"),
        Claim("beats-ddpm-10-steps", "at 10 steps DDIM (eta = 0) has a far lower FID than DDPM's ancestral sampler",
              "CIFAR-10 FID at 10 steps (Table 1): 13.36 against 367.43 (DDPM, sigma-hat)", "fid",
              (("ddim 10", pixel("ddim", 10)), ("ddpm 10", pixel("ddpm", 10))), "less"),
        Claim("beats-ddpm-20-steps", "at 20 steps DDIM (eta = 0) has a lower FID than DDPM's ancestral sampler",
              "CIFAR-10 FID at 20 steps (Table 1): 6.84 against 133.37 (DDPM, sigma-hat)", "fid",
              (("ddim 20", pixel("ddim", 20, quick_seeds=(0,))),
               ("ddpm 20", pixel("ddpm", 20, quick_seeds=(0,)))), "less",
              note="was a strict xfail in tests/test_claims.py: the embedded model's DDIM over-produces gray "
              "backgrounds at 20 steps"),
    )
    scheduler_class = "DDIMScheduler"

    def step_kwargs(self) -> dict[str, Any]:
        return {"eta": float(self.args.eta)}
