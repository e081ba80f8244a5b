"""Latent diffusion: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (CVPR 2022)."""

from __future__ import annotations

from dataclasses import replace

from bench.claim import Claim, text_to_image
from bench.interfaces import MethodCard
from methods.text_to_image import PIXEL_T2I_KIND, GuidanceArgs, LatentTextToImage

LATENT_MODEL = "embedded-t2i-budget"
PIXEL_MODEL = "embedded-pixel-t2i"
GUIDANCE = 4.0  # the embedded text-to-image claims' usual scale (methods/cfg.py)


def _arm(model: str):
    """One side of the comparison: DDIM 50 steps, CFG s = 4, 256 samples x 3 seeds on shapes32 (text_to_image's
    sizes; --quick: 128 x 2 at 10 steps)."""
    return replace(text_to_image("latent-diffusion", guidance=GUIDANCE), model=model)


class LatentDiffusion(LatentTextToImage):
    name = "latent-diffusion"
    summary = ("text-to-image sampling (classifier-free guidance) of a latent or a pixel-space model through one loop: "
               "the latent-against-pixel comparison at equal training FLOPs")
    paper = "Rombach et al. 2022, High-Resolution Image Synthesis with Latent Diffusion Models"
    card = MethodCard(
        citation="Robin Rombach, Andreas Blattmann, Dominik Lorenz, Patrick Esser, Bjoern Ommer. High-Resolution "
        "Image Synthesis with Latent Diffusion Models. CVPR 2022; arXiv 2112.10752.",
        url="https://arxiv.org/abs/2112.10752",
        reproduces="Section 4.1 (perceptual compression trade-offs, Fig. 6): at equal training compute a diffusion "
        "model in an autoencoder's latent space (downsampling factor 4 to 16) reaches a better FID than the same kind "
        "of model on pixels (f = 1) at the same output resolution. Here: embedded-t2i-budget (the embedded t2i recipe, "
        "StableDiffusionPipeline layout, f = 4: 32x32 pixels <-> 4x8x8 latents) against embedded-pixel-t2i (a "
        "UNet2DConditionModel of the same kind on 3x32x32 pixels, the same text encoder, tokenizer, caption dropout, "
        "data and optimizer; DeepFloyd IF's IFPipeline layout), trained for the same training FLOPs counted with "
        "torch.utils.flop_counter.FlopCounterMode (the latent count includes the frozen VAE encoder's forward pass; "
        "bench/recipes/ldm.py; both RECIPE.json files record per-step FLOPs, steps and wall time). Both sampled by "
        "the one text-to-image loop (methods/text_to_image.py: no VAE decode for the pixel model), same sampler, "
        "steps and guidance.",
        reference="LDM paper Fig. 6 (ImageNet class-conditional, 2M steps; verify): LDM-4 to LDM-16 reach far lower "
        "FID than pixel-based LDM-1 at equal training steps on one A100; Fig. 7: LDM-4/8 also sample faster.",
        embedded_claim="At equal training FLOPs the latent model's FID on shapes32 (DDIM 50, CFG 4, 256 samples x 3 "
        "seeds) is below the pixel model's: claim latent-beats-pixel-at-equal-flops, decided by `bench claims "
        "--method latent-diffusion` (its verdict and values: the latest MLflow claims run, `bench report`).",
    )
    Args = GuidanceArgs
    model_kinds = ("text-to-image", PIXEL_T2I_KIND)
    claims = (
        Claim("latent-beats-pixel-at-equal-flops", "at equal training compute, latent diffusion reaches a better FID "
              "than pixel diffusion at the same output resolution",
              "Rombach et al. 2022, section 4.1 and Fig. 6 (verify): LDM-{4..16} far below LDM-1 in FID at equal "
              "training steps; the pixel model's steps cost more", "fid",
              (("latent (f=4)", _arm(LATENT_MODEL)), ("pixel (f=1)", _arm(PIXEL_MODEL))), "less",
              note="equal compute = equal training FLOPs (FlopCounterMode, bench/recipes/ldm.py): the pixel model "
              "trains latent FLOPs / its per-step FLOPs steps (both RECIPE.json files); the VAE's own training is "
              "not counted, as in the paper (the first stage is shared). The values: `bench claims --method "
              "latent-diffusion`."),
    )
