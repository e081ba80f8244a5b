"""LyCORIS: Yeh et al., "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation"
(ICLR 2024, arXiv 2309.14859): LoHa and LoKr through peft.

Both replace LoRA's ``B A`` on the same attention projections (to_q, to_k, to_v, to_out.0) with another
factorization of the update, scaled by ``alpha / r``:

- LoHa (Sec. 3, after FedPara): ``dW = (B1 A1) * (B2 A2)``, the Hadamard product of two rank-r products: 2 r (in + out)
  numbers per layer and a rank up to r^2. peft's ``LoHaConfig``; ``A1``, ``B1``, ``A2`` Kaiming-uniform, ``B2``
  zero (the model starts unchanged).
- LoKr (Sec. 3): ``dW = W1 (x) W2``, a Kronecker product of a small ``W1`` (a x c) and ``W2`` (b x d) with
  ``out = a b`` and ``in = c d`` (the factorization nearest the square root at ``decompose_factor`` -1, or with one
  side ``decompose_factor``); ``W2`` is itself low rank (``B A``, rank r) when r < max(b, d) / 2, and ``W1`` too
  with ``decompose_both``. peft's ``LoKrConfig``; ``W1`` zero, ``W2`` Kaiming-uniform.

Training, data and saving are LoRA's (methods/peft_adapters.py; peft's adapter format, which LyCORIS' own
files are not: diffusers has no loader for either). The rank and alpha defaults are discussed on the cards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from peft import LoHaConfig, LoKrConfig

from bench.claim import Claim, personalize
from bench.interfaces import MethodCard
from bench.validate import check_bool, check_option
from methods.peft_adapters import TARGET_MODULES, PeftAdapterMethod, ScaledAdapterArgs, load_peft_adapter
from methods.vera import FIDELITY_MARGIN

load = load_peft_adapter  # methods.<adapter>.load(pipeline, folder): every personalization module has one

CITATION = ("Shih-Ying Yeh, Yu-Guan Hsieh, Zhidong Gao, Bernard B W Yang, Giyeong Oh, Yanmin Gong. Navigating "
            "Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation. ICLR 2024; arXiv 2309.14859.")
URL = "https://arxiv.org/abs/2309.14859"
PAPER = "Yeh et al. 2024, Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation"
GUIDE = "the authors' LyCORIS guideline (tested on SD1; verify)"
UNTUNED = personalize("textual-inversion", train_steps=0)
LORA = personalize("lora")
LORA_DRIFT = personalize("lora", quick_options={"drift_samples": 128})  # prior drift measured at --quick too


def lycoris_claims(method: str, label: str, arm, fidelity_reference: str, parameters: Claim, drift_reference: str,
                   drift_note: str = "") -> tuple[Claim, ...]:
    """LyCORIS' framing for one algorithm beside LoRA: it learns the subject; at LoRA's parameter count or fewer its
    fidelity is not below LoRA's by more than a tenth (the margin VeRA's claim uses, fixed before measuring); its
    prior drift against LoRA's (the class prompts' FID before and after, measured at --quick too)."""
    return (
        Claim("learns-the-subject", f"{label} learns the subject: CLIP-I above the untuned model's",
              "Sec. 5 (verify): every algorithm reaches the concepts of its training set", "clip_i",
              ((method, arm), ("untuned", UNTUNED)), "greater", tolerance="margin"),
        Claim("fidelity-beside-lora", f"{label}'s subject fidelity is not below LoRA's by more than a tenth of it "
              "(CLIP-I)", fidelity_reference, "clip_i", ((method, arm), ("lora", LORA)), "at-least",
              tolerance="margin", margin=FIDELITY_MARGIN, relative=True),
        parameters,
        Claim("less-prior-drift-than-lora", f"{label} drifts the class prior less than LoRA (prior_drift: FID of "
              "the class prompts' samples before and after)", drift_reference, "prior_drift",
              ((method, arm), ("lora", LORA_DRIFT)), "less", tolerance="margin", note=drift_note),
    )


@dataclass(frozen=True)
class LoHaArgs(ScaledAdapterArgs):
    rank: int = field(default=2, metadata={"help": "r, the rank of each of the two products (dW's rank <= r^2)"})
    alpha: float = field(default=2.0, metadata={"help": "alpha (the update is scaled by alpha / r)"})


class LoHa(PeftAdapterMethod):
    name = "loha"
    summary = "LoHa (LyCORIS, peft): Hadamard product of two low-rank products on the attention projections"
    paper = PAPER
    card = MethodCard(
        citation=CITATION, url=URL,
        reproduces="LoHa (Sec. 3) through peft's LoHaConfig on LoRA's projections (to_q, to_k, to_v, to_out.0), "
        "trained and saved as LoRA is (DreamBooth data, AdamW 2e-3, peft's format). Rank 2 and alpha 2: the paper "
        "pairs LoHa with a LoRA of twice its dimension, the same number of parameters (verify); LoHa at r = 2 "
        "trains exactly the parameters of the project's rank-4 LoRA, with a rank up to 4, and alpha / r = 1 as "
        "LoRA's. peft's defaults (r = alpha = 8) are --rank 8 --alpha 8.",
        reference="The paper compares algorithms by fidelity, controllability, diversity and base-model preservation "
        "at several sizes and learning rates rather than one number (Sec. 5; verify); " + GUIDE + " rates LoHa "
        "below LoRA in fidelity and above it in flexibility (prompts unlike the training images) and diversity.",
        embedded_claim="LoHa learns the subject, its CLIP-I is not below LoRA's by more than a tenth at the same "
        "parameter count, and it drifts the class prior less than LoRA. Decided by `bench claims --method loha`.",
    )
    Args: ClassVar[type] = LoHaArgs
    claims = lycoris_claims(
        "loha", "LoHa", personalize("loha", quick_options={"drift_samples": 128}),
        "Sec. 5 (verify); " + GUIDE + ": LoHa's fidelity a step below LoRA's",
        Claim("parameters-as-lora", "LoHa at half LoRA's rank trains no more parameters than LoRA",
              "Sec. 3 (verify): 2 r (in + out) parameters per layer, LoRA's count at twice the rank", "train_params",
              (("loha", personalize("loha", quick_options={"drift_samples": 128})), ("lora", LORA)), "at-most",
              tolerance="margin"),
        GUIDE + ": LoHa more flexible than LoRA (generates what is unlike the training images)")

    def config(self) -> LoHaConfig:
        return LoHaConfig(r=self.args.rank, alpha=self.args.alpha, target_modules=list(TARGET_MODULES))


@dataclass(frozen=True)
class LoKrArgs(ScaledAdapterArgs):
    rank: int = field(default=8, metadata={"help": "r, the rank of W2 = B A (W2 is full when r >= half its larger "
                                                   "side)"})
    alpha: float = field(default=8.0, metadata={"help": "alpha (the update is scaled by alpha / r)"})
    decompose_factor: int = field(default=-1, metadata={"help": "one side of W1 (-1: the factors nearest the square "
                                                                "root of each dimension)"})
    decompose_both: bool = field(default=False, metadata={"help": "make W1 low rank too"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decompose_factor != -1:
            check_option("decompose_factor", self.decompose_factor, 1, integer=True)
        check_bool("decompose_both", self.decompose_both)


class LoKr(PeftAdapterMethod):
    name = "lokr"
    summary = "LoKr (LyCORIS, peft): Kronecker product of a small matrix and a low-rank one on the attention projections"
    paper = PAPER
    card = MethodCard(
        citation=CITATION, url=URL,
        reproduces="LoKr (Sec. 3) through peft's LoKrConfig with peft's defaults (r = alpha = 8, decompose_factor "
        "-1, W1 full) on LoRA's projections (to_q, to_k, to_v, to_out.0), trained and saved as LoRA is (DreamBooth "
        "data, AdamW 2e-3, peft's format). On the embedded UNet (widths 64 and 96) r = 8 is at least half of every "
        "W2 side, so W2 is a full matrix and dW a full-rank Kronecker product; on SD-1.5's widths W2 is rank 8.",
        reference="The paper compares algorithms by fidelity, controllability, diversity and base-model preservation "
        "at several sizes (Sec. 5; verify); " + GUIDE + " rates a small LoKr (high factor) below LoRA in fidelity, "
        "as flexible as LoRA and the smallest in size.",
        embedded_claim="LoKr learns the subject with fewer parameters than LoRA, its CLIP-I is not below LoRA's by "
        "more than a tenth, and it drifts the class prior less than LoRA. Decided by `bench claims --method lokr`.",
    )
    Args: ClassVar[type] = LoKrArgs
    claims = lycoris_claims(
        "lokr", "LoKr", personalize("lokr", quick_options={"drift_samples": 128}),
        "Sec. 5 (verify); " + GUIDE + ": a small LoKr's fidelity below LoRA's",
        Claim("fewer-parameters-than-lora", "the Kronecker factorization trains fewer parameters than LoRA",
              "Sec. 3 (verify): LoKr is the smallest of the algorithms at the same rank", "train_params",
              (("lokr", personalize("lokr", quick_options={"drift_samples": 128})), ("lora", LORA)), "less",
              tolerance="margin"),
        GUIDE + ": a small LoKr about as flexible as LoRA",
        drift_note="the direction is this project's reading, not the paper's: decided by the measurement")

    def config(self) -> LoKrConfig:
        args = self.args
        return LoKrConfig(r=args.rank, alpha=args.alpha, decompose_factor=args.decompose_factor,
                          decompose_both=args.decompose_both, target_modules=list(TARGET_MODULES))
