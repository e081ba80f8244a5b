"""Consistency models: Song, Dhariwal, Chen and Sutskever, "Consistency Models", ICML 2023 (arXiv 2303.01469)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bench import sampling
from bench.claim import Claim, pixel
from bench.errors import BenchError
from bench.interfaces import Batch, DiffusionModel, Method, MethodCard
from methods.distilled import StudentMethod

KIND = "consistency"


def consistency_arm(steps: int, **options: Any):
    """The embedded consistency-distilled student (embedded-cd) on shapes16."""
    return replace(pixel("consistency", steps, **options), model="embedded-cd")


def pd_student(steps: int):
    return replace(pixel("progressive-distillation", steps), model=f"embedded-pd-{steps}")


@dataclass(frozen=True)
class ConsistencyArgs:
    timesteps: tuple[int, ...] = field(default=(), metadata={
        "help": "the multistep sampler's points as indices into the model's Karras grid, descending, one per step "
                "(ConsistencyModelPipeline's timesteps, e.g. 22,0 for openai's 2-step ImageNet-64); default: the "
                "scheduler's evenly spaced indices for --steps"})

    def __post_init__(self) -> None:
        values = self.timesteps
        if isinstance(values, (int, str)):
            values = (values,)
        try:
            values = tuple(int(v) for v in values)
        except (TypeError, ValueError):
            raise ValueError(f"--timesteps must be integers, got {self.timesteps!r}") from None
        if any(b >= a for a, b in zip(values, values[1:])) or any(v < 0 for v in values):
            raise ValueError(f"--timesteps must be descending non-negative grid indices, got {list(values)}")
        object.__setattr__(self, "timesteps", values)


class Consistency(StudentMethod, Method):
    name = "consistency"
    summary = "consistency model sampling: one step from sigma_max, or multistep (denoise, re-noise, denoise)"
    paper = "Song et al. 2023, Consistency Models"
    card = MethodCard(
        citation="Yang Song, Prafulla Dhariwal, Mark Chen, Ilya Sutskever. Consistency Models. ICML 2023 "
        "(arXiv 2303.01469).",
        url="https://arxiv.org/abs/2303.01469",
        reproduces="Algorithm 1 (multistep consistency sampling) through diffusers' CMStochasticIterativeScheduler, "
        "as ConsistencyModelPipeline runs it (tested equal); the embedded student by consistency distillation "
        "(Algorithm 2) of the pixel DDPM: Heun's solver on the Karras grid N = 18, the L2 metric, target EMA mu = "
        "0.95, 2500 updates of batch 64 (the paper: 800k of 512), initialised from the teacher "
        "(`bench embedded train consistency-distillation`). Public checkpoints in the same layout (openai/"
        "diffusers-cd_imagenet64_l2) load with --model.",
        reference="CD (LPIPS) CIFAR-10 FID 3.55 at 1 step, 2.93 at 2 (Table 1); ImageNet 64 6.20 / 4.70; one-step "
        "CD beats one-step progressive distillation (Table 1: PD 8.34 at 1 step on CIFAR-10).",
        embedded_claim="On shapes16: two steps beat one, and one-step CD beats the one-step progressive-"
        "distillation student. Decided by `bench claims --method consistency`.",
    )
    Args = ConsistencyArgs
    model_kinds = (KIND,)
    students = ("consistency-distillation", "consistency-training")
    any_model = True  # a public consistency model has no distillation.json: its scheduler says what it is
    claims = (
        Claim("one-step-beats-progressive-distillation", "one-step consistency distillation has a lower FID than "
              "one-step progressive distillation",
              "CIFAR-10 FID at 1 step (Table 1): CD (LPIPS) 3.55, progressive distillation 8.34", "fid",
              (("CD 1 step", consistency_arm(1)), ("PD 1 step", pd_student(1))), "less"),
        Claim("two-steps-beat-one", "two-step consistency sampling beats one step",
              "CIFAR-10 FID (Table 1): CD 3.55 at 1 step, 2.93 at 2; ImageNet 64: 6.20 and 4.70", "fid",
              (("CD 2 steps", consistency_arm(2)), ("CD 1 step", consistency_arm(1))), "less"),
    )

    def check(self, model: DiffusionModel, steps: int) -> None:
        if model.kind != KIND:
            raise BenchError(f"method {self.name!r} samples consistency models (a CMStochasticIterativeScheduler "
                             f"folder); {model.name!r} is {model.kind}: sample it with a solver (ddim, dpmsolver++, ...)")
        self.check_student(model, steps)
        grid = int(model.scheduler_config["num_train_timesteps"])
        if steps > grid:
            raise BenchError(f"--steps {steps} exceeds the consistency model's {grid}-point grid")
        if self.args.timesteps:
            if len(self.args.timesteps) != steps:
                raise BenchError(f"--timesteps gives {len(self.args.timesteps)} points for --steps {steps}")
            if self.args.timesteps[0] >= grid:
                raise BenchError(f"--timesteps {self.args.timesteps[0]} is not on the model's {grid}-point grid")

    def make_scheduler(self, model: DiffusionModel):
        return sampling.make_scheduler(model, "CMStochasticIterativeScheduler", sampler_defaults=False,
                                       owner=self.name)

    def protocol(self, model: DiffusionModel) -> dict[str, Any]:
        return {"scheduler": sampling.resolved_config(self.make_scheduler(model), "CMStochasticIterativeScheduler")}

    def prepare(self, model: DiffusionModel, spec: Any, workdir: Path) -> dict[str, float]:
        return self.student_budget(model)

    @torch.no_grad()
    def generate(self, model: DiffusionModel, batch: Batch, denoiser) -> torch.Tensor:
        scheduler = self.make_scheduler(model)
        if self.args.timesteps:
            scheduler.set_timesteps(timesteps=list(self.args.timesteps))
        else:
            scheduler.set_timesteps(batch.steps)
        param = next(model.unet.parameters())
        gens = sampling.generators(batch.seeds)
        x = sampling.initial_noise(gens, model.sample_shape, scheduler, param)
        kwargs = {}
        classes = getattr(model.unet.config, "num_class_embeds", None)
        if classes:  # a class-conditional model (openai's ImageNet-64): a label per sample from its own seed
            labels = [int(torch.randint(0, classes, (1,), generator=g)) for g in gens]
            kwargs["class_labels"] = torch.tensor(labels, device=param.device)
        out = sampling.denoise(scheduler, x, lambda x, t, k: denoiser(scheduler.scale_model_input(x, t), t, **kwargs),
                               step_kwargs=sampling.step_kwargs_for(scheduler, gens))
        return out.x.float().clamp(-1, 1)
