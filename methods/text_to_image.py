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
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from bench import sampling
from bench.interfaces import Batch, DiffusionModel, TextToImageMethod
from bench.validate import check_choice, check_option

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
        check_choice("scheduler", self.scheduler, SCHEDULERS)


@dataclass(frozen=True)
class GuidanceArgs(TextToImageArgs):
    guidance: float = field(default=7.5, metadata={"help": "guidance scale s (diffusers' guidance_scale; 1 = none; "
                                                           "Ho and Salimans' w = s - 1)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option("guidance", self.guidance, 0)


class LatentTextToImage(TextToImageMethod):
    """Base of the text-to-image adapters: a configured diffusers scheduler, CFG batching, a ``combine`` hook."""

    Args: ClassVar[type] = GuidanceArgs

    # -- hooks of the papers ---------------------------------------------------------------------------------------
    def guidance_scale(self) -> float:
        return float(getattr(self.args, "guidance", 1.0))

    def combine(self, eps_uncond: torch.Tensor, eps_cond: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance (Ho and Salimans 2022, eq. 6 with s = 1 + w), by ``bench.sampling.guide``."""
        return sampling.guide(eps_uncond, eps_cond, self.guidance_scale())

    def unet_context(self, model: DiffusionModel) -> contextlib.AbstractContextManager:
        """Changes to the UNet for the duration of sampling (FreeU); none by default."""
        return contextlib.nullcontext()

    # -- the loop ------------------------------------------------------------------------------------------------------
    def make_scheduler(self, model: DiffusionModel):
        # the model's config as saved (as its pipeline loads it), not the samplers' sampler_base_config
        return sampling.make_scheduler(model, SCHEDULERS[self.args.scheduler], sampler_defaults=False, owner=self.name)

    def resolved_config(self, model: DiffusionModel) -> dict[str, Any]:
        return sampling.resolved_config(self.make_scheduler(model), SCHEDULERS[self.args.scheduler])

    def protocol(self, model: DiffusionModel) -> dict[str, Any]:
        return {"scheduler": self.resolved_config(model)}

    def check(self, model: DiffusionModel, steps: int) -> None:
        super().check(model, steps)
        sampling.check_steps(model, steps)

    def encode(self, model: DiffusionModel, prompts: Sequence[str], guided: bool, device) -> torch.Tensor:
        """[uncond; cond] text embeddings (cond only when unguided), by the pipeline's own ``encode_prompt``."""
        cond, uncond = model.pipeline.encode_prompt(list(prompts), device, 1, guided, None)
        return torch.cat([uncond, cond]) if guided else cond

    @torch.no_grad()
    def generate(self, model: DiffusionModel, batch: Batch, denoiser) -> torch.Tensor:
        if len(batch.prompts) != len(batch):
            raise ValueError(f"{len(batch.prompts)} prompts for {len(batch)} seeds")
        scheduler = self.make_scheduler(model)
        scheduler.set_timesteps(batch.steps)
        param = next(model.unet.parameters())
        guided = self.guidance_scale() != 1.0
        context = self.encode(model, batch.prompts, guided, param.device).to(param.dtype)
        gens = sampling.generators(batch.seeds)
        x = sampling.initial_noise(gens, model.latent_shape, scheduler, param)

        def predict(x: torch.Tensor, t, k: int) -> torch.Tensor:
            x_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
            eps = denoiser(x_in, t, encoder_hidden_states=context)
            return self.combine(*eps.chunk(2)) if guided else eps

        with self.unet_context(model):
            x = sampling.denoise(scheduler, x, predict, step_kwargs=sampling.step_kwargs_for(scheduler, gens)).x
        images = model.vae.decode(x / model.vae.config.scaling_factor).sample
        return images.float().clamp(-1, 1)
