"""VeRA: Kopiczko, Blankevoort and Asano, "VeRA: Vector-based Random Matrix Adaptation" (ICLR 2024, arXiv 2310.11454).

Each attention projection ``W0`` (to_q, to_k, to_v, to_out.0, as LoRA's) becomes ``W0 + Lambda_b B Lambda_d A``
(eq. 1): ``A`` (r x in) and ``B`` (out x r) are frozen random matrices, Kaiming-uniform, drawn once from the seed
``projection_prng_key`` and shared by every adapted layer (sized to the largest layer; a smaller layer uses the
top-left block); only the scaling vectors ``d`` (length r, initialized to ``d_initial``) and ``b`` (length out,
zero: the model starts unchanged) are trained, per layer: ``L (out + r)`` numbers instead of LoRA's
``L r (in + out)`` (Sec. 3.1). Through peft's ``VeraConfig``; one adapter per subject, DreamBooth's data as for LoRA.

Saved in peft's format (methods/peft_adapters.py): the vectors, and not the projections, which are regenerated from
the seed on load, as the paper stores them (Sec. 3.1: only the seed; ``--save-projection true`` also writes A and
B, peft's default). The rank and learning rate differ from LoRA's (see the card).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from peft import VeraConfig

from bench.claim import Claim, personalize
from bench.interfaces import MethodCard
from bench.validate import check_bool, check_option
from methods.peft_adapters import TARGET_MODULES, AdapterArgs, PeftAdapterMethod, load_peft_adapter

load = load_peft_adapter  # methods.<adapter>.load(pipeline, folder): every personalization module has one

# VeRA's paper compares against LoRA within a small relative margin: a tenth of LoRA's CLIP-I, fixed before any
# measurement (the paper's gaps are a point or two on 0-100 scales; one 96-sample seed resolves nothing finer).
FIDELITY_MARGIN = 0.1


@dataclass(frozen=True)
class VeRAArgs(AdapterArgs):
    learning_rate: float = field(default=2e-2, metadata={"help": "AdamW learning rate of b and d (constant; VeRA's "
                                                                "is about 10x LoRA's)"})
    rank: int = field(default=64, metadata={"help": "r, the width of the shared A and B (d's length)"})
    d_initial: float = field(default=0.1, metadata={"help": "initial value of every entry of d (b starts at 0)"})
    projection_prng_key: int = field(default=0, metadata={"help": "seed of the shared random A and B"})
    save_projection: bool = field(default=False, metadata={"help": "also save A and B (false: regenerated from "
                                                                   "the seed on load, as in the paper)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        # d = 0 with b = 0 has zero gradient in both vectors: nothing would ever train
        check_option("d_initial", self.d_initial, 0, lo_open=True)
        check_option("projection_prng_key", self.projection_prng_key, 0, integer=True)
        check_bool("save_projection", self.save_projection)


class VeRA(PeftAdapterMethod):
    name = "vera"
    summary = "VeRA (peft): shared frozen random A, B and trained scaling vectors b, d on the attention projections"
    paper = "Kopiczko et al. 2024, VeRA: Vector-based Random Matrix Adaptation"
    card = MethodCard(
        citation="Dawid J. Kopiczko, Tijmen Blankevoort, Yuki M. Asano. VeRA: Vector-based Random Matrix Adaptation. "
        "ICLR 2024; arXiv 2310.11454.",
        url="https://arxiv.org/abs/2310.11454",
        reproduces="Eq. 1 and Sec. 3.1 through peft's VeraConfig on LoRA's projections (to_q, to_k, to_v, to_out.0): "
        "A and B frozen, Kaiming-uniform from projection_prng_key, shared by every layer and sized to the largest; b "
        "zero, d = d_initial 0.1 (peft's default; Table 6c: small values); trained on DreamBooth's data as LoRA. "
        "Saved in peft's format without A and B (regenerated from the seed, as the paper stores them; "
        "--save-projection true keeps them). Rank: the paper uses r = 256 and 1024 on models of width 768-5120; a "
        "rank above a layer's width adds numbers to d but no expressiveness to Lambda_b B Lambda_d A, so the default "
        "is 64, the smallest input width among the embedded UNet's adapted layers (the cross-attention context); on "
        "SD-1.5 (widths 320-1280, context 768) --rank 256 is the paper's value. Learning rate 2e-2, ten times "
        "LoRA's 2e-3: the paper trains VeRA's vectors with rates about an order of magnitude above LoRA's "
        "(appendix hyperparameter tables; verify); not tuned further here.",
        reference="GLUE with RoBERTa-large (Table 2; verify): LoRA 0.8M trainable parameters against VeRA 0.061M "
        "at about the same average score; instruction tuning of Llama 2 7B / 13B (Table 4; verify): 159.9M / 250.3M "
        "against 1.6M / 2.4M; E2E with GPT-2 medium (Table 3; verify): 0.35M against 0.098M.",
        embedded_claim="VeRA learns the subject (CLIP-I above the untuned model's) and its CLIP-I is within a tenth of "
        "LoRA's, with at least ten times fewer trained parameters (which the parameter counts rule out at LoRA's "
        "rank 4; see the claim's note). Decided by `bench claims --method vera` (the verdict and the values: its "
        "latest MLflow claims run, `bench report`).",
    )
    Args: ClassVar[type] = VeRAArgs
    claims = (
        Claim("learns-the-subject", "training only the scaling vectors b, d learns the subject: CLIP-I above the "
              "untuned model's", "Sec. 4 (verify): VeRA matches LoRA on GLUE, E2E, image classification and "
              "instruction tuning", "clip_i",
              (("vera", personalize("vera")), ("untuned", personalize("textual-inversion", train_steps=0))),
              "greater", tolerance="margin"),
        Claim("fidelity-near-lora", "subject fidelity close to LoRA's: CLIP-I not below LoRA's by more than a tenth "
              "of it (a margin fixed before measuring)", "Table 2 (verify): GLUE average of VeRA within a point of "
              "LoRA's with RoBERTa-base and -large", "clip_i",
              (("vera", personalize("vera")), ("lora", personalize("lora"))), "at-least", tolerance="margin",
              margin=FIDELITY_MARGIN, relative=True),
        Claim("ten-times-fewer-parameters", "an order of magnitude fewer trainable parameters than LoRA: at most a "
              "tenth of LoRA's count", "Table 2 (verify): 0.061M against 0.8M with RoBERTa-large; Table 4: 1.6M "
              "against 159.9M with Llama 2 7B", "train_params",
              (("vera", personalize("vera")), ("lora", personalize("lora"))), "less", tolerance="margin", margin=0.9,
              relative=True,
              note="VeRA trains out + r numbers per layer and LoRA r_L (in + out), so the ratio is below r_L (in + out) "
              "/ out whatever VeRA's rank: under 8 on every layer of the embedded UNet against the project's rank-4 "
              "LoRA (and under 10 on SD-1.5 at the paper's r = 256); the paper's order of magnitude is against LoRA "
              "ranks 8-64 on wider models"),
    )

    def config(self) -> VeraConfig:
        args = self.args
        return VeraConfig(r=args.rank, target_modules=list(TARGET_MODULES), projection_prng_key=args.projection_prng_key,
                          save_projection=args.save_projection, d_initial=args.d_initial)
