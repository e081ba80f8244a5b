"""The shared sampling loop of the flow-matching samplers (SD3's ``StableDiffusion3Pipeline``, FLUX's ``FluxPipeline``).

It is the pipelines' ``__call__`` reduced to what a benchmark needs, with every transformer call through the counting
denoiser, so that a sampler adapter (``flow-euler``, ``flow-heun``, ``flow-dpmsolver++``) names only its diffusers
scheduler and how it is configured:

- prompts encoded by the pipeline's own ``encode_prompt`` (SD3: ``prompt_embeds`` and the pooled embedding, the empty
  prompt as the unconditional branch; FLUX: ``prompt_embeds``, pooled, ``text_ids``);
- per-sample initial latents drawn on the CPU in float32 from each sample's seed (FLUX's packed into 2x2 patches by
  the pipeline's ``_pack_latents``, with ``_prepare_latent_image_ids``; unpacked by ``_unpack_latents``);
- the sigma schedule as the pipelines set it (SD3: ``set_timesteps(steps)``; FLUX: sigmas ``linspace(1, 1/steps,
  steps)``), shifted by the scheduler config's ``shift``, or, where the model's config says
  ``use_dynamic_shifting``, by ``exp(mu)`` with ``mu`` from the pipeline's ``calculate_shift`` of the image's
  sequence length (the schedulers without a ``mu`` get that shift as their static one: the same sigmas);
- guidance: SD3's classifier-free guidance (Ho and Salimans 2022; diffusers' ``guidance_scale``, both branches in
  one batched call [uncond; cond], none at a scale of 1 or below, as the pipeline does); FLUX.1-dev's embedded
  guidance (the transformer's ``guidance`` input, ``guidance_embeds`` models); FLUX.1-schnell takes none;
- the VAE decode with its ``scaling_factor`` and ``shift_factor``.

With the same scheduler, latents, prompts and guidance it gives the pipelines' images (tests/test_flow_samplers.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from bench import sampling
from bench.errors import BenchError
from bench.interfaces import Batch, DiffusionModel, TextToImageMethod
from bench.validate import check_option

FLOW_KIND = "flow-matching"
# the pipelines' own default guidance scales (StableDiffusion3Pipeline.__call__: 7.0; FluxPipeline.__call__: 3.5)
DEFAULT_GUIDANCE = {"sd3": 7.0, "flux": 3.5}
# the folder's FlowMatchEulerDiscreteScheduler entries that set the shift: translated, never silently dropped
SHIFT_ENTRIES = ("shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len",
                 "time_shift_type")


@dataclass(frozen=True)
class FlowArgs:
    guidance: float | None = field(default=None, metadata={
        "help": "SD3: classifier-free guidance scale (diffusers' guidance_scale; 1 = none); FLUX.1-dev: the embedded "
                "guidance value; FLUX.1-schnell: none (refused); default: the pipeline's (SD3 7.0, FLUX 3.5)"})
    shift: float | None = field(default=None, metadata={
        "help": "static shift of the sigma schedule, sigma' = s sigma / (1 + (s - 1) sigma) (Esser et al. 2024, "
                "eq. 23); default: the model's scheduler config (its shift, or dynamic shifting by image size)"})

    def __post_init__(self) -> None:
        check_option("guidance", self.guidance, 0, optional=True)
        check_option("shift", self.shift, 0, lo_open=True, optional=True)


class FlowMatchingSampler(TextToImageMethod):
    """Base of the flow-matching sampler adapters: a configured diffusers scheduler over the pipeline's pieces."""

    model_kinds: ClassVar[tuple[str, ...]] = (FLOW_KIND,)
    Args: ClassVar[type] = FlowArgs
    scheduler_class: ClassVar[str]
    takes_mu: ClassVar[bool] = False  # set_timesteps(mu=...): any time-shift type; else exp(mu) as a static shift

    # -- what an adapter says --------------------------------------------------------------------------------------
    def scheduler_overrides(self, model: DiffusionModel) -> dict[str, Any]:
        """Config entries on top of the folder's scheduler config (known to ``scheduler_class``); the shift is
        ``shift_overrides``'."""
        return {}

    def shift_overrides(self, model: DiffusionModel) -> dict[str, Any]:
        """How the shift reaches ``scheduler_class``: by default (schedulers without ``mu``) a static ``shift``,
        ``exp(mu)`` where the model shifts dynamically."""
        return {"shift": self.static_shift(model)}

    def set_timesteps(self, scheduler, model: DiffusionModel, steps: int) -> None:
        scheduler.set_timesteps(steps)

    # -- the schedule ----------------------------------------------------------------------------------------------
    def dynamic(self, model: DiffusionModel) -> bool:
        """Whether the shift comes from the image size (the model's config says so and no ``--shift`` is given)."""
        return bool(model.scheduler_config.get("use_dynamic_shifting")) and self.args.shift is None

    def image_seq_len(self, model: DiffusionModel) -> int:
        """The transformer's image tokens, as the pipeline counts them for ``calculate_shift``."""
        _, h, w = model.latent_shape
        if model.family == "flux":  # 2x2 latent patches packed into tokens
            return (h // 2) * (w // 2)
        patch = model.unet.config.patch_size
        return (h // patch) * (w // patch)

    def mu(self, model: DiffusionModel) -> float | None:
        """The dynamic shift's exponent, by the pipeline's own ``calculate_shift`` (None: a static shift)."""
        if not self.dynamic(model):
            return None
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = model.scheduler_config
        return float(calculate_shift(self.image_seq_len(model), c["base_image_seq_len"], c["max_image_seq_len"],
                                     c["base_shift"], c["max_shift"]))

    def static_shift(self, model: DiffusionModel) -> float:
        """The shift as one static value: ``--shift``, else ``exp(mu)`` (dynamic), else the config's ``shift``."""
        if self.args.shift is not None:
            return float(self.args.shift)
        mu = self.mu(model)
        return math.exp(mu) if mu is not None else float(model.scheduler_config.get("shift", 1.0))

    def guidance(self, model: DiffusionModel) -> float | None:
        """The guidance as run: SD3's CFG scale, FLUX.1-dev's embedded value; None where the model takes none."""
        if model.family == "flux" and not model.unet.config.guidance_embeds:
            return None
        return float(self.args.guidance) if self.args.guidance is not None else DEFAULT_GUIDANCE[model.family]

    def make_scheduler(self, model: DiffusionModel):
        overrides = {**self.shift_overrides(model), **self.scheduler_overrides(model)}
        return sampling.make_scheduler(model, self.scheduler_class, overrides, known_only=True, owner=self.name)

    def resolved_config(self, model: DiffusionModel) -> dict[str, Any]:
        return sampling.resolved_config(self.make_scheduler(model), self.scheduler_class)

    def protocol(self, model: DiffusionModel) -> dict[str, Any]:
        schedule = ("flux: sigmas linspace(1, 1/steps, steps)" if model.family == "flux"
                    else "sd3: the scheduler's set_timesteps(steps)")
        return {"scheduler": self.resolved_config(model), "guidance": self.guidance(model),
                "guidance_kind": ("cfg" if model.family == "sd3" else
                                  "embedded" if self.guidance(model) is not None else "none"),
                "schedule": schedule, "mu": self.mu(model)}

    # -- checks ----------------------------------------------------------------------------------------------------
    def check(self, model: DiffusionModel, steps: int) -> None:
        if model.kind != FLOW_KIND:
            raise BenchError(f"method {self.name!r} samples flow-matching models (SD3, FLUX); {model.name!r} is "
                             f"{model.kind}")
        sampling.check_steps(model, steps)
        if model.family not in DEFAULT_GUIDANCE:
            raise BenchError(f"method {self.name!r}: {model.name!r} is a flow-matching model of family "
                             f"{model.family!r}; it samples sd3 and flux")
        if self.args.guidance is not None and self.guidance(model) is None:
            raise BenchError(f"method {self.name!r}: {model.name!r} takes no guidance (a FLUX transformer without "
                             f"guidance_embeds, such as FLUX.1-schnell); leave --guidance out")
        if (self.dynamic(model) and not self.takes_mu
                and model.scheduler_config.get("time_shift_type", "exponential") != "exponential"):
            raise BenchError(f"method {self.name!r}: {model.name!r} shifts its sigmas dynamically with the "
                             f"{model.scheduler_config['time_shift_type']} time shift, which {self.scheduler_class} "
                             f"cannot represent; pass --shift for a static shift, or use flow-euler")
        # entries of the folder's config that change its sigmas and that this scheduler cannot take: refuse, not drop
        import diffusers

        euler_defaults = diffusers.FlowMatchEulerDiscreteScheduler().config
        takes = sampling.accepted(self.scheduler_class)
        lost = sorted(k for k, v in model.scheduler_config.items()
                      if not k.startswith("_") and k not in SHIFT_ENTRIES and k not in takes
                      and k in euler_defaults and v != euler_defaults[k])
        if lost:
            raise BenchError(f"method {self.name!r}: {model.name!r}'s scheduler config sets "
                             f"{', '.join(f'{k}={model.scheduler_config[k]!r}' for k in lost)}, which "
                             f"{self.scheduler_class} cannot represent (it would sample another schedule)")

    # -- the loop --------------------------------------------------------------------------------------------------
    def conditioning_kwargs(self, model: DiffusionModel, prompts: Sequence[str], guided: bool, device,
                            dtype) -> dict[str, Any]:
        """The transformer's text inputs, by the pipeline's own ``encode_prompt`` ([uncond; cond] where guided)."""
        pipe = model.pipeline
        if model.family == "flux":
            embeds, pooled, text_ids = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=device,
                                                          num_images_per_prompt=1)
            return {"encoder_hidden_states": embeds.to(dtype), "pooled_projections": pooled.to(dtype),
                    "txt_ids": text_ids}
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None,
                                                             device=device, num_images_per_prompt=1,
                                                             do_classifier_free_guidance=guided,
                                                             max_sequence_length=model.max_sequence_length)
        if guided:
            embeds, pooled = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
        return {"encoder_hidden_states": embeds.to(dtype), "pooled_projections": pooled.to(dtype)}

    @torch.no_grad()
    def generate(self, model: DiffusionModel, batch: Batch, denoiser) -> torch.Tensor:
        return self.sample(model, batch, denoiser)

    def sample(self, model: DiffusionModel, batch: Batch, denoiser, trace: dict | None = None) -> torch.Tensor:
        """The loop; ``trace``: a dict that receives ``velocities`` (each step's guided velocity [n, ...], in step
        order) and ``sigmas`` (the schedule the steps ran over, the final 0 included)."""
        velocities = trace.setdefault("velocities", []) if trace is not None else None
        if len(batch.prompts) != len(batch):
            raise ValueError(f"{len(batch.prompts)} prompts for {len(batch)} seeds")
        pipe = model.pipeline
        param = next(model.unet.parameters())
        device, dtype, n = param.device, param.dtype, len(batch)
        scheduler = self.make_scheduler(model)
        self.set_timesteps(scheduler, model, batch.steps)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)  # as FluxPipeline does (the index is not looked up from the timestep)
        guidance = self.guidance(model)
        flux = model.family == "flux"
        cfg = not flux and guidance > 1  # StableDiffusion3Pipeline.do_classifier_free_guidance
        context = self.conditioning_kwargs(model, batch.prompts, cfg, device, dtype)
        c, h, w = model.latent_shape
        x = sampling.cpu_noise(sampling.generators(batch.seeds), model.latent_shape).to(device, dtype)
        if flux:
            x = pipe._pack_latents(x, n, c, h, w)
            context["img_ids"] = pipe._prepare_latent_image_ids(n, h // 2, w // 2, device, dtype)
            if guidance is not None:
                context["guidance"] = torch.full([n], guidance, device=device, dtype=torch.float32)

        def predict(x: torch.Tensor, t, k: int) -> torch.Tensor:
            if flux:  # FLUX's transformer takes the sigma, t / 1000
                v = denoiser(x, t.expand(n).to(x.dtype) / 1000, **context)
                if velocities is not None:
                    velocities.append(v.float())
                return v
            x_in = torch.cat([x, x]) if cfg else x
            v = denoiser(x_in, t.expand(x_in.shape[0]), **context)
            if cfg:
                v_uncond, v_cond = v.chunk(2)
                v = sampling.guide(v_uncond, v_cond, guidance)
            if velocities is not None:
                velocities.append(v.float())
            return v

        x = sampling.denoise(scheduler, x, predict).x
        if trace is not None:
            trace["sigmas"] = scheduler.sigmas.detach().float().cpu().clone()
        if flux:
            x = pipe._unpack_latents(x, model.sample_shape[1], model.sample_shape[2], pipe.vae_scale_factor)
        vae = model.vae
        latents = x / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images = vae.decode(latents.to(vae.dtype)).sample
        return images.float().clamp(-1, 1)


def flux_sigmas(steps: int) -> np.ndarray:
    """FluxPipeline's sigmas before the shift: ``np.linspace(1.0, 1 / steps, steps)`` (its __call__, step 5)."""
    return np.linspace(1.0, 1 / steps, steps)
