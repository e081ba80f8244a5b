"""Predictor-corrector sampling of the reverse-time SDE: Song et al. 2021, "Score-Based Generative Modeling through
Stochastic Differential Equations", ICLR 2021, section 4.2, Algorithms 2 (VE) and 3 (VP)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from bench import sampling
from bench.claim import PIXEL_METRICS, Arm, Claim
from bench.interfaces import Batch, DiffusionModel, Method, MethodCard
from bench.sde import SCORE_VE, SDE, sde_of
from bench.validate import check_choice, check_option
from methods.probability_flow import CITATION, URL, sampling_eps, to_images

PREDICTORS = ("reverse-diffusion", "euler-maruyama", "none")
CORRECTORS = ("langevin", "none")
VP_SNR = 0.16  # the official configs' sampling.snr (configs/default_*_configs.py); their VP configs run no corrector
VP_MAX_BETA = 0.999  # a reverse-diffusion step's beta, clipped as iDDPM clips its betas
NCSN_MODEL = "embedded-ncsn"


def ncsn_arm(method: str, steps: int, quick_steps: int | None = None, **options: Any) -> Arm:
    """A sampler on the embedded NCSN (VE) against shapes16: 256 samples x 3 seeds (--quick: 128 x 2; FID needs
    twice its 64 feature dimensions)."""
    return Arm(method, steps, dict(options), model=NCSN_MODEL, dataset="shapes16", num_samples=256, seeds=(0, 1, 2),
               quick_num_samples=128, quick_seeds=(0, 1), quick_steps=quick_steps, metrics=PIXEL_METRICS)


@dataclass(frozen=True)
class ScoreSDEArgs:
    predictor: str = field(default="reverse-diffusion", metadata={
        "help": "reverse-diffusion (the SDE's own discretization), euler-maruyama, or none (corrector only)"})
    corrector: str = field(default="langevin", metadata={"help": "langevin (Algorithms 4 and 5) or none"})
    snr: float | None = field(default=None, metadata={
        "help": "the corrector's signal-to-noise ratio r; default: the model's ScoreSdeVeScheduler snr (VE; the "
                "paper's 0.16), else 0.16 (the official configs)"})
    corrector_steps: int | None = field(default=None, metadata={
        "help": "Langevin steps per noise level M; default: the VE scheduler's correct_steps, else 1"})

    def __post_init__(self) -> None:
        check_choice("predictor", self.predictor, PREDICTORS)
        check_choice("corrector", self.corrector, CORRECTORS)
        check_option("snr", self.snr, 0, lo_open=True, optional=True)
        check_option("corrector_steps", self.corrector_steps, 1, integer=True, optional=True)
        if self.predictor == "none" and self.corrector == "none":
            raise ValueError("--predictor none with --corrector none samples nothing")
        if self.corrector == "none" and (self.snr is not None or self.corrector_steps is not None):
            raise ValueError("--snr and --corrector-steps set the Langevin corrector, and --corrector is none")


def langevin_step(x: torch.Tensor, score: torch.Tensor, noise: torch.Tensor, snr: float, alpha: torch.Tensor):
    """Algorithms 4 / 5: step 2 alpha (r ||z|| / ||s||)^2, then x + step s + sqrt(2 step) z; norms per sample (the
    official code and diffusers average them over the batch, which makes a sample depend on its batch; equal at
    batch 1). Returns (x, its mean)."""
    norm = lambda v: v.flatten(1).norm(dim=1)  # noqa: E731
    step = (2 * alpha * (snr * norm(noise) / norm(score)) ** 2).reshape(-1, *([1] * (x.dim() - 1)))
    mean = x + step * score
    return mean + (2 * step).sqrt() * noise, mean


class ScoreSDE(Method):
    name = "score-sde"
    summary = "predictor-corrector sampling of the reverse SDE (Song et al. 2021): reverse diffusion + Langevin"
    paper = "Song et al. 2021, Score-Based Generative Modeling through Stochastic Differential Equations"
    card = MethodCard(
        citation=CITATION,
        url=URL,
        reproduces="Algorithms 2 (VE) and 3 (VP): at each of --steps noise levels from t = 1 to eps, --corrector-steps "
        "Langevin corrector steps (step size from the signal-to-noise ratio --snr), then one predictor step "
        "(reverse diffusion: the forward SDE's own discretization reversed; or Euler-Maruyama); the last "
        "predictor's mean is the sample (the official noise removal). VE models through diffusers' "
        "ScoreSdeVeScheduler (step_pred, step_correct; equal to ScoreSdeVePipeline at batch 1, tested); VP written "
        "here (beta_i = beta(t)/N). The corrector's norms are per sample (the official code's batch mean ties a "
        "sample to its batch). NFE = steps x (1 + corrector steps).",
        reference="CIFAR-10 FID (Table 1): predictor-corrector beats predictor-only at equal predictor steps, and "
        "PC1000 beats P2000 at equal NFE, for the VE and VP SDEs",
        embedded_claim="On shapes16 with embedded-ncsn: reverse diffusion + Langevin (PC) beats reverse diffusion "
        "alone at 200 predictor steps, and at equal NFE (predictor-only at 400). Decided by `bench claims --method "
        "score-sde`.",
    )
    Args = ScoreSDEArgs
    model_kinds = ("pixel-diffusion", SCORE_VE)
    claims = (
        Claim("pc-beats-predictor-only", "predictor-corrector sampling (reverse diffusion + Langevin) beats the "
              "predictor alone at equal predictor steps",
              "Song et al. 2021, Table 1 (CIFAR-10, VE and VP SDEs)", "fid",
              (("PC 200", ncsn_arm("score-sde", 200, quick_steps=100)),
               ("P 200", ncsn_arm("score-sde", 200, quick_steps=100, corrector="none"))), "less",
              note="measured at --quick size only (2 seeds x 128 samples: `bench claims --method score-sde --quick`):"
              " the means favour PC, the two seeds' interval is too wide to decide; the full size was not run"),
        Claim("pc-beats-predictor-only-equal-nfe", "predictor-corrector at 200 steps (400 NFE) beats the predictor "
              "alone at 400 steps",
              "Song et al. 2021, Table 1: PC1000 against P2000 (equal NFE)", "fid",
              (("PC 200", ncsn_arm("score-sde", 200, quick_steps=100)),
               ("P 400", ncsn_arm("score-sde", 400, quick_steps=200, corrector="none"))), "less",
              note="measured at --quick size only (2 seeds x 128 samples: `bench claims --method score-sde --quick`):"
              " the means favour PC, the two seeds' interval is too wide to decide; the full size was not run"),
    )

    def check(self, model: DiffusionModel, steps: int) -> None:
        super().check(model, steps)
        sde_of(model, owner=f"method {self.name!r}")

    def resolved(self, model: DiffusionModel) -> tuple[float, int]:
        """(snr, corrector steps) as run."""
        ve = model.kind == SCORE_VE
        snr = self.args.snr if self.args.snr is not None else (
            float(model.scheduler_config.get("snr", VP_SNR)) if ve else VP_SNR)
        steps = self.args.corrector_steps if self.args.corrector_steps is not None else (
            int(model.scheduler_config.get("correct_steps", 1)) if ve else 1)
        return snr, (steps if self.args.corrector == "langevin" else 0)

    def ve_scheduler(self, model: DiffusionModel):
        snr, m = self.resolved(model)
        return sampling.make_scheduler(model, "ScoreSdeVeScheduler", {"snr": snr, "correct_steps": max(m, 1)},
                                       sampler_defaults=False, known_only=True, owner=self.name)

    def protocol(self, model: DiffusionModel) -> dict[str, Any]:
        snr, m = self.resolved(model)
        out = {"sde": sde_of(model).identity(), "snr": snr, "corrector_steps": m, "eps": sampling_eps(model),
               "corrector_norms": "per sample"}
        if model.kind == SCORE_VE:
            out["scheduler"] = sampling.resolved_config(self.ve_scheduler(model), "ScoreSdeVeScheduler")
        return out

    @torch.no_grad()
    def generate(self, model: DiffusionModel, batch: Batch, denoiser) -> torch.Tensor:
        sde = sde_of(model)
        param = next(model.unet.parameters())
        _, h, w = model.sample_shape
        shape = (model.unet.config.in_channels, h, w)
        gens = sampling.generators(batch.seeds)
        snr, m = self.resolved(model)
        n = batch.steps

        def noise() -> torch.Tensor:
            return sampling.cpu_noise(gens, shape).to(param.device, torch.float32)

        def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return sde.score(denoiser(x.to(param.dtype), sde.label(t)).float(), x, t)

        if model.kind == SCORE_VE:
            scheduler = self.ve_scheduler(model)
            scheduler.set_timesteps(n)
            scheduler.set_sigmas(n)
            x = (sampling.cpu_noise(gens, shape) * scheduler.init_noise_sigma).to(param.device, torch.float32)
            timesteps = scheduler.timesteps
        else:
            x = noise() * sde.prior_std
            timesteps = torch.linspace(sde.T, sampling_eps(model), n)
        mean = x
        for i, t_i in enumerate(timesteps):
            t = torch.full((len(x),), float(t_i), device=param.device)
            if model.kind == SCORE_VE:
                t_in = scheduler.sigmas[i] * torch.ones(len(x), device=param.device)  # ScoreSdeVePipeline's input
            for _ in range(m):
                if model.kind == SCORE_VE:  # diffusers' step_correct, one sample at a time (its norms are batch means)
                    out = denoiser(x.to(param.dtype), t_in).float()
                    x = mean = torch.cat([scheduler.step_correct(out[j:j + 1], x[j:j + 1], generator=gens[j])
                                          .prev_sample for j in range(len(x))])
                else:
                    alpha = 1 - (sde.beta(t) / n).clamp(max=VP_MAX_BETA)
                    x, mean = langevin_step(x, score(x, t), noise(), snr, alpha)
            if self.args.predictor == "reverse-diffusion" and model.kind == SCORE_VE:
                out = denoiser(x.to(param.dtype), t_in).float()
                step = scheduler.step_pred(out, t_i, x, generator=gens)
                x, mean = step.prev_sample, step.prev_sample_mean
            elif self.args.predictor == "reverse-diffusion":
                x, mean = reverse_diffusion_vp(sde, x, t, score(x, t), noise(), n)
            elif self.args.predictor == "euler-maruyama":
                x, mean = euler_maruyama(sde, x, t, score(x, t), noise(), n)
        return to_images(mean, model)


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def reverse_diffusion_vp(sde: SDE, x, t, score, z, n: int):
    """The reverse of DDPM's discretization (Song et al. 2021, eq. 47 reversed, appendix E): with beta_i = beta(t)/N,
    f = (sqrt(1 - beta_i) - 1) x and G = sqrt(beta_i): x_mean = x - f + G^2 score, x = x_mean + G z."""
    beta = _col((sde.beta(t) / n).clamp(max=VP_MAX_BETA), x)
    mean = x - ((1 - beta).sqrt() - 1) * x + beta * score
    return mean + beta.sqrt() * z, mean


def euler_maruyama(sde: SDE, x, t, score, z, n: int):
    """One Euler-Maruyama step of the reverse SDE with dt = -1/N: x_mean = x + [f - g^2 score] dt, x = x_mean + g
    sqrt(|dt|) z."""
    dt = -1.0 / n
    mean = x + sde.reverse_drift(x, t, score) * dt
    return mean + _col(sde.diffusion(t), x) * (-dt) ** 0.5 * z, mean

