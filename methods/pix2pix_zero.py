"""pix2pix-zero: Parmar et al., "Zero-shot Image-to-Image Translation", SIGGRAPH 2023.

The method as the authors' code (pix2pixzero/pix2pix-zero, ``edit_real.py``) and diffusers'
``StableDiffusionPix2PixZeroPipeline`` (diffusers 0.2x, no longer in 0.42; its ``invert`` and ``__call__``) run it:

1. Regularized DDIM inversion of the source with its prompt (no guidance): at every inverse step the noise
   estimate is pushed towards an i.i.d. standard normal by ``reg_steps`` (5) rounds of gradient steps on an
   auto-correlation loss (``ac_rolls`` = 5 random rolls per round, weight ``lambda_ac`` = 20, the gradient divided by
   the roll count; the pairwise loss sum_{rolls, axes} mean(eps * roll(eps))^2 over every channel, on a pyramid that
   stops at 8x8) and a KL loss (var + mean^2 - 1 - log var, weight ``lambda_kl`` = 20). The pipeline takes the KL
   statistics over the whole batch and one generator for the rolls; here each sample's own (its statistics, its
   seed's generator), which is the same thing for the papers' batch of one.
2. The edit direction Δc: the mean CLIP-text embedding (all 77 token positions, the pipeline's
   ``construct_direction``) of sentences with the target word minus that of sentences with the source word. The
   paper generates about a thousand sentences per word with GPT-3; here they come from fixed templates over the
   embedded world's vocabulary (``direction_sentences``: every one-object caption of the world with the word in its
   slot, generic templates for a word outside the world), deterministic, from the edit's ``blend_words``.
3. A reference pass: guided DDIM (5, the official ``negative_guidance_scale``) with the source prompt from the
   inverted latent, recording every cross-attention map at every step.
4. The edited pass with the embedding c + Δc from the same inverted latent: at every step the model input (both
   guidance copies) takes one SGD step (rate ``xattn_guidance`` = 0.1) on sum over the cross-attention layers of
   the mean over (guidance branch, head) of ||M_edit - M_ref||^2 (the pipeline's ``Pix2PixZeroL2Loss``; here per
   sample, then summed: the same for one sample), the noise is recomputed at the updated inputs, and the DDIM
   step starts from the updated unconditional copy (``x_in.chunk(2)[0]`` in both codes).

The embedded UNet has cross-attention at 4x4 latents only, so the maps that guide the edit are 4x4 (SD 1.x: 64x64
to 8x8); with ``--xattn-guidance 0`` the edited pass is plain guided DDIM with c + Δc.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
import torch.nn.functional as F

from bench import sampling
from bench.claim import Claim, edit
from bench.embedded.shapes import ALL_COLORS, ALL_SHAPES, BACKGROUNDS, COLORS, SHAPES, SIZES
from bench.errors import BenchError
from bench.interfaces import Batch, MethodCard
from bench.validate import check_bool
from methods.editing import LatentEditor, ReconstructionArgs, check_edits, check_number
from methods.p2p import controlled_attention

CLAIM_METRICS = ("edit-structure", "edit-background", "edit-clip")


def _arm(method: str, **options):
    """An editor on embedded-edits (``edit``: 64 edits, 50 steps; --quick 8 edits, 10 steps), with the structure
    distance, the background and the CLIP score."""
    return replace(edit(method, **options), metrics=CLAIM_METRICS)
GENERIC_TEMPLATES = ("a {}", "a photo of a {}", "a picture of a {}", "an image of a {}", "a {} on a background",
                     "a drawing of a {}", "a small {}", "a large {}")


@dataclass(frozen=True)
class Pix2PixZeroArgs(ReconstructionArgs):
    guidance: float = field(default=5.0, metadata={"help": "guidance scale of the reference and edited passes (the "
                                                           "official code's negative_guidance_scale: 5)"})
    xattn_guidance: float = field(default=0.1, metadata={"help": "cross-attention guidance: SGD rate of the latent on "
                                                                 "||M_edit - M_ref||^2 (official xa_guidance and the "
                                                                 "pipeline: 0.1; 0 = off)"})
    regularize: bool = field(default=True, metadata={"help": "regularized inversion (auto-correlation + KL on the "
                                                             "noise estimate); off: plain DDIM inversion"})
    lambda_ac: float = field(default=20.0, metadata={"help": "regularized inversion: auto-correlation weight (20)"})
    lambda_kl: float = field(default=20.0, metadata={"help": "regularized inversion: KL weight (20)"})
    reg_steps: int = field(default=5, metadata={"help": "regularized inversion: rounds per inverse step (5)"})
    ac_rolls: int = field(default=5, metadata={"help": "regularized inversion: random rolls per round (5)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("xattn_guidance", self.xattn_guidance, 0.0)
        check_bool("regularize", self.regularize)
        check_number("lambda_ac", self.lambda_ac, 0.0)
        check_number("lambda_kl", self.lambda_kl, 0.0)
        check_number("reg_steps", self.reg_steps, 0, integer=True)
        check_number("ac_rolls", self.ac_rolls, 1, integer=True)


# -- the edit direction ------------------------------------------------------------------------------------------------
def direction_sentences(word: str) -> list[str]:
    """Sentences containing ``word``: every one-object caption of the embedded world ("a {size} {color} {shape} on a
    {background} background", the training vocabulary) with the word in its own slot; generic templates for a word
    the world does not have. Deterministic, in a fixed order."""
    sizes, colors, shapes, backgrounds = tuple(SIZES), tuple(COLORS), SHAPES, tuple(BACKGROUNDS)
    slots = {"size": sizes, "color": colors, "shape": shapes, "background": backgrounds}
    if word in SIZES:
        slots["size"] = (word,)
    elif word in ALL_COLORS:
        slots["color"] = (word,)
    elif word in ALL_SHAPES:
        slots["shape"] = (word,)
    elif word in BACKGROUNDS:
        slots["background"] = (word,)
    else:
        return [t.format(word) for t in GENERIC_TEMPLATES]
    return [f"a {s} {c} {h} on a {b} background" for s in slots["size"] for c in slots["color"]
            for h in slots["shape"] for b in slots["background"]]


# -- regularized inversion ---------------------------------------------------------------------------------------------
def auto_corr_loss(eps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The pipeline's ``auto_corr_loss`` for one sample [C, H, W]: per channel, on a pyramid down to 8x8, the squared
    mean of eps times eps rolled by a random amount (< H/2) along each axis."""
    loss = eps.new_zeros(())
    for j in range(eps.shape[0]):
        noise = eps[None, j : j + 1]
        while True:
            roll = int(torch.randint(noise.shape[2] // 2, (1,), generator=generator).item())
            loss = loss + (noise * torch.roll(noise, shifts=roll, dims=2)).mean() ** 2
            loss = loss + (noise * torch.roll(noise, shifts=roll, dims=3)).mean() ** 2
            if noise.shape[2] <= 8:
                break
            noise = F.avg_pool2d(noise, kernel_size=2)
    return loss


def kl_loss(eps: torch.Tensor) -> torch.Tensor:
    """The pipeline's ``kl_divergence`` for one sample: var + mean^2 - 1 - log(var + 1e-7)."""
    mean, var = eps.mean(), eps.var()
    return var + mean**2 - 1 - torch.log(var + 1e-7)


def regularize_noise(eps: torch.Tensor, generators: Sequence[torch.Generator], lambda_ac: float, lambda_kl: float,
                     reg_steps: int, ac_rolls: int) -> torch.Tensor:
    """``StableDiffusionPix2PixZeroPipeline.invert``'s regularization of a noise estimate, sample by sample."""
    def grad(loss_fn, value: torch.Tensor) -> torch.Tensor:
        var = value.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = sum(loss_fn(i, var[i]) for i in range(len(var)))
            return torch.autograd.grad(loss, var)[0]

    eps = eps.detach()
    for _ in range(reg_steps):
        if lambda_ac > 0:
            for _ in range(ac_rolls):
                eps = eps - lambda_ac * grad(lambda i, e: auto_corr_loss(e, generators[i]), eps) / ac_rolls
        if lambda_kl > 0:
            eps = eps - lambda_kl * grad(lambda i, e: kl_loss(e), eps)
    return eps.detach()


# -- cross-attention maps ----------------------------------------------------------------------------------------------
class CrossAttentionGuide:
    """Records the reference pass's cross-attention maps per (step, layer); in ``loss`` mode sums, per sample, the
    mean over (guidance branch, head) of ||M - M_ref||^2 over (query, key), over the layers."""

    def __init__(self, n: int):
        self.n, self.step, self.mode = n, 0, None
        self.reference: dict[tuple[int, str], torch.Tensor] = {}
        self.loss: torch.Tensor | None = None

    def __call__(self, probs: torch.Tensor, is_cross: bool, name: str, heads: int) -> torch.Tensor:
        if not is_cross or self.mode is None:
            return probs
        if self.mode == "record":
            self.reference[(self.step, name)] = probs.detach()
        else:
            ref = self.reference[(self.step, name)]
            d = ((probs - ref) ** 2).sum((1, 2)).reshape(-1, self.n, heads)  # [branches, n, heads]
            per_sample = d.mean(dim=(0, 2)).sum()
            self.loss = per_sample if self.loss is None else self.loss + per_sample
        return probs


class RegularizedDenoiser:
    """The counting denoiser, its noise estimate regularized (the inversion's model calls, pix2pix-zero's step 1)."""

    def __init__(self, denoiser, regularize):
        self.denoiser, self.regularize = denoiser, regularize

    def __call__(self, x, t, **kwargs):
        return self.regularize(self.denoiser(x, t, **kwargs))


class Pix2PixZero(LatentEditor):
    name = "pix2pix-zero"
    summary = "pix2pix-zero: regularized DDIM inversion, a text-embedding edit direction, cross-attention guidance"
    paper = "Parmar et al. 2023, Zero-shot Image-to-Image Translation"
    card = MethodCard(
        citation="Gaurav Parmar, Krishna Kumar Singh, Richard Zhang, Yijun Li, Jingwan Lu, Jun-Yan Zhu. Zero-shot "
        "Image-to-Image Translation. SIGGRAPH 2023.",
        url="https://arxiv.org/abs/2302.03027",
        reproduces="Section 3 as the official code and diffusers' StableDiffusionPix2PixZeroPipeline run it: DDIM "
        "inversion with the source prompt, regularized (auto-correlation and KL, lambda 20 each, 5 rounds, 5 "
        "rolls); the edit direction Δc as the difference of mean text embeddings of sentences with the target and "
        "the source word; a reference pass with the source prompt recording the cross-attention maps; the edited "
        "pass with c + Δc where the latent takes an SGD step of 0.1 on the cross-attention L2 loss before each "
        "guided (5) DDIM step. Simplifications: the sentences come from fixed templates over the embedded "
        "world's vocabulary (the paper: GPT-3 sentences), the regularization's KL statistics and the "
        "cross-attention loss are per sample (the pipeline's batch statistics, equal for one sample), and the "
        "embedded UNet's cross-attention maps are 4x4.",
        reference="Paper, Section 4 (SD 1.4, LAION images; cat->dog and other word edits): higher CLIP "
        "classification accuracy at a lower structure (DINO self-similarity) distance than SDEdit and Prompt-to-"
        "Prompt with word swap, and an ablation in which removing cross-attention guidance raises the structure "
        "distance (its tables' values not carried over here: verify); PIE-Bench Table 1 (Ju et al. 2024; verify): "
        "DDIM + pix2pix-zero structure 61.68e-3, background PSNR 20.44.",
        embedded_claim="Cross-attention guidance lowers the structure distance (structure_dist_shapes_cnn32) "
        "against the same edit without it (--xattn-guidance 0). Decided by `bench claims --method pix2pix-zero`.",
    )
    Args = Pix2PixZeroArgs
    claims = (
        Claim("xattn-guidance-keeps-structure", "cross-attention guidance preserves the source's structure: lower "
              "structure distance than the same edit without it", "Parmar et al. 2023, Section 4 ablation of "
              "cross-attention guidance (structure distance higher without it; verify the table's values)",
              "structure_dist_shapes_cnn32",
              (("pix2pix-zero", _arm("pix2pix-zero")), ("no xattn guidance", _arm("pix2pix-zero", xattn_guidance=0.0))),
              "less", tolerance="margin",
              note="the embedded UNet's cross-attention maps are 4x4 (one cell = 8x8 pixels), so the guidance can "
              "only steer the layout at that resolution"),
    )

    def check(self, model, steps: int) -> None:
        super().check(model, steps)
        if not any(".attn2." in name for name in model.unet.attn_processors):
            raise BenchError(f"pix2pix-zero guides cross-attention maps; the UNet of {model.name} has no cross-attention")

    # -- pieces ----------------------------------------------------------------------------------------------------
    def directions(self, model, items) -> torch.Tensor:
        """Δc per edit: mean embedding of the target word's sentences minus the source word's, [n, 77, D]."""
        cache: dict[str, torch.Tensor] = {}

        def mean_embedding(word: str) -> torch.Tensor:
            if word not in cache:
                cache[word] = self.encode_text(model, direction_sentences(word))[0].mean(0)
            return cache[word]

        out = []
        for it in items:
            src, tgt = it.blend_words
            if not src or not tgt:
                raise BenchError(f"pix2pix-zero needs each edit's source and target word (blend_words); edit {it.key} "
                                 "has none")
            out.append(mean_embedding(tgt) - mean_embedding(src))
        return torch.stack(out)

    def invert_regularized(self, model, denoiser, z0, cond, steps, timesteps, seeds) -> list[torch.Tensor]:
        a = self.args
        if a.regularize and a.reg_steps > 0:
            gens = self.generators(seeds)
            denoiser = RegularizedDenoiser(denoiser, lambda eps: regularize_noise(eps, gens, a.lambda_ac, a.lambda_kl,
                                                                                  a.reg_steps, a.ac_rolls))
        return self.ddim_inversion(model, denoiser, z0, cond, steps, timesteps)

    @torch.no_grad()
    def generate(self, model, batch: Batch, denoiser):
        items, steps = check_edits(batch), batch.steps
        n = len(items)
        delta = self.directions(model, items)
        z0 = self.encode_images(model, items)
        cond, uncond = self.encode_text(model, [it.source_prompt for it in items])
        scheduler = self.make_scheduler(model)
        timesteps = self.editing_timesteps(scheduler, steps, 1.0)
        latents = self.invert_regularized(model, denoiser, z0, cond, steps, timesteps, batch.seeds)
        guided = self.guidance_scale() != 1.0
        lr = float(self.args.xattn_guidance)
        guide = CrossAttentionGuide(n)
        edited = cond + delta.to(cond)
        context = torch.cat([uncond, edited]) if guided else edited
        groups = 2 if guided else 1
        with controlled_attention(model.unet, guide):
            if lr > 0:  # the reference pass: the source prompt, its maps recorded
                guide.mode = "record"

                def predict(x, t, k):
                    guide.step = k
                    return self.guided_eps(denoiser, x, t, cond, uncond)

                sampling.denoise(scheduler, latents[0], predict, timesteps=timesteps)
            x = latents[0]
            for k, t in enumerate(timesteps):
                guide.step = k
                x_in = torch.cat([x] * groups)
                if lr > 0:  # one SGD step of the inputs on the cross-attention loss
                    x_in = x_in.detach().requires_grad_(True)
                    guide.mode, guide.loss = "loss", None
                    with torch.enable_grad():
                        denoiser(x_in, t, encoder_hidden_states=context)
                        grad = torch.autograd.grad(guide.loss, x_in)[0]
                    x_in = (x_in - lr * grad).detach()
                    guide.mode = None
                eps = denoiser(x_in, t, encoder_hidden_states=context)
                if guided:
                    eps_u, eps_c = eps.chunk(2)
                    eps = sampling.guide(eps_u, eps_c, self.guidance_scale())
                x = scheduler.step(eps, t, x_in[:n]).prev_sample
        return self.decode(model, x)
