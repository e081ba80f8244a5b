"""Chen 2023, "On the Importance of Noise Scheduling for Diffusion Models" (arXiv 2301.10972): the paper's adapter.

The paper changes training, not sampling: its input scaling b (x_t = sqrt(gamma) b x_0 + sqrt(1 - gamma) eps,
normalised to unit variance) is a shifted schedule, gamma' = b^2 gamma / (b^2 gamma + 1 - gamma), that the trained
model's scheduler config carries as ``trained_betas`` (bench.embedded.pixel_ddpm.input_scaled_betas; the recipes:
bench/recipes/noise_scheduling.py). Sampling is DDIM's (methods/ddim.py) on whichever schedule the model was trained
with; this adapter carries the paper's card and claim.
"""

from __future__ import annotations

from dataclasses import replace

from bench.claim import Arm, Claim, pixel
from bench.interfaces import MethodCard
from methods.ddim import DDIM

STEPS = 50


def ddpm32(model: str) -> Arm:
    """DDIM 50 steps on a 32x32 pixel model against shapes32 (FID, shapes-cnn32): 256 samples x 3 seeds
    (--quick: 128 x 2; FID needs twice the 64 feature dimensions)."""
    return replace(pixel("noise-scheduling", STEPS), model=model, dataset="shapes32", num_samples=256)


class NoiseScheduling(DDIM):
    name = "noise-scheduling"
    summary = "DDIM on a model trained with Chen 2023's input scaling b (a shifted noise schedule), with its claim"
    paper = "Chen 2023, On the Importance of Noise Scheduling for Diffusion Models"
    card = MethodCard(
        citation="Ting Chen. On the Importance of Noise Scheduling for Diffusion Models. arXiv 2301.10972, 2023.",
        url="https://arxiv.org/abs/2301.10972",
        reproduces="Section 2.2's input scaling with variance normalisation, as the equivalent schedule "
        "gamma' = b^2 gamma / (b^2 gamma + 1 - gamma) in a DDPMPipeline folder's trained_betas (the equivalence is "
        "tested: tests/test_edm.py); two 32x32 pixel DDPMs with the same UNet, data and budget, the default linear "
        "schedule and b = 0.5 (`bench embedded train pixel-ddpm32`, `pixel-ddpm32-shifted`), sampled by DDIM.",
        reference="Finding 2: the optimal schedule shifts towards more noise as the image grows; finding 3: "
        "scaling the input by b < 1 (log-SNR shifted by 2 log b) improves FID at higher resolutions (Tables and "
        "Figures of section 3, ImageNet 64 to 1024 with RIN).",
        embedded_claim="On shapes32 at equal training budget and equal sampler (DDIM 50), the b = 0.5 model has a "
        "lower FID than the default schedule's: holds at full size (256 samples x 3 seeds). Decided by `bench "
        "claims --method noise-scheduling`.",
    )
    claims = (
        Claim("scaled-input-beats-default-at-32", "at 32x32, the input-scaled schedule (b = 0.5) gives a lower FID "
              "than the default schedule, same network, data, training budget and sampler",
              "Chen 2023, finding 3 (abstract; section 3): input scaling b < 1 helps as resolution grows", "fid",
              (("b = 0.5", ddpm32("embedded-ddpm32-shifted")), ("default", ddpm32("embedded-ddpm32"))), "less",
              note="both models are trained for 800 updates of 64 (bench/recipes/noise_scheduling.py), far from "
              "converged: the claim compares equal budgets; values: `bench claims --method noise-scheduling`"),
    )
