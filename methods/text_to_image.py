"""The shared sampling loop of the text-to-image guidance adapters (latent diffusion, Stable Diffusion's layout).

It is ``StableDiffusionPipeline.__call__`` reduced to what a benchmark needs, so
that each guidance paper is one small hook (``combine``) and every network call
goes through the counting denoiser: prompts encoded by the pipeline's own
``encode_prompt`` (the empty prompt as the unconditional branch), per-sample
initial latents drawn on the CPU in float32 from each sample's seed, both CFG
branches in one batched forward pass, the scheduler's step, the VAE decode. With
the same scheduler and latents it gives the pipeline's images
(tests/test_guidance.py). A guidance scale of 1 skips the unconditional branch,
as the pipeline does.

Guidance scale convention: diffusers' ``guidance_scale`` s (1 = no guidance),
``eps = eps_u + s (eps_c - eps_u)``; Ho and Salimans write the same with
``w = s - 1``: ``eps = (1 + w) eps_c - w eps_u``.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from bench.errors import BenchError
from bench.interfaces import DiffusionModel, TextToImageMethod

SCHEDULERS = {  # --scheduler: the diffusers class configured from the model's training schedule
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",  # SD-1.5's own (PLMS)
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}


@dataclass(frozen=True)
class TextToImageArgs:
    scheduler: str = field(default="ddim", metadata={"help": f"sampler: {', '.join(SCHEDULERS)} (configured from the "
                                                             "model's training schedule)"})

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")


@dataclass(frozen=True)
class GuidanceArgs(TextToImageArgs):
    guidance: float = field(default=7.5, metadata={"help": "guidance scale s (diffusers' guidance_scale; 1 = none; "
                                                           "Ho and Salimans' w = s - 1)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)) or self.guidance < 0:
            raise ValueError(f"--guidance must be a number >= 0, got {self.guidance!r}")


class LatentTextToImage(TextToImageMethod):
    """Base of the text-to-image adapters: a configured diffusers scheduler, CFG batching, a ``combine`` hook."""

    Args: ClassVar[type] = GuidanceArgs

    # -- hooks of the papers ---------------------------------------------------------------------------------------
    def guidance_scale(self) -> float:
        return float(getattr(self.args, "guidance", 1.0))

    def combine(self, eps_uncond: torch.Tensor, eps_cond: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance (Ho and Salimans 2022, eq. 6 with s = 1 + w)."""
        return eps_uncond + self.guidance_scale() * (eps_cond - eps_uncond)

    def unet_context(self, model: DiffusionModel) -> contextlib.AbstractContextManager:
        """Changes to the UNet for the duration of sampling (FreeU); none by default."""
        return contextlib.nullcontext()

    # -- the loop ------------------------------------------------------------------------------------------------------
    def make_scheduler(self, model: DiffusionModel):
        import diffusers

        cls = getattr(diffusers, SCHEDULERS[self.args.scheduler])
        config = {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}
        return cls.from_config(config)

    def resolved_config(self, model: DiffusionModel) -> dict[str, Any]:
        config = dict(self.make_scheduler(model).config)
        config["_class_name"] = SCHEDULERS[self.args.scheduler]
        return {k: v for k, v in config.items() if k not in ("_diffusers_version", "_use_default_values")}

    def check(self, model: DiffusionModel, steps: int) -> None:
        super().check(model, steps)
        train_steps = int(model.scheduler_config.get("num_train_timesteps", 1000))
        if steps > train_steps:
            raise BenchError(f"--steps {steps} exceeds the model's {train_steps} training timesteps")

    def encode(self, model: DiffusionModel, prompts: Sequence[str], guided: bool, device) -> torch.Tensor:
        """[uncond; cond] text embeddings (cond only when unguided), by the pipeline's own ``encode_prompt``."""
        cond, uncond = model.pipeline.encode_prompt(list(prompts), device, 1, guided, None)
        return torch.cat([uncond, cond]) if guided else cond

    @torch.no_grad()
    def generate(self, model, seeds, steps, denoiser, prompts=()):
        from diffusers.utils.torch_utils import randn_tensor

        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
        scheduler = self.make_scheduler(model)
        scheduler.set_timesteps(steps)
        param = next(model.unet.parameters())
        guided = self.guidance_scale() != 1.0
        context = self.encode(model, prompts, guided, param.device).to(param.dtype)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        # initial noise drawn on the CPU in float32: the same noise on every device and dtype
        x = randn_tensor((len(seeds), *model.latent_shape), generator=generators, dtype=torch.float32)
        x = (x * scheduler.init_noise_sigma).to(param.device, param.dtype)
        step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
        with self.unet_context(model):
            for t in scheduler.timesteps:
                x_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
                eps = denoiser(x_in, t, encoder_hidden_states=context)
                if guided:
                    eps_uncond, eps_cond = eps.chunk(2)
                    eps = self.combine(eps_uncond, eps_cond)
                x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
        images = model.vae.decode(x / model.vae.config.scaling_factor).sample
        return images.float().clamp(-1, 1)
