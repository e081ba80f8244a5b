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

On an SDXL model (kind "text-to-image-xl", Podell et al. 2023) the loop is the same and the conditioning is
``StableDiffusionXLPipeline``'s: ``encode_prompt`` of both text encoders (their penultimate hidden states
concatenated, the second's pooled embedding) and ``_get_add_time_ids`` of the micro-conditioning (original size,
crop top-left, target size: options of the adapters that take them, ``MicroConditioningArgs``, recorded and hashed)
go to the UNet as ``added_cond_kwargs``.

A UNet that takes the guidance weight as an input (``time_cond_proj_dim`` set: a guidance-distilled or LCM student,
Meng et al. 2023, Luo et al. 2023) gets it as the pipelines give it, ``timestep_cond`` = the embedding of s - 1, in
one forward pass per step (no unconditional branch), as StableDiffusionPipeline and LatentConsistencyModelPipeline
do.

A pixel-space model (kind "text-to-image-pixel": an ``IFPipeline`` folder, DeepFloyd IF's layout; the embedded
pixel baseline of Rombach et al. 2022's comparison) goes through the same loop on pixels: its prompts encoded by
``IFPipeline.encode_prompt`` (the empty prompt as the unconditional branch, no caption cleaning), the initial noise of
the pixels' shape, no VAE decode; where its UNet also predicts IF's learned variance (twice the channels), the
samplers here take the noise, its first half, as IF's pipeline does for them.

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
from bench.errors import BenchError
from bench.interfaces import Batch, DiffusionModel, TextToImageMethod
from bench.validate import check_choice, check_option

SDXL_KIND = "text-to-image-xl"
PIXEL_T2I_KIND = "text-to-image-pixel"  # bench.models.load_pixel_text_to_image: IFPipeline folders, no VAE

SCHEDULERS = {  # --scheduler: the diffusers class configured from the model's training schedule
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",  # SD-1.5's own (PLMS)
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "lcm": "LCMScheduler",  # Luo et al. 2023's multistep consistency sampler (the LCM students)
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


@dataclass(frozen=True)
class MicroConditioningArgs(GuidanceArgs):
    """Guidance with SDXL's micro-conditioning (Podell et al. 2023, 2.2): the UNet is told the training image's
    original size and crop; 0 means the pipeline's default (the size of the images made; no crop). On an SDXL model
    the values as run are in the method's protocol (hashed); at their defaults they are left out of the recorded
    options, so the protocol hashes of runs on other models stay what they were."""

    original_height: int = field(default=0, metadata={"help": "SDXL micro-conditioning: original image height "
                                                               "(0: the output height)", "omit_default": True})
    original_width: int = field(default=0, metadata={"help": "SDXL micro-conditioning: original image width "
                                                             "(0: the output width)", "omit_default": True})
    crop_top: int = field(default=0, metadata={"help": "SDXL micro-conditioning: crop top coordinate",
                                                       "omit_default": True})
    crop_left: int = field(default=0, metadata={"help": "SDXL micro-conditioning: crop left coordinate",
                                                        "omit_default": True})
    target_height: int = field(default=0, metadata={"help": "SDXL micro-conditioning: target height (0: output)",
                                                            "omit_default": True})
    target_width: int = field(default=0, metadata={"help": "SDXL micro-conditioning: target width (0: output)",
                                                           "omit_default": True})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a non-negative integer, got {value!r}")

    def is_default(self) -> bool:
        return not any((self.original_height, self.original_width, self.crop_top, self.crop_left,
                        self.target_height, self.target_width))


def micro_conditioning(args: Any, model: DiffusionModel) -> dict[str, list[int]]:
    """SDXL's ``add_time_ids`` as run: the options, 0 replaced by the pipeline's defaults (the output size)."""
    _, h, w = model.sample_shape
    get = lambda name: int(getattr(args, name, 0) or 0)  # noqa: E731
    return {"original_size": [get("original_height") or h, get("original_width") or w],
            "crops_coords_top_left": [get("crop_top"), get("crop_left")],
            "target_size": [get("target_height") or h, get("target_width") or w]}


def sdxl_conditioning(model: DiffusionModel, prompts: Sequence[str], guided: bool, device, dtype,
                      micro: dict[str, list[int]]) -> dict[str, Any]:
    """The SDXL UNet's keyword arguments for [uncond; cond] (cond only when unguided), by the pipeline's own
    ``encode_prompt`` and ``_get_add_time_ids`` (the empty prompt's embeddings are zeros where the model's
    ``force_zeros_for_empty_prompt`` says so, as in the pipeline)."""
    pipe = model.pipeline
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
        prompt=list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided)
    time_ids = pipe._get_add_time_ids(tuple(micro["original_size"]), tuple(micro["crops_coords_top_left"]),
                                      tuple(micro["target_size"]), dtype=dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    if guided:
        cond, pooled = torch.cat([uncond, cond]), torch.cat([uncond_pooled, pooled])
    return {"encoder_hidden_states": cond.to(dtype),
            "added_cond_kwargs": {"text_embeds": pooled.to(dtype),
                                  "time_ids": time_ids.to(device).repeat(len(cond), 1)}}


class LatentTextToImage(TextToImageMethod):
    """Base of the text-to-image adapters: a configured diffusers scheduler, CFG batching, a ``combine`` hook."""

    Args: ClassVar[type] = GuidanceArgs

    # -- hooks of the papers ---------------------------------------------------------------------------------------
    def guidance_scale(self) -> float:
        return float(getattr(self.args, "guidance", 1.0))

    def combine(self, eps_uncond: torch.Tensor, eps_cond: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance (Ho and Salimans 2022, eq. 6 with s = 1 + w), by ``bench.sampling.guide``."""
        return sampling.guide(eps_uncond, eps_cond, self.guidance_scale())

    @staticmethod
    def guidance_input_dim(model: DiffusionModel) -> int | None:
        """The UNet's ``time_cond_proj_dim`` (it takes the guidance weight as an input), or None."""
        return getattr(model.unet.config, "time_cond_proj_dim", None)

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
        if model.kind == SDXL_KIND:
            return {"scheduler": self.resolved_config(model), "micro_conditioning": micro_conditioning(self.args, model)}
        return {"scheduler": self.resolved_config(model)}

    def check(self, model: DiffusionModel, steps: int) -> None:
        super().check(model, steps)
        sampling.check_steps(model, steps)
        if isinstance(self.args, MicroConditioningArgs) and not self.args.is_default() and model.kind != SDXL_KIND:
            raise BenchError(f"method {self.name!r}: the micro-conditioning options (--original-height, --crop-top, "
                             f"...) are SDXL's; {model.name!r} is {model.kind}, whose UNet takes no add_time_ids")

    def encode(self, model: DiffusionModel, prompts: Sequence[str], guided: bool, device) -> torch.Tensor:
        """[uncond; cond] text embeddings (cond only when unguided), by the pipeline's own ``encode_prompt``."""
        if model.kind == PIXEL_T2I_KIND:  # IFPipeline's signature; captions are used as given (no bs4/ftfy cleaning)
            cond, uncond = model.pipeline.encode_prompt(list(prompts), do_classifier_free_guidance=guided,
                                                        num_images_per_prompt=1, device=device, clean_caption=False)
        else:
            cond, uncond = model.pipeline.encode_prompt(list(prompts), device, 1, guided, None)
        return torch.cat([uncond, cond]) if guided else cond

    def unet_conditioning(self, model: DiffusionModel, prompts: Sequence[str], guided: bool, device,
                          dtype) -> dict[str, Any]:
        """The UNet's keyword arguments for [uncond; cond]: ``encoder_hidden_states`` (SD), plus ``added_cond_kwargs``
        (SDXL: the pooled text embedding and the micro-conditioning)."""
        if model.kind == SDXL_KIND:
            return sdxl_conditioning(model, prompts, guided, device, dtype, micro_conditioning(self.args, model))
        return {"encoder_hidden_states": self.encode(model, prompts, guided, device).to(dtype)}

    @torch.no_grad()
    def generate(self, model: DiffusionModel, batch: Batch, denoiser) -> torch.Tensor:
        if len(batch.prompts) != len(batch):
            raise ValueError(f"{len(batch.prompts)} prompts for {len(batch)} seeds")
        scheduler = self.make_scheduler(model)
        scheduler.set_timesteps(batch.steps)
        param = next(model.unet.parameters())
        w_dim = self.guidance_input_dim(model)
        guided = self.guidance_scale() != 1.0 and w_dim is None
        context = self.unet_conditioning(model, batch.prompts, guided, param.device, param.dtype)
        if w_dim is not None:  # the guidance weight as the UNet's input (the pipelines' timestep_cond, of s - 1)
            from bench.distillation import guidance_embedding

            w = torch.full((len(batch),), self.guidance_scale() - 1.0)
            context["timestep_cond"] = guidance_embedding(w, w_dim).to(param.device, param.dtype)
        gens = sampling.generators(batch.seeds)
        x = sampling.initial_noise(gens, model.latent_shape, scheduler, param)

        def predict(x: torch.Tensor, t, k: int) -> torch.Tensor:
            x_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
            eps = denoiser(x_in, t, **context)[:, : x.shape[1]]  # IF's learned variance, where predicted, is not used
            return self.combine(*eps.chunk(2)) if guided else eps

        with self.unet_context(model):
            x = sampling.denoise(scheduler, x, predict, step_kwargs=sampling.step_kwargs_for(scheduler, gens)).x
        if model.vae is None:  # a pixel-space model: the loop's x is the image
            return x.float().clamp(-1, 1)
        images = model.vae.decode(x / model.vae.config.scaling_factor).sample
        return images.float().clamp(-1, 1)
