"""The shared machinery of the editing adapters: encode, invert, denoise with guidance, decode (Stable Diffusion's layout).

Every editor (SDEdit, Prompt-to-Prompt, DiffEdit) is an inversion followed by an editing pass, the two chosen
separately as PIE-Bench does (``--inversion``):

- ``none``: the source latent noised to the first editing step with fresh noise from the sample's seed (SDEdit's
  forward SDE; ``StableDiffusionImg2ImgPipeline``'s ``add_noise`` at its first timestep);
- ``ddim``: DDIM inversion (Song et al. 2021, eq. 13 run from x_0 upwards; Dhariwal and Nichol 2021, App. F) by
  diffusers' ``DDIMInverseScheduler``, conditioned on the source prompt without guidance, as null-text inversion's
  pivot is;
- ``null-text``: that DDIM trajectory, then null-text inversion (Mokady et al. 2023, Algorithm 1): at every step the
  unconditional embedding is optimized (Adam, N inner steps, early stop) so that the guided DDIM step from the
  current latent lands on the inverted trajectory's next latent; the editing pass then uses each step's embedding
  as its unconditional branch.

On an SDXL model (kind "text-to-image-xl") an editor that takes it (SDEdit, with ``--inversion none``) conditions
the editing pass on SDXL's UNet keyword arguments (``unet_conditioning``: the text-to-image loop's own
``sdxl_conditioning``, both text encoders, the pooled embedding and the micro-conditioning's defaults, recorded in
the protocol) instead of the text embeddings alone (``denoise_conditioned``).

Images are encoded to the posterior mean of the VAE times its scaling factor (as the null-text and PIE-Bench code
do); every network call goes through the counting denoiser, the optimization's included. Sample i depends on
(seed i, item i) alone: the optimization's loss is a sum of per-sample losses and Adam is element-wise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

from bench import sampling
from bench.errors import BenchError
from bench.interfaces import Batch, DiffusionModel, EditItem, EditMethod
from bench.validate import check_choice, check_option
from methods.text_to_image import SDXL_KIND, micro_conditioning, sdxl_conditioning

INVERSIONS = ("none", "ddim", "null-text")


def check_number(name: str, value: Any, low: float, high: float | None = None, integer: bool = False) -> None:
    """``bench.validate.check_option`` over [low, high] (kept for the editors' Args)."""
    check_option(name, value, low, high, integer=integer)


@dataclass(frozen=True)
class ReconstructionArgs:
    guidance: float = field(default=7.5, metadata={"help": "guidance scale of the editing pass (diffusers' guidance_scale)"})

    def __post_init__(self) -> None:
        check_number("guidance", self.guidance, 0.0)


@dataclass(frozen=True)
class NullTextArgs(ReconstructionArgs):
    null_steps: int = field(default=10, metadata={"help": "null-text inversion: Adam steps per timestep at most "
                                                          "(Mokady et al.: N = 10)"})
    null_lr: float = field(default=1e-2, metadata={"help": "null-text inversion: Adam learning rate at the first step, "
                                                           "decayed linearly to half at the last (the paper's "
                                                           "1e-2 (1 - i/100) for 50 steps)"})
    null_tolerance: float = field(default=1e-5, metadata={"help": "null-text inversion: early stop when the step's loss "
                                                                  "< tolerance + i * 2e-5 (the paper's code)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("null_steps", self.null_steps, 0, integer=True)
        check_number("null_lr", self.null_lr, 0.0)
        check_number("null_tolerance", self.null_tolerance, 0.0)


@dataclass(frozen=True)
class EditArgs(NullTextArgs):
    inversion: str = field(default="ddim", metadata={"help": f"how the source is inverted: {', '.join(INVERSIONS)}"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("inversion", self.inversion, INVERSIONS)


def check_edits(batch: Batch) -> tuple[EditItem, ...]:
    """The batch's edits, one per seed."""
    if len(batch.edits) != len(batch):
        raise ValueError(f"{len(batch.edits)} edits for {len(batch)} seeds")
    return batch.edits


def source_pixels(items: Sequence[EditItem], like: torch.Tensor, model: DiffusionModel | None = None) -> torch.Tensor:
    """The items' source images as float [N, 3, H, W] in [-1, 1] on ``like``'s device and dtype; with ``model``,
    refused in one line unless they are the size the model makes."""
    x = torch.from_numpy(np.stack([np.asarray(it.source) for it in items])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if model is not None and tuple(x.shape[-2:]) != tuple(model.sample_shape[1:]):
        raise BenchError(f"the edits' images are {x.shape[-1]}x{x.shape[-2]}, model {model.name} makes "
                         f"{model.sample_shape[2]}x{model.sample_shape[1]}")
    return x.to(like.device, like.dtype)


@dataclass
class Trajectory:
    """What an inversion hands the editing pass, over the editing steps ``timesteps`` (descending).

    ``scheduler`` is the DDIM sampler set to the run's step count (its ``step`` derives the previous timestep from
    it); ``latents[k]`` is the latent at ``timesteps[k]`` (the input of editing step k) and ``latents[-1]`` the source
    latent z_0; ``null[k]`` is step k's optimized unconditional embedding (null-text inversion), else None.
    """

    scheduler: Any
    timesteps: torch.Tensor
    latents: list[torch.Tensor]
    null: list[torch.Tensor] | None = None


class LatentEditor(EditMethod):
    """Base of the editing adapters: DDIM (the only invertible sampler here), inversion, guided steps, decoding."""

    Args: ClassVar[type] = EditArgs

    # -- configuration ---------------------------------------------------------------------------------------------
    def inversion(self) -> str:
        return self.args.inversion

    def guidance_scale(self) -> float:
        return float(self.args.guidance)

    def make_scheduler(self, model: DiffusionModel):
        return sampling.make_scheduler(model, "DDIMScheduler", sampler_defaults=False, owner=self.name)

    def make_inverse_scheduler(self, model: DiffusionModel):
        # SD's config also has PNDM's skip_prk_steps: only the entries the inverse scheduler takes
        return sampling.make_scheduler(model, "DDIMInverseScheduler", known_only=True, owner=self.name)

    def resolved_config(self, model: DiffusionModel) -> dict[str, Any]:
        return sampling.resolved_config(self.make_scheduler(model), "DDIMScheduler")

    def protocol(self, model: DiffusionModel) -> dict[str, Any]:
        if model.kind == SDXL_KIND:  # SD-1.x protocols (and their hashes) stay what they were
            return {"scheduler": self.resolved_config(model), "micro_conditioning": micro_conditioning(self.args, model)}
        return {"scheduler": self.resolved_config(model)}

    def check(self, model: DiffusionModel, steps: int) -> None:
        super().check(model, steps)
        sampling.check_steps(model, steps)
        sampling.check_epsilon(model, self.name, "its masks and inversions are written in noise estimates")

    # -- pieces ----------------------------------------------------------------------------------------------------
    @staticmethod
    def generators(seeds: Sequence[int]) -> list[torch.Generator]:
        return sampling.generators(seeds)

    @staticmethod
    def encode_images(model: DiffusionModel, items: Sequence[EditItem]) -> torch.Tensor:
        """Source images -> latents: the VAE posterior's mean times its scaling factor."""
        latents = model.vae.encode(source_pixels(items, next(model.vae.parameters()), model)).latent_dist.mean
        return latents * model.vae.config.scaling_factor

    @staticmethod
    def decode(model: DiffusionModel, latents: torch.Tensor) -> torch.Tensor:
        images = model.vae.decode(latents / model.vae.config.scaling_factor).sample
        return images.float().clamp(-1, 1)

    @staticmethod
    def encode_text(model: DiffusionModel, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional) embeddings by the pipeline's own ``encode_prompt``; the empty prompt as ∅."""
        param = next(model.unet.parameters())
        cond, uncond = model.pipeline.encode_prompt(list(prompts), param.device, 1, True, None)
        return cond.to(param.dtype), uncond.to(param.dtype)

    def unet_conditioning(self, model: DiffusionModel, prompts: Sequence[str]) -> dict[str, Any]:
        """SDXL: the UNet's keyword arguments for [uncond; cond] of ``prompts`` (cond alone at guidance 1), by the
        text-to-image loop's ``sdxl_conditioning`` with the micro-conditioning's defaults (the output size, no crop)."""
        param = next(model.unet.parameters())
        return sdxl_conditioning(model, prompts, self.guidance_scale() != 1.0, param.device, param.dtype,
                                 micro_conditioning(self.args, model))

    def guided_eps(self, denoiser, x: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """eps_u + s (eps_c - eps_u), both branches in one batched call (one branch when s = 1)."""
        return sampling.cfg_eps(denoiser, x, t, cond, uncond, self.guidance_scale())

    @staticmethod
    def editing_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
        """The last ``int(steps * strength)`` of the sampler's timesteps (``StableDiffusionImg2ImgPipeline.get_timesteps``)."""
        scheduler.set_timesteps(steps)
        init = min(int(steps * strength), steps)
        return scheduler.timesteps[max(steps - init, 0) :]

    # -- inversion -------------------------------------------------------------------------------------------------
    def invert(self, model: DiffusionModel, denoiser, z0: torch.Tensor, cond_src: torch.Tensor, uncond: torch.Tensor,
               steps: int, strength: float, generators: list[torch.Generator]) -> Trajectory:
        """The chosen inversion of ``z0`` up to the first of the editing timesteps (see the module docstring)."""
        scheduler = self.make_scheduler(model)
        timesteps = self.editing_timesteps(scheduler, steps, strength)
        if len(timesteps) == 0:
            return Trajectory(scheduler, timesteps, [z0])
        kind = self.inversion()
        if kind == "none":
            noise = sampling.cpu_noise(generators, z0.shape[1:], z0.device, z0.dtype)
            return Trajectory(scheduler, timesteps, [scheduler.add_noise(z0, noise, t.reshape(1)) for t in timesteps] + [z0])
        latents = self.ddim_inversion(model, denoiser, z0, cond_src, steps, timesteps)
        trajectory = Trajectory(scheduler, timesteps, latents)
        if kind == "null-text":
            trajectory.null = self.null_text_inversion(denoiser, trajectory, cond_src, uncond)
        return trajectory

    @torch.no_grad()
    def ddim_inversion(self, model, denoiser, z0, cond_src, steps: int, timesteps: torch.Tensor) -> list[torch.Tensor]:
        """DDIMInverseScheduler steps from z_0 up to ``timesteps[0]``; returns the latents in editing order."""
        inverse = self.make_inverse_scheduler(model)
        inverse.set_timesteps(steps)
        up = inverse.timesteps[: len(timesteps)]
        if not torch.equal(up.cpu(), timesteps.flip(0).cpu()):
            raise BenchError("DDIM inversion needs the inverse scheduler's timesteps to be the sampler's, reversed "
                             f"(timestep spacing {inverse.config.timestep_spacing!r} gives {up[:3].tolist()}...)")
        # guidance 1 (the conditional branch alone): the pivot of null-text inversion
        path = sampling.denoise(inverse, z0, lambda x, t, k: denoiser(x, t, encoder_hidden_states=cond_src),
                                timesteps=up, record=True).latents
        return path[::-1]

    def null_text_inversion(self, denoiser, trajectory: Trajectory, cond: torch.Tensor,
                            uncond: torch.Tensor) -> list[torch.Tensor]:
        """Mokady et al. 2023, Algorithm 1: per step, Adam on ∅_t against || z*_{t-1} - z_{t-1}(z̄_t, ∅_t, C) ||²."""
        a = self.args
        scheduler = trajectory.scheduler
        n_steps = len(trajectory.timesteps)
        x = trajectory.latents[0]
        null = uncond.detach()
        nulls = []
        for k, t in enumerate(trajectory.timesteps):
            target = trajectory.latents[k + 1]
            with torch.no_grad():
                eps_c = denoiser(x, t, encoder_hidden_states=cond)
            null = null.detach().clone().requires_grad_(True)
            optimizer = torch.optim.Adam([null], lr=a.null_lr * (1.0 - k / (2.0 * n_steps)))
            active = torch.ones(len(x), dtype=torch.bool, device=x.device)
            for _ in range(a.null_steps):
                with torch.enable_grad():
                    eps_u = denoiser(x, t, encoder_hidden_states=null)
                    eps = sampling.guide(eps_u, eps_c, self.guidance_scale())
                    prev = scheduler.step(eps, t, x).prev_sample
                    loss = ((prev - target) ** 2).flatten(1).mean(1)  # one MSE per sample
                    done = loss.detach() < a.null_tolerance + k * 2e-5
                    kept = null.detach().clone()
                    optimizer.zero_grad()
                    loss[active].sum().backward()
                optimizer.step()
                with torch.no_grad():  # samples that stopped earlier keep their embedding (Adam's momentum would move it)
                    null[~active] = kept[~active]
                active &= ~done
                if not bool(active.any()):
                    break
            null = null.detach()
            nulls.append(null)
            with torch.no_grad():
                eps_u = denoiser(x, t, encoder_hidden_states=null)
                x = scheduler.step(sampling.guide(eps_u, eps_c, self.guidance_scale()), t, x).prev_sample
        return nulls

    @staticmethod
    def uncond_at(trajectory: Trajectory, k: int, uncond: torch.Tensor) -> torch.Tensor:
        return trajectory.null[k] if trajectory.null is not None else uncond

    # -- the editing pass --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def denoise(self, denoiser, trajectory: Trajectory, cond: torch.Tensor, uncond: torch.Tensor,
                blend: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Guided DDIM from ``latents[0]`` over the editing timesteps; ``blend(k, x)`` after each step (DiffEdit)."""
        def predict(x: torch.Tensor, t, k: int) -> torch.Tensor:
            return self.guided_eps(denoiser, x, t, cond, self.uncond_at(trajectory, k, uncond))

        return sampling.denoise(trajectory.scheduler, trajectory.latents[0], predict, timesteps=trajectory.timesteps,
                                callback=None if blend is None else (lambda k, t, x: blend(k, x))).x


    @torch.no_grad()
    def denoise_conditioned(self, denoiser, trajectory: Trajectory, context: dict[str, Any]) -> torch.Tensor:
        """Guided DDIM from ``latents[0]`` over the editing timesteps with the UNet's keyword arguments ``context``
        for [uncond; cond] (``unet_conditioning``: SDXL), both branches in one batched call (one when s = 1)."""
        scale = self.guidance_scale()

        def predict(x: torch.Tensor, t, k: int) -> torch.Tensor:
            if scale == 1.0:
                return denoiser(x, t, **context)
            return sampling.guide(*denoiser(torch.cat([x, x]), t, **context).chunk(2), scale)

        return sampling.denoise(trajectory.scheduler, trajectory.latents[0], predict, timesteps=trajectory.timesteps).x


class Reconstruction(LatentEditor):
    """An inversion alone: invert the source, regenerate it with the source prompt under guidance (its reconstruction)."""

    Args: ClassVar[type] = ReconstructionArgs
    kind: ClassVar[str] = "ddim"

    def inversion(self) -> str:
        return self.kind

    @torch.no_grad()
    def generate(self, model: DiffusionModel, batch: Batch, denoiser) -> torch.Tensor:
        items = check_edits(batch)
        z0 = self.encode_images(model, items)
        cond, uncond = self.encode_text(model, [it.source_prompt for it in items])
        trajectory = self.invert(model, denoiser, z0, cond, uncond, batch.steps, 1.0, self.generators(batch.seeds))
        return self.decode(model, self.denoise(denoiser, trajectory, cond, uncond))
