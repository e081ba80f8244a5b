"""Classifier-free guidance: Ho and Salimans, "Classifier-Free Diffusion Guidance" (arXiv 2207.12598), 2022."""

from __future__ import annotations

from bench.claim import Claim, text_to_image
from bench.interfaces import MethodCard
from methods.text_to_image import SDXL_KIND, LatentTextToImage, MicroConditioningArgs


class CFG(LatentTextToImage):
    name = "cfg"
    summary = "classifier-free guidance: eps_u + s (eps_c - eps_u), both branches in one batched forward pass"
    paper = "Ho and Salimans 2022, Classifier-Free Diffusion Guidance"
    card = MethodCard(
        citation="Jonathan Ho, Tim Salimans. Classifier-Free Diffusion Guidance. NeurIPS 2021 Workshop on Deep "
        "Generative Models; arXiv 2207.12598.",
        url="https://arxiv.org/abs/2207.12598",
        reproduces="Eq. 6 (the guided noise estimate) in diffusers' convention s = 1 + w; the model is trained with "
        "10% caption dropout (the paper's p_uncond = 0.1 to 0.2). Matches StableDiffusionPipeline's output with the "
        "same scheduler and latents (tests/test_guidance.py).",
        reference="ImageNet 64x64 (Table 1; verify): FID is lowest at small w (1.55 at w = 0.1) and IS rises with w: "
        "a fidelity/diversity trade-off.",
        embedded_claim="On shapes32 FID first improves then worsens with the guidance scale (s = 1, 2, 4, 8), and "
        "attribute "
        "accuracy rises from s = 1 to s = 4. Decided by `bench claims --method cfg` (the verdict and the "
        "values: its latest MLflow claims run, `bench report`).",
    )
    Args = MicroConditioningArgs  # guidance, and SDXL's micro-conditioning (recorded and hashed)
    model_kinds = ("text-to-image", SDXL_KIND)
    claims = (
        Claim("fid-u-shaped-in-scale", "FID first improves then worsens as the guidance scale grows: a "
              "fidelity/diversity trade-off", "ImageNet 64x64 (Table 1; verify): FID is lowest at small w "
              "(1.55 at w = 0.1) and IS rises with w", "fid",
              tuple((f"s={s:g}", text_to_image("cfg", guidance=s)) for s in (1.0, 2.0, 4.0, 8.0)),
              "minimum-inside"),
        Claim("guidance-raises-attribute-accuracy", "guidance makes samples follow the prompt: attribute accuracy "
              "at s = 4 is above s = 1", "Ho and Salimans 2022, Figure 1 and Table 1 (IS rises with w)",
              "attr_acc_all",
              (("s=4", text_to_image("cfg", guidance=4.0)), ("s=1", text_to_image("cfg", guidance=1.0))),
              "greater"),
    )
