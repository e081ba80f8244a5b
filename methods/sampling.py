"""The shared sampling loop of every scheduler-based sampler adapter.

An adapter names a diffusers scheduler and the config overrides its paper
implies; the loop is the one diffusers' pipelines run, with per-sample noise
generators so that sample i depends on its own seed alone (not on the batch it
lands in) and scheduler tensors kept on the CPU.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch

from bench.errors import BenchError
from bench.interfaces import DiffusionModel, Method


TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")

# Sampling choices a model's scheduler config may carry, with DDPMScheduler's defaults for them. An explicit
# choice (trailing spacing for a zero-terminal-SNR model, Lin et al. 2023, 3.3) is the model's own; a default is
# not, and must not override the sampler's (diffusers drops defaults through ``_use_default_values``).
SAMPLING_CHOICES = {"timestep_spacing": "leading"}


def sampler_base_config(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The model's scheduler config less the sampling choices it only inherited from DDPMScheduler's defaults.

    Where the config no longer lists its defaults (bench.models drops ``_use_default_values``), a choice equal to
    DDPMScheduler's default counts as one: an explicit "leading" then yields to the sampler's own default.
    """
    config = dict(model_config)
    defaults = config.pop("_use_default_values", None)
    for key, default in SAMPLING_CHOICES.items():
        if key in config and (key in defaults if defaults is not None else config[key] == default):
            del config[key]
    return config


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
        if self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"--timestep-spacing must be leading, linspace or trailing, got {self.timestep_spacing!r}")

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
        if self.rescale_betas_zero_snr is not None and not isinstance(self.rescale_betas_zero_snr, bool):
            raise ValueError(f"--rescale-betas-zero-snr must be true or false, got {self.rescale_betas_zero_snr!r}")

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
        if not isinstance(self.use_karras_sigmas, bool):
            raise ValueError(f"--use-karras-sigmas must be true or false, got {self.use_karras_sigmas!r}")

    def scheduler_options(self) -> dict[str, Any]:
        return {**super().scheduler_options(), "use_karras_sigmas": self.use_karras_sigmas}


def check_order(name: str, value: Any, low: int, high: int) -> None:
    """Raise ValueError unless ``value`` is an int in [low, high] (for ``__post_init__``)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"--{name.replace('_', '-')} must be an integer from {low} to {high}, got {value!r}")


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
        import diffusers

        return set(inspect.signature(getattr(diffusers, self.scheduler_class).__init__).parameters) - {"self"}

    def make_scheduler(self, model: DiffusionModel):
        import diffusers

        cls = getattr(diffusers, self.scheduler_class)
        options = self.args.scheduler_options() if isinstance(self.args, SamplerArgs) else {}
        overrides = {**options, **self.scheduler_overrides()}
        unknown = sorted(set(overrides) - self._accepted())
        if unknown:  # from_config would drop them with a log line: a silently ignored option
            raise TypeError(f"method {self.name!r}: {self.scheduler_class} has no config entry {', '.join(unknown)}")
        return cls.from_config(sampler_base_config(model.scheduler_config), **overrides)

    def resolved_config(self, model: DiffusionModel) -> dict[str, Any]:
        """The scheduler's full config as run (recorded and hashed)."""
        config = dict(self.make_scheduler(model).config)
        config["_class_name"] = self.scheduler_class
        return {k: v for k, v in config.items() if k not in ("_diffusers_version", "_use_default_values")}

    def check(self, model: DiffusionModel, steps: int) -> None:
        super().check(model, steps)
        train_steps = int(model.scheduler_config.get("num_train_timesteps", 1000))
        if steps > train_steps:
            raise BenchError(f"--steps {steps} exceeds the model's {train_steps} training timesteps")
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
    def generate(self, model: DiffusionModel, seeds: Sequence[int], steps: int, denoiser) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        scheduler = self.make_scheduler(model)
        scheduler.set_timesteps(steps)
        param = next(model.unet.parameters())
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        # initial noise drawn on the CPU in float32: the same noise on every device and dtype
        x = randn_tensor((len(seeds), *model.sample_shape), generator=generators, dtype=torch.float32)
        x = (x * scheduler.init_noise_sigma).to(param.device, param.dtype)
        step_kwargs = dict(self.step_kwargs())
        if "generator" in inspect.signature(scheduler.step).parameters:
            step_kwargs["generator"] = generators
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            prediction = denoiser(model_input, t)
            x = scheduler.step(prediction, t, x, **step_kwargs).prev_sample
        return x.float()
