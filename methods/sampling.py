"""The shared sampling loop of every scheduler-based sampler adapter.

An adapter names a diffusers scheduler and the config overrides its paper
implies; the loop is the one diffusers' pipelines run, with per-sample noise
generators so that sample i depends on its own seed alone (not on the batch it
lands in) and scheduler tensors kept on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from bench import sampling
from bench.errors import BenchError
from bench.interfaces import Batch, DiffusionModel, Method
from bench.sampling import SAMPLING_CHOICES, sampler_base_config  # noqa: F401  (re-exported)
from bench.validate import check_bool, check_choice, check_option


TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


@dataclass(frozen=True)
class SamplerArgs:
    """Root of the option mixins below; each contributes scheduler config entries and chains ``__post_init__``."""

    def __post_init__(self) -> None:
        pass

    def scheduler_options(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class TimestepSpacingArgs(SamplerArgs):
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2: the spacing."""

    timestep_spacing: str | None = field(
        default=None,
        metadata={"help": "leading, linspace or trailing (Lin et al. 2023, Table 2; trailing starts at the last "
                  "training timestep); default: the model's scheduler config where it sets one, else the "
                  "scheduler's own"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS, optional=True)

    def scheduler_options(self) -> dict[str, Any]:
        options = super().scheduler_options()
        if self.timestep_spacing is not None:
            options["timestep_spacing"] = self.timestep_spacing
        return options


@dataclass(frozen=True)
class ZeroTerminalSNRArgs(TimestepSpacingArgs):
    """Lin et al. 2023, section 3.1 (Algorithm 1): betas rescaled so that the last timestep has zero SNR."""

    rescale_betas_zero_snr: bool | None = field(
        default=None,
        metadata={"help": "rescale the betas to zero terminal SNR (Lin et al. 2023, Algorithm 1); meant for "
                  "v-prediction models trained that way (refused for epsilon prediction); default: the model's "
                  "scheduler config"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("rescale_betas_zero_snr", self.rescale_betas_zero_snr, optional=True)

    def scheduler_options(self) -> dict[str, Any]:
        options = super().scheduler_options()
        if self.rescale_betas_zero_snr is not None:
            options["rescale_betas_zero_snr"] = self.rescale_betas_zero_snr
        return options


@dataclass(frozen=True)
class KarrasSigmasArgs(SamplerArgs):
    """Karras et al. 2022, eq. 5: noise levels spaced by sigma^(1/rho), rho = 7."""

    use_karras_sigmas: bool = field(
        default=False,
        metadata={"help": "Karras et al. 2022 noise levels (eq. 5, rho=7) instead of the spaced training timesteps"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("use_karras_sigmas", self.use_karras_sigmas)

    def scheduler_options(self) -> dict[str, Any]:
        return {**super().scheduler_options(), "use_karras_sigmas": self.use_karras_sigmas}


def check_order(name: str, value: Any, low: int, high: int) -> None:
    """Raise ValueError unless ``value`` is an int in [low, high] (for ``__post_init__``)."""
    check_option(name, value, low, high, integer=True)


class SchedulerSampler(Method):
    """Base of the sampler adapters: configure a diffusers scheduler, run the standard loop."""

    scheduler_class: ClassVar[str]

    def scheduler_overrides(self) -> dict[str, Any]:
        """Scheduler config entries this adapter sets on top of the model's training config."""
        return {}

    def step_kwargs(self) -> dict[str, Any]:
        return {}

    def _accepted(self) -> set[str]:
        """The config entries the scheduler class takes."""
        return sampling.accepted(self.scheduler_class)

    def make_scheduler(self, model: DiffusionModel):
        options = self.args.scheduler_options() if isinstance(self.args, SamplerArgs) else {}
        return sampling.make_scheduler(model, self.scheduler_class, {**options, **self.scheduler_overrides()},
                                       owner=self.name)

    def resolved_config(self, model: DiffusionModel) -> dict[str, Any]:
        """The scheduler's full config as run (recorded and hashed)."""
        return sampling.resolved_config(self.make_scheduler(model), self.scheduler_class)

    def protocol(self, model: DiffusionModel) -> dict[str, Any]:
        return {"scheduler": self.resolved_config(model)}

    def check(self, model: DiffusionModel, steps: int) -> None:
        super().check(model, steps)
        sampling.check_steps(model, steps)
        if model.scheduler_config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in self._accepted():
            raise BenchError(
                f"{model.name} was trained with zero terminal SNR (rescale_betas_zero_snr), which "
                f"{self.scheduler_class} cannot represent: method {self.name!r} would sample another noise schedule"
            )
        config = self.make_scheduler(model).config
        if config.get("rescale_betas_zero_snr") and config.get("prediction_type") == "epsilon":
            # at zero SNR x_T carries no signal, so an epsilon prediction cannot give x_0 (Lin et al. 2023, 3.2)
            raise BenchError(
                f"zero terminal SNR (rescale_betas_zero_snr) needs a v-prediction model (Lin et al. 2023, "
                f"section 3.2); {model.name} predicts epsilon"
            )

    @torch.no_grad()
    def generate(self, model: DiffusionModel, batch: Batch, denoiser) -> torch.Tensor:
        scheduler = self.make_scheduler(model)
        scheduler.set_timesteps(batch.steps)
        param = next(model.unet.parameters())
        gens = sampling.generators(batch.seeds)
        x = sampling.initial_noise(gens, model.sample_shape, scheduler, param)
        out = sampling.denoise(scheduler, x, lambda x, t, k: denoiser(scheduler.scale_model_input(x, t), t),
                               step_kwargs=sampling.step_kwargs_for(scheduler, gens, self.step_kwargs()))
        return out.x.float()
