"""FreeU: Si et al., "FreeU: Free Lunch in Diffusion U-Net", CVPR 2024 (arXiv 2309.11497)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from bench.claim import Claim, text_to_image
from bench.interfaces import MethodCard
from bench.validate import check_option
from methods.text_to_image import GuidanceArgs, LatentTextToImage


@dataclass(frozen=True)
class FreeUArgs(GuidanceArgs):
    b1: float = field(default=1.5, metadata={"help": "backbone factor of the first up stage (SD-1.5 value in diffusers' docs)"})
    b2: float = field(default=1.6, metadata={"help": "backbone factor of the second up stage"})
    s1: float = field(default=0.9, metadata={"help": "skip-feature low-frequency factor of the first up stage"})
    s2: float = field(default=0.2, metadata={"help": "skip-feature low-frequency factor of the second up stage"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("b1", "b2", "s1", "s2"):
            check_option(name, getattr(self, name), 0)


class FreeU(LatentTextToImage):
    name = "freeu"
    summary = "FreeU: scale the UNet decoder's backbone features (b) and damp its skip features' low frequencies (s)"
    paper = "Si et al. 2024, FreeU: Free Lunch in Diffusion U-Net"
    card = MethodCard(
        citation="Chenyang Si, Ziqi Huang, Yuming Jiang, Ziwei Liu. FreeU: Free Lunch in Diffusion U-Net. CVPR 2024.",
        url="https://arxiv.org/abs/2309.11497",
        reproduces="Section 3 (eq. 6-8): the first two decoder stages multiply half of their backbone channels by "
        "b and scale the low-frequency Fourier band of the skip features by s; through diffusers' "
        "UNet2DConditionModel.enable_freeu, the implementation the paper's repository points to. Applied on top of "
        "classifier-free guidance, as in the paper.",
        reference="SD-1.5 values b1=1.5, b2=1.6, s1=0.9, s2=0.2 (diffusers docs; the FreeU README lists values per "
        "model; verify). The paper reports preference-study gains, no FID table for SD-1.5.",
        embedded_claim="FreeU with SD-1.5's factors does not hurt FID against plain CFG at s = 4 on shapes32. The "
        "embedded "
        "UNet has two up stages at 8x8 and 4x4 latents, far from the regime the factors were tuned for. "
        "Decided by `bench claims --method freeu` (the verdict and the values: its latest MLflow claims run, "
        "`bench report`).",
    )
    Args = FreeUArgs
    claims = (
        Claim("no-worse-than-cfg", "FreeU improves sample quality for free: with SD-1.5's factors its FID is at or "
              "below plain CFG's at s = 4", "SD-1.5 values b1=1.5, b2=1.6, s1=0.9, s2=0.2 (diffusers docs; the "
              "paper reports preference studies, no FID table for SD-1.5)", "fid",
              (("freeu s=4", text_to_image("freeu", guidance=4.0, quick_seeds=(0,))),
               ("cfg s=4", text_to_image("cfg", guidance=4.0))),
              "at-most", margin=0.1, relative=True,
              note="the factors are per-architecture (the FreeU README lists values per model)"),
    )

    @contextlib.contextmanager
    def unet_context(self, model):
        a = self.args
        model.unet.enable_freeu(s1=float(a.s1), s2=float(a.s2), b1=float(a.b1), b2=float(a.b2))
        try:
            yield
        finally:
            model.unet.disable_freeu()
