"""Progressive distillation: Salimans and Ho, "Progressive Distillation for Fast Sampling of Diffusion Models",
ICLR 2022 (arXiv 2202.00512)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.claim import Claim, pixel
from bench.interfaces import DiffusionModel, MethodCard, NoArgs
from methods.distilled import StudentMethod
from methods.sampling import SchedulerSampler


def student(steps: int, **options: Any):
    """The embedded chain's student for ``steps`` (embedded-pd-N) at its own step count, on shapes16."""
    return replace(pixel("progressive-distillation", steps, **options), model=f"embedded-pd-{steps}")


class ProgressiveDistillation(StudentMethod, SchedulerSampler):
    name = "progressive-distillation"
    summary = "a progressively distilled student: deterministic DDIM at the step count it was distilled for"
    paper = "Salimans and Ho 2022, Progressive Distillation for Fast Sampling of Diffusion Models"
    card = MethodCard(
        citation="Tim Salimans, Jonathan Ho. Progressive Distillation for Fast Sampling of Diffusion Models. ICLR "
        "2022 (arXiv 2202.00512).",
        url="https://arxiv.org/abs/2202.00512",
        reproduces="Algorithm 2: students that each take one DDIM step where their teacher takes two (the target "
        "x~ of eq. 8), initialised from the teacher, v-parameterised (appendix D), halving the steps per round. "
        "The embedded chain (`bench embedded train progressive-distillation`) starts from the pixel DDPM's DDIM at "
        "64 steps (the paper: 1024 or 8192) with 500 updates of batch 64 per round (the paper: 50k of 128), and clips "
        "x~ to the data's [-1, 1] (the linear beta schedule's first step makes x~ ill-conditioned; the paper's "
        "cosine schedule does not). The students sample through DDIMScheduler on the trailing grid they were "
        "distilled on (bench/distillation.py, tested equal).",
        reference="CIFAR-10 FID about 3.0 at 4 steps and 2.6 at 8 (Fig. 4), where DDIM at 4 steps is far worse.",
        embedded_claim="The 4-step student beats the teacher's DDIM at 4 steps and comes within 25% of the teacher's "
        "DDIM at 64 steps on shapes16 FID. Decided by `bench claims --method progressive-distillation`.",
    )
    Args = NoArgs
    students = ("progressive-distillation",)
    scheduler_class = "DDIMScheduler"
    claims = (
        Claim("four-steps-beat-ddim", "the 4-step student is far better than DDIM at 4 steps on the teacher",
              "CIFAR-10 (Fig. 4): 4-step distilled FID about 3.0; DDIM at 4 steps is far worse", "fid",
              (("PD 4 steps", student(4)), ("DDIM 4 steps", pixel("ddim", 4))), "less"),
        Claim("four-steps-near-teacher", "the 4-step student is close to its teacher: its FID at most 25% above the "
              "teacher's DDIM at the chain's starting 64 steps",
              "CIFAR-10 (Fig. 4): 3.0 at 4 steps against the undistilled model's 2.6 to 3.0 at many steps", "fid",
              (("PD 4 steps", student(4)), ("DDIM 64 steps", pixel("ddim", 64))), "at-most", margin=0.25,
              relative=True,
              note="the paper's chain starts at 1024 or 8192 steps with 50k updates per round; the embedded chain at "
              "64 steps with 500 (bench/recipes/distill.py)"),
    )

    def check(self, model: DiffusionModel, steps: int) -> None:
        super().check(model, steps)
        self.check_student(model, steps)

    def prepare(self, model: DiffusionModel, spec: Any, workdir: Path) -> dict[str, float]:
        return self.student_budget(model)
