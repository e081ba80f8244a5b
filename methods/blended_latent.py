"""Blended Latent Diffusion: Avrahami, Fried and Lischinski, SIGGRAPH 2023 (ACM TOG 42(4)); after Blended Diffusion
(Avrahami, Lischinski and Fried, CVPR 2022).

Algorithm 1 of the paper, on the latents of a text-to-image model:

    m_latent = downsample(m)                     the edit mask at the latents' size
    z_init = E(x);  z_k ~ noise(z_init, k)       the source latent noised to the first editing step
    for t = k .. 1:
        z_fg ~ denoise(z_t, d, t)                one guided DDIM step with the target prompt d
        z_bg ~ noise(z_init, t - 1)              the source noised to the level the step reached
        z_{t-1} = z_fg * m_latent + z_bg * (1 - m_latent)
    output D(z_0)

Facts taken from the official code (omriav/blended-latent-diffusion, scripts/text_editing_SD2.py): the mask is
resized to the latent size with PIL's nearest filter and binarized at 0.5; the editing starts after skipping
``blending_start_percentage`` = 0.25 of the DDIM steps (``--strength`` 0.75 here, the fraction re-generated); each
step's background is noised with fresh noise; guidance 7.5; no pixel-space blend of the decoded output (the LDM
script's ``percentage_of_pixel_blending`` defaults to 0). Two choices differ from that script and are named:

- the script starts from pure Gaussian noise at the first editing step; here the source is noised to it, Algorithm
  1's ``z_k ~ noise(z_init, k)`` (and SDEdit's start, so an all-ones mask is SDEdit exactly);
- ``--blend-level output`` (default): the background is the source noised to the step's output timestep, and z_init
  itself after the last step (Algorithm 1; an all-zeros mask returns the autoencoder's round trip D(E(x))
  exactly); ``input``: noised to the step's input timestep, as the script's ``add_noise(source, noise, t)`` after
  ``step(..., t, ...)`` does (one step noisier, never the clean source).

Not done: the paper's optional background reconstruction (per-image fine-tuning of the decoder, Section 4.2,
``scripts/reconstruct.py``) and its progressive mask shrinking for thin masks (Section 4.3): the background is kept
only up to the autoencoder's error. Noise: sample i's from its own generator (the start noise first, then one draw
per step), so sample i depends on (seed i, item i) alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from bench import sampling
from bench.claim import Claim, edit
from bench.errors import BenchError
from bench.interfaces import Batch, EditItem, MethodCard
from bench.validate import check_choice
from methods.editing import LatentEditor, check_edits, check_number

BLEND_LEVELS = ("output", "input")


@dataclass(frozen=True)
class BlendedArgs:
    guidance: float = field(default=7.5, metadata={"help": "guidance scale (the official script: 7.5)"})
    strength: float = field(default=0.75, metadata={"help": "fraction of the DDIM steps re-generated (1 - the official "
                                                            "script's blending_start_percentage 0.25)"})
    blend_level: str = field(default="output", metadata={"help": "the background's noise level after a step: output "
                                                                 "(Algorithm 1: the step's output timestep, the clean "
                                                                 "source at the end) or input (the official script: "
                                                                 "the step's input timestep)"})

    def __post_init__(self) -> None:
        check_number("guidance", self.guidance, 0.0)
        check_number("strength", self.strength, 0.0, 1.0)
        check_choice("blend_level", self.blend_level, BLEND_LEVELS)


def check_masks(items: Sequence[EditItem], where: str) -> None:
    """Refuse edits without a mask, or with a mask that is not the source image's size (one line)."""
    for it in items:
        if it.mask is None:
            raise BenchError(f"method 'blended-latent' needs the edit mask of every edit; {where} edit {it.key!r} "
                             f"has none")
        mask, source = np.asarray(it.mask), np.asarray(it.source)
        if mask.shape != source.shape[:2]:
            raise BenchError(f"method 'blended-latent': {where} edit {it.key!r} has a {'x'.join(map(str, mask.shape))} "
                             f"mask for a {'x'.join(map(str, source.shape[:2]))} source image")


def latent_masks(items: Sequence[EditItem], size: tuple[int, int]) -> torch.Tensor:
    """[N, 1, h, w] in {0, 1}: each mask resized to the latents' size by PIL's nearest filter, binarized at 0.5 (the
    official script's ``_read_mask``)."""
    h, w = size
    out = []
    for it in items:
        gray = Image.fromarray((np.clip(np.asarray(it.mask, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8))
        small = np.asarray(gray.resize((w, h), Image.NEAREST), dtype=np.float32) / 255.0
        out.append((small >= 0.5).astype(np.float32))
    return torch.from_numpy(np.stack(out))[:, None]


class BlendedLatent(LatentEditor):
    name = "blended-latent"
    summary = "Blended Latent Diffusion: the target prompt inside the edit mask, the noised source latent outside it, every step"
    paper = "Avrahami et al. 2023, Blended Latent Diffusion"
    card = MethodCard(
        citation="Omri Avrahami, Ohad Fried, Dani Lischinski. Blended Latent Diffusion. ACM Transactions on Graphics "
        "(SIGGRAPH 2023). After Blended Diffusion for Text-driven Editing of Natural Images (Avrahami, Lischinski, "
        "Fried, CVPR 2022).",
        url="https://arxiv.org/abs/2206.02779",
        reproduces="Algorithm 1 with the official SD script's settings (omriav/blended-latent-diffusion, "
        "text_editing_SD2.py): the data set's edit mask resized to the latents by nearest neighbour and binarized "
        "at 0.5; the source latent noised to the first of the last 0.75 of the DDIM steps; after every guided "
        "step with the target prompt (guidance 7.5) the latent outside the mask is replaced by the source noised "
        "to the step's output level with fresh noise (the clean source after the last step; --blend-level input: "
        "the script's one-step-noisier level). Not done: the paper's per-image decoder fine-tuning for the "
        "background (Section 4.2) and progressive mask shrinking (Section 4.3); the script's start from pure noise "
        "is replaced by Algorithm 1's noised source.",
        reference="Paper (verify): local edits with the background kept up to the autoencoder's error, at a "
        "fraction of Blended Diffusion's time (Table 1 and Section 5; SD / LDM, 50 DDIM steps).",
        embedded_claim="Outside the mask blended-latent keeps the source up to the autoencoder's round trip "
        "(background PSNR within 1 dB of sdedit at strength 0, which is D(E(x))), and above SDEdit's at the same "
        "strength. Decided by `bench claims --method blended-latent` (the verdicts and values: its latest MLflow "
        "claims run, `bench report`).",
    )
    Args = BlendedArgs
    claims = (
        Claim("background-kept-up-to-the-autoencoder", "blending the noised source latent outside the mask at every "
              "step keeps the background up to the autoencoder's reconstruction error", "Avrahami et al. 2023, "
              "Section 4.2 (verify): the remaining background error is the VAE's", "bg_psnr",
              (("blended-latent", edit("blended-latent")), ("VAE round trip (sdedit 0)", edit("sdedit", strength=0.0))),
              "at-least", tolerance="margin", margin=1.0,
              note="may not hold on the embedded world: the mask is binarized at the 8x8 latent size (a cell is 4x4 "
                   "pixels of the 32x32 image, and a cell the mask covers is re-generated whole), and the embedded "
                   "VAE's decoder (GroupNorm over the whole latent, self-attention in its mid block) carries a change "
                   "inside the mask to every decoded pixel; the paper's fix, per-image decoder fine-tuning, is not "
                   "done"),
        Claim("background-better-than-sdedit", "the blended edit keeps the background better than SDEdit at the "
              "same strength", "Avrahami et al. 2023, Section 5 (verify)", "bg_psnr",
              (("blended-latent", edit("blended-latent")), ("sdedit 0.75", edit("sdedit", strength=0.75))),
              "greater", tolerance="margin"),
    )

    def inversion(self) -> str:
        return "none"  # SDEdit's noising: Algorithm 1's z_k ~ noise(z_init, k)

    def check_dataset(self, reference: Any) -> None:
        edits = getattr(reference, "edits", None)
        first = edits(1) if edits is not None else None
        if first:
            check_masks(first, f"data set {reference.name}:")

    @torch.no_grad()
    def generate(self, model, batch: Batch, denoiser):
        items = check_edits(batch)
        check_masks(items, "the batch's")
        gens = self.generators(batch.seeds)
        z0 = self.encode_images(model, items)
        cond, uncond = self.encode_text(model, [it.target_prompt for it in items])
        trajectory = self.invert(model, denoiser, z0, cond, uncond, batch.steps, float(self.args.strength), gens)
        mask = latent_masks(items, tuple(z0.shape[-2:])).to(z0.device, z0.dtype)
        steps, scheduler = trajectory.timesteps, trajectory.scheduler
        shift = 1 if self.args.blend_level == "output" else 0

        def blend(k: int, x: torch.Tensor) -> torch.Tensor:  # after step k
            level = k + shift
            if level == len(steps):
                background = z0
            else:
                noise = sampling.cpu_noise(gens, z0.shape[1:], z0.device, z0.dtype)
                background = scheduler.add_noise(z0, noise, steps[level : level + 1])
            return mask * x + (1 - mask) * background

        return self.decode(model, self.denoise(denoiser, trajectory, cond, uncond, blend=blend))
