"""DDNM: Wang, Yu and Zhang, "Zero-Shot Image Restoration Using Denoising Diffusion Null-Space Model", ICLR 2023
(arXiv 2212.00490; official code wyhuai/DDNM). And the plain projection baseline it improves on: A+ y.

DDNM (noise-free, Algorithm 1): at each step the clean estimate from the noise prediction,
x0|t = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), is made consistent with the observation y by replacing its range-space
part: x^0|t = A+ y + (I - A+ A) x0|t (the official code writes it x0|t - A+(A x0|t - y)); the next sample is
drawn from x^0|t. The update is the official code's (``ddnm_diffusion`` in functions/svd_ddnm.py, "different from the paper, we use DDIM here instead of DDPM"):
x_{t-1} = sqrt(a_{t-1}) x^0|t + sqrt(1 - a_{t-1}) (eta z + sqrt(1 - eta^2) eps), eta = 0.85 (main.py's default),
over ``steps`` evenly spaced timesteps (the paper: 100; the run's --steps here) with a_{-1} = 1, so the last step
returns x^0|t itself and A x = y holds to float precision. ``--update ddpm`` is the paper's Algorithm 1 as
written: x_{t-1} drawn from the DDPM posterior q(x_{t-1} | x_t, x^0|t) (diffusers' DDPMScheduler with
prediction_type "sample" and the posterior variance).

Not here: DDNM+ (noisy observations: the official code's lambda_t, gamma_t) and time-travel (the official configs use
travel_length 1, travel_repeat 1: none); operators other than the three of bench/restoration.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bench import sampling
from bench.claim import Claim, restore
from bench.errors import BenchError
from bench.interfaces import Batch, DiffusionModel, EditMethod, MethodCard, ReferenceSet
from bench.restoration import TASKS, Operators, check_task
from bench.validate import check_choice, check_option

UPDATES = ("ddim", "ddpm")
PREDICTIONS = ("epsilon", "v_prediction")
QUANTIZATION_BOUND = 0.5 / 255 + 1e-6  # uint8 rounding of the samples, plus float32 round-off
NUMERICAL_BOUND = 1e-6  # consistency_error_unclipped of a float output with A x = y: float round-off alone
PROJECTION = restore("pseudo-inverse", steps=1, quick_steps=1)  # A+ y: no network call, its samples ignore --steps

def check_restoration_dataset(name: str, reference: ReferenceSet) -> None:
    tasks = getattr(reference, "restoration_tasks", None)
    if not tasks:
        raise BenchError(f"method {name!r} restores degraded images: data set {reference.name} has no degradation "
                         f"operators (use embedded-restoration)")
    for task in tasks:
        check_task(task)


def check_items(batch: Batch, shape: tuple[int, int]) -> Operators:
    """The batch's items as per-sample operators, refusing unknown tasks and masks of the wrong size."""
    if len(batch.edits) != len(batch):
        raise ValueError(f"{len(batch.edits)} items for {len(batch)} seeds")
    for it in batch.edits:
        if it.edit_type not in TASKS:
            raise BenchError(f"item {it.key}: {it.edit_type!r} is not a restoration task here (tasks: {', '.join(TASKS)}); "
                             f"restore embedded-restoration's items")
    return Operators(batch.edits, shape)


def observations(batch: Batch, like: torch.Tensor) -> torch.Tensor:
    """The items' observations A+ y as stored (uint8) -> [-1, 1] floats [N, 3, H, W]."""
    src = np.stack([np.asarray(it.source, dtype=np.uint8) for it in batch.edits])
    if src.shape[1:3] != tuple(like.shape[-2:]) or src.shape[-1] != 3:
        raise BenchError(f"restoration items are {src.shape[1]}x{src.shape[2]}, the model samples "
                         f"{like.shape[-2]}x{like.shape[-1]}")
    return (torch.from_numpy(src).permute(0, 3, 1, 2).to(like.device, like.dtype) / 255.0) * 2 - 1


class Restorer(EditMethod):
    """Base: a restorer of embedded-restoration's items on a pixel model (conditioning "edit": item i, seed i)."""

    model_kinds = ("pixel-diffusion",)
    default_dataset = "embedded-restoration"

    def check_dataset(self, reference: ReferenceSet) -> None:
        check_restoration_dataset(self.name, reference)

    def range_part(self, model: DiffusionModel, batch: Batch, param: torch.Tensor) -> tuple[Operators, torch.Tensor]:
        """(operators, A+ y) of the batch, in the model's [-1, 1] units."""
        _, h, w = model.sample_shape
        ops = check_items(batch, (h, w))
        source = observations(batch, torch.empty(len(batch), 3, h, w, device=param.device, dtype=param.dtype))
        return ops, ops.project(source)


@dataclass(frozen=True)
class DDNMArgs:
    eta: float = field(default=0.85, metadata={"help": "--update ddim: the share of fresh noise in x_{t-1} "
                                                       "(official code's eta, default 0.85; 0 deterministic)"})
    update: str = field(default="ddim", metadata={"help": "ddim: the official code's DDIM-like update (default); "
                                                          "ddpm: the paper's Algorithm 1 (the DDPM posterior)"})

    def __post_init__(self) -> None:
        check_option("eta", self.eta, 0.0, 1.0)
        check_choice("update", self.update, UPDATES)
        if self.update == "ddpm" and self.eta != 0.85:
            raise ValueError("--eta is the official update's (--update ddim); --update ddpm draws the posterior's noise")


class DDNM(Restorer):
    name = "ddnm"
    summary = "DDNM: zero-shot restoration by range/null-space decomposition (A+ y + (I - A+ A) x0|t at every step)"
    paper = "Wang et al. 2023, Zero-Shot Image Restoration Using Denoising Diffusion Null-Space Model"
    card = MethodCard(
        citation="Yinhuai Wang, Jiwen Yu, Jian Zhang. Zero-Shot Image Restoration Using Denoising Diffusion "
        "Null-Space Model. ICLR 2023.",
        url="https://arxiv.org/abs/2212.00490",
        reproduces="Algorithm 1 (noise-free DDNM) with the official code's DDIM-like update (eta 0.85; --update ddpm: "
        "the paper's DDPM posterior), on the embedded pixel DDPM over embedded-restoration's inpainting, 4x SR "
        "(average pooling) and colorization (channel mean) with the official code's operators; the output satisfies "
        "A x = y to float precision (tests/test_ddnm.py). Not here: DDNM+ (noisy y, time-travel).",
        reference="Table 1 (ImageNet and CelebA-HQ, 256x256): PSNR / SSIM / FID / consistency of DDNM against other "
        "zero-shot restorers (DDRM among them) on 4x SR, deblurring, colorization, compressed sensing and inpainting. "
        "The values are not copied here: not verified against the paper when this adapter was written.",
        embedded_claim="PSNR to the ground truth and FID better than A+ y (pseudo-inverse), and A x = y to numerical "
        "precision (consistency_error_unclipped: what uint8 rounding and clipping allow, 1e-6), on "
        "embedded-restoration. See `bench claims --method ddnm`.",
    )
    Args = DDNMArgs
    claims = (
        Claim("psnr-beats-projection", "DDNM restores closer to the ground truth (PSNR) than the plain projection A+ y",
              "Table 1: DDNM's PSNR on SR, colorization, inpainting (values not copied here); A+ y is the range-space "
              "part of the decomposition alone", "restore_psnr",
              (("ddnm", restore("ddnm")), ("pseudo-inverse", PROJECTION)), "greater",
              note="one seed at --quick (a plain comparison of means); a 16x16 world where A+ y's colorization and "
              "4x SR already hold much of the image"),
        Claim("fid-beats-projection", "DDNM's restorations are more realistic (FID) than the plain projection A+ y",
              "Table 1: DDNM's FID on SR, colorization, inpainting (values not copied here); A+ y lacks the "
              "null-space content",
              "fid", (("ddnm", restore("ddnm")), ("pseudo-inverse", PROJECTION)), "less",
              note="FID of the three tasks together against the ground truths (shapes-cnn16); 128 samples at --quick"),
        Claim("range-space-exact", "the degradation's range space is reproduced exactly: A x0 = y to numerical "
              "precision", "Algorithm 1: A x^0|t = A A+ y + (A - A A+ A) x0|t = y by construction",
              "consistency_error_unclipped", (("ddnm", restore("ddnm")),), "at-most", bound=NUMERICAL_BOUND,
              note="samples are stored as uint8, rounded and clipped to [0, 1], which the null-space term can leave "
              "(a white 4x4 block whose pixels vary around its mean 1): max |A x - y| of the stored bytes "
              "(consistency_error) measures that too. This value is the distance of y from every A x the bytes may "
              "have come from (each pixel within half a step, 0 and 255 unbounded beyond): 0 when A x = y held in "
              "float (tests/test_ddnm.py checks that to 1e-5 on the float output); a lower bound next to bytes 0 and 255"),
    )

    def check(self, model: DiffusionModel, steps: int) -> None:
        super().check(model, steps)
        sampling.check_steps(model, steps)
        prediction = model.scheduler_config.get("prediction_type", "epsilon")
        if prediction not in PREDICTIONS:
            raise BenchError(f"method {self.name!r} needs a noise (epsilon) or v-prediction model; {model.name} "
                             f"predicts {prediction}")

    def make_scheduler(self, model: DiffusionModel):
        if self.args.update == "ddpm":  # Algorithm 1: the posterior given x^0|t as the prediction
            return sampling.make_scheduler(model, "DDPMScheduler", {"prediction_type": "sample", "variance_type":
                                           "fixed_small", "clip_sample": False, "thresholding": False}, owner=self.name)
        return sampling.make_scheduler(model, "DDIMScheduler", {"clip_sample": False, "thresholding": False,
                                                                "set_alpha_to_one": True}, owner=self.name)

    def protocol(self, model: DiffusionModel) -> dict[str, Any]:
        name = "DDPMScheduler" if self.args.update == "ddpm" else "DDIMScheduler"
        return {"scheduler": sampling.resolved_config(self.make_scheduler(model), name),
                "model_prediction": model.scheduler_config.get("prediction_type", "epsilon"),
                "update": "x_{t-1} = sqrt(a') x^0 + sqrt(1 - a') (eta z + sqrt(1 - eta^2) eps), a'(-1) = 1"
                if self.args.update == "ddim" else "DDPM posterior q(x_{t-1} | x_t, x^0), variance fixed_small"}

    @torch.no_grad()
    def generate(self, model: DiffusionModel, batch: Batch, denoiser) -> torch.Tensor:
        param = next(model.unet.parameters())
        ops, apy = self.range_part(model, batch, param)
        scheduler = self.make_scheduler(model)
        scheduler.set_timesteps(batch.steps)
        gens = sampling.generators(batch.seeds)
        x = sampling.initial_noise(gens, model.sample_shape, scheduler, param)
        prediction = model.scheduler_config.get("prediction_type", "epsilon")
        alphas = scheduler.alphas_cumprod
        ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        eta = float(self.args.eta)

        def split(out: torch.Tensor, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
            a = alphas[int(t)].to(x.device, torch.float32)
            if prediction == "v_prediction":
                return a.sqrt() * x - (1 - a).sqrt() * out, (1 - a).sqrt() * x + a.sqrt() * out
            return (x - (1 - a).sqrt() * out) / a.sqrt(), out

        def consistent(out: torch.Tensor, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
            x0, eps = split(out, x, t)
            return apy + x0 - ops.project(x0), eps  # Algorithm 1: A+ y + (I - A+ A) x0|t

        def ddim_step(out, t, x, k):
            x0_hat, eps = consistent(out, x, t)
            prev = int(t) - ratio
            if prev < 0:  # a_{-1} = 1 (set_alpha_to_one): the output is x^0|t itself (A x = y exactly)
                return x0_hat, None
            a_next = alphas[prev].to(x.device, torch.float32)
            z = sampling.cpu_noise(gens, x.shape[1:]).to(x.device, x.dtype)
            return a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * (eta * z + (1 - eta**2) ** 0.5 * eps), None

        def ddpm_step(out, t, x, k):
            x0_hat, _ = consistent(out, x, t)
            kwargs = sampling.step_kwargs_for(scheduler, gens)
            if k == len(scheduler.timesteps) - 1:  # the posterior at t -> -1 is x^0|t (variance 0, weights 1, 0)
                return x0_hat, None
            return scheduler.step(x0_hat, t, x, **kwargs).prev_sample, None

        def predict(x, t, k):
            return denoiser(scheduler.scale_model_input(x, t), t)

        step = ddpm_step if self.args.update == "ddpm" else ddim_step
        return sampling.denoise(scheduler, x, predict, step=step).x


class PseudoInverse(Restorer):
    name = "pseudo-inverse"
    summary = "the plain projection baseline of restoration: A+ y (no network calls)"
    paper = "Wang et al. 2023 (DDNM), the range-space part A+ y alone"
    card = MethodCard(
        citation="Yinhuai Wang, Jiwen Yu, Jian Zhang. Zero-Shot Image Restoration Using Denoising Diffusion "
        "Null-Space Model. ICLR 2023 (the range-space part A+ y of its decomposition).",
        url="https://arxiv.org/abs/2212.00490",
        reproduces="x = A+ y in the model's [-1, 1] units (inpainting: the missing region at 0, mid-gray; 4x SR: "
        "nearest upsampling of the low-resolution image; colorization: the gray image): consistent with y, "
        "without null-space content. No network call.",
        reference="The paper reports no numbers for A+ y alone; it is the part of every DDNM output that y fixes.",
        embedded_claim="A+ y is consistent by construction (max |A(x) - y| within uint8 rounding). See "
        "`bench claims --method pseudo-inverse`; DDNM's claims compare against it.",
    )
    claims = (
        Claim("range-space-exact", "A+ y is consistent with the observation: A A+ y = y",
              "A A+ A = A (the pseudo-inverse's defining property)",
              "consistency_error", (("pseudo-inverse", PROJECTION),), "at-most",
              bound=QUANTIZATION_BOUND, note="samples are stored as uint8 (rounding by at most 0.5/255)"),
    )

    @torch.no_grad()
    def generate(self, model: DiffusionModel, batch: Batch, denoiser) -> torch.Tensor:
        _, apy = self.range_part(model, batch, next(model.unet.parameters()))
        return apy
