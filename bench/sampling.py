"""The one sampling loop: scheduler from the model's config, steps check, per-sample CPU noise, guidance, recording.

Every sampler, text-to-image guidance adapter, editor and the alignment trainers sample through these pieces:

- ``make_scheduler``: a diffusers scheduler class configured from the model's training schedule, plus the method's
  overrides (refusing overrides the class does not take: ``from_config`` would drop them silently);
  ``resolved_config``: its full config as run (recorded and hashed);
- ``check_steps``: a step count the model's training schedule has;
- ``generators`` / ``initial_noise``: one CPU generator per sample from the sample's own seed, the initial noise
  drawn on the CPU in float32 (the same noise on every device, dtype and batching);
- ``guide``: the classifier-free guidance combination (Ho and Salimans 2022, eq. 6 with s = 1 + w;
  diffusers' ``guidance_scale``), with Lin et al.'s rescale (2024, eq. 15-16) as an option; written here once;
- ``cfg_eps``: both CFG branches in one batched forward pass (one branch when the scale is 1);
- ``denoise``: the loop itself, with a per-step ``callback`` (attention control, latent blending, guidance terms),
  an optional replacement ``step`` (DDPO's log-prob step) and trajectory / log-prob recording.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from bench.errors import BenchError

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


def training_config(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The model's scheduler config as saved, less diffusers' bookkeeping entries (``_class_name``, ...)."""
    return {k: v for k, v in model_config.items() if not k.startswith("_")}


def scheduler_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def accepted(class_name: str) -> set[str]:
    """The config entries a diffusers scheduler class takes."""
    return set(inspect.signature(scheduler_class(class_name).__init__).parameters) - {"self"}


def make_scheduler(model: Any, class_name: str, overrides: Mapping[str, Any] | None = None, *,
                   sampler_defaults: bool = True, known_only: bool = False, owner: str = ""):
    """``class_name`` configured from ``model``'s training schedule and ``overrides``.

    ``sampler_defaults``: the sampling choices the model's config only inherited yield to the class's own
    (``sampler_base_config``, the sampler adapters); False: the config as saved (the text-to-image and editing
    adapters, as their pipelines load it). ``known_only``: drop the config entries the class does not take (an
    inverse scheduler configured from SD's PNDM config).
    """
    overrides = dict(overrides or {})
    names = accepted(class_name)
    unknown = sorted(set(overrides) - names)
    if unknown:  # from_config would drop them with a log line: a silently ignored option
        raise TypeError(f"method {owner!r}: {class_name} has no config entry {', '.join(unknown)}")
    if known_only:
        config = {k: v for k, v in model.scheduler_config.items() if k in names}
    elif sampler_defaults:
        config = sampler_base_config(model.scheduler_config)
    else:
        config = training_config(model.scheduler_config)
    return scheduler_class(class_name).from_config(config, **overrides)


def resolved_config(scheduler, class_name: str) -> dict[str, Any]:
    """A scheduler's full config as run (recorded and hashed)."""
    config = dict(scheduler.config)
    config["_class_name"] = class_name
    return {k: v for k, v in config.items() if k not in ("_diffusers_version", "_use_default_values")}


LEARNED_VARIANCES = ("learned", "learned_range")


def epsilon_part(scheduler, output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """A model output as ``scheduler`` reads it: a learned-variance model (Nichol and Dhariwal 2021: 2C channels, the
    prediction then the variance) keeps both halves only for a scheduler that uses learned variances (DDPMScheduler's
    "learned_range"); every other sampler gets the prediction, as diffusers' pipelines split it (DiTPipeline)."""
    if not (torch.is_tensor(output) and torch.is_tensor(sample) and output.dim() > 1 and sample.dim() > 1):
        return output  # a loop whose ``step`` predicts for itself (EDICT's coupled pair)
    channels = sample.shape[1]
    if output.shape[1] != 2 * channels:
        return output
    learned = _takes_variance_type(type(scheduler)) and scheduler.config.get("variance_type") in LEARNED_VARIANCES
    return output if learned else output[:, :channels]


@functools.lru_cache(maxsize=None)
def _takes_variance_type(cls) -> bool:
    """Whether a scheduler class takes ``variance_type`` (from_config keeps entries a class does not take in its
    config: DDIM configured from a learned-range model still lists one). Once per class, not per step."""
    return "variance_type" in inspect.signature(cls.__init__).parameters


def check_epsilon(model: Any, owner: str, why: str) -> None:
    """Refuse a model that does not predict the noise, for a method whose algorithm is written in noise estimates
    (``why`` says where, e.g. "eq. 3 guides noise estimates")."""
    kind = model.scheduler_config.get("prediction_type", "epsilon")
    if kind != "epsilon":
        raise BenchError(f"method {owner!r} needs an epsilon-prediction model ({why}); {model.name} predicts {kind}")


def check_steps(model: Any, steps: int) -> None:
    train_steps = int(model.scheduler_config.get("num_train_timesteps", 1000))
    if steps > train_steps:
        raise BenchError(f"--steps {steps} exceeds the model's {train_steps} training timesteps")


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded with the sample's own seed."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def cpu_noise(gens: list[torch.Generator], shape: Sequence[int], device=None, dtype=None) -> torch.Tensor:
    """[len(gens), *shape] standard normal noise, row i from generator i, drawn on the CPU in float32."""
    from diffusers.utils.torch_utils import randn_tensor

    x = randn_tensor((len(gens), *shape), generator=gens, dtype=torch.float32)
    return x if device is None else x.to(device, dtype)


def initial_noise(gens: list[torch.Generator], shape: Sequence[int], scheduler, param: torch.Tensor) -> torch.Tensor:
    """The initial latents: CPU float32 noise times the scheduler's ``init_noise_sigma``, on ``param``'s device/dtype."""
    return (cpu_noise(gens, shape) * scheduler.init_noise_sigma).to(param.device, param.dtype)


def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + scale (cond - uncond)`` (diffusers' guidance_scale; 1 = none).

    ``rescale`` (phi, Lin et al. 2024, eq. 15-16): the guided output rescaled to the conditional output's std, blended
    by phi, through diffusers' ``rescale_noise_cfg`` (what StableDiffusionPipeline's guidance_rescale runs).
    """
    guided = uncond + scale * (cond - uncond)
    if rescale:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

        guided = rescale_noise_cfg(guided, cond, guidance_rescale=float(rescale))
    return guided


def cfg_eps(denoiser: Callable, x: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float,
            combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Both CFG branches in one batched call ([uncond; cond]), combined by ``combine`` (default ``guide``);
    the conditional branch alone when ``scale`` is 1 (as the pipelines do)."""
    if scale == 1.0:
        return denoiser(x, t, encoder_hidden_states=cond)
    eps_u, eps_c = denoiser(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).chunk(2)
    return combine(eps_u, eps_c) if combine is not None else guide(eps_u, eps_c, scale)


def step_kwargs_for(scheduler, gens: list[torch.Generator] | None, extra: Mapping[str, Any] | None = None) -> dict:
    """The step's keyword arguments: ``extra``, and the per-sample generators where the step draws noise."""
    kwargs = dict(extra or {})
    if gens is not None and "generator" in inspect.signature(scheduler.step).parameters:
        kwargs["generator"] = gens
    return kwargs


@dataclass
class Sampled:
    """What ``denoise`` returns: the last latent, and where asked the latents x_T ... x_0 and per-step log-probs."""

    x: torch.Tensor
    latents: list[torch.Tensor] | None = None
    log_probs: list[torch.Tensor] | None = None


def denoise(scheduler, x: torch.Tensor, predict: Callable[[torch.Tensor, Any, int], torch.Tensor], *,
            timesteps: Sequence[Any] | None = None, step_kwargs: Mapping[str, Any] | None = None,
            step: Callable[[torch.Tensor, Any, torch.Tensor, int], tuple[torch.Tensor, Any]] | None = None,
            callback: Callable[[int, Any, torch.Tensor], torch.Tensor] | None = None,
            record: bool = False) -> Sampled:
    """The loop: for each timestep, ``predict(x, t, k)`` (the model output, guidance applied; of a learned-variance
    model the prediction half unless the scheduler reads the variances: ``epsilon_part``), the scheduler's step
    (or ``step(out, t, x, k) -> (prev, log_prob)``), then ``callback(k, t, x)`` (may return a changed latent).

    ``record``: keep every latent (x_T first); log-probs are kept where ``step`` returns them.
    """
    kwargs = dict(step_kwargs or {})
    latents = [x] if record else None
    log_probs: list[torch.Tensor] = []
    for k, t in enumerate(scheduler.timesteps if timesteps is None else timesteps):
        out = epsilon_part(scheduler, predict(x, t, k), x)
        if step is None:
            x = scheduler.step(out, t, x, **kwargs).prev_sample
        else:
            x, lp = step(out, t, x, k)
            if lp is not None:
                log_probs.append(lp)
        if callback is not None:
            x = callback(k, t, x)
        if latents is not None:
            latents.append(x)
    return Sampled(x, latents, log_probs or None)
