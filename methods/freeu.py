"""FreeU: Si et al., "FreeU: Free Lunch in Diffusion U-Net", CVPR 2024 (arXiv 2309.11497)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

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
        embedded_claim="None pinned: the embedded UNet has two up stages at 8x8 and 4x4 latents, far from the regime "
        "FreeU was tuned for. Measured with SD-1.5's factors at s = 4 (256 samples, 3 seeds): it hurts, FID 0.860 +- "
        "0.116 against 0.355 +- 0.065 for plain CFG, CLIP score 74.8 against 94.3, attribute accuracy 0.564 against "
        "0.940: the factors are per-architecture (the FreeU README lists values per model).",
    )
    Args = FreeUArgs

    @contextlib.contextmanager
    def unet_context(self, model):
        a = self.args
        model.unet.enable_freeu(s1=float(a.s1), s2=float(a.s2), b1=float(a.b1), b2=float(a.b2))
        try:
            yield
        finally:
            model.unet.disable_freeu()
