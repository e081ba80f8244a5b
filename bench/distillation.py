"""What the few-step students share (issue 14): the DDPM schedule as numbers, DDIM on an explicit grid, the
progressive-distillation target, and the guidance-weight embedding of guided and latent-consistency students.

Runtime level: used by the training recipes (bench/recipes/distill.py, lcm.py, guided.py) and by the adapters that
sample the students (methods/progressive_distillation.py, guided_distillation.py, lcm.py).

The grid: an N-step student steps through ``grid(N)`` = round(T k / N) - 1 for k = N .. 1, then "-1" (the clean
end, alpha-bar ``final``). It is diffusers' "trailing" spacing (Lin et al. 2023, 3.3; it starts at the last
training timestep, where the linear schedules' SNR is near zero, as Salimans and Ho's t = 1), and it nests:
grid(N) is every other point of grid(2N), so one student step spans exactly two teacher steps. Where T / N is an
integer (N = 1, 2, 4, 8 with T = 1000) ``DDIMScheduler(timestep_spacing="trailing")`` steps through the same
points with the same alpha-bars, so a student samples through diffusers' own scheduler (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def grid(n: int, train_steps: int = 1000) -> list[int]:
    """The N-step trailing grid, first to last, ending with -1 (the clean end): N + 1 points."""
    if n < 1 or n > train_steps:
        raise ValueError(f"a grid needs 1 to {train_steps} steps, got {n}")
    return [int(round(train_steps * k / n)) - 1 for k in range(n, 0, -1)] + [-1]


@dataclass(frozen=True)
class Schedule:
    """alpha-bar of a DDPM training schedule at integer timesteps; t = -1 is the clean end (``final``).

    ``final`` is what DDIMScheduler uses past the last step: 1 with ``set_alpha_to_one`` (its default), else
    alpha-bar at t = 0 (SD's PNDM config sets it false)."""

    alphas_cumprod: torch.Tensor  # float64 [T]
    final: float
    prediction_type: str
    clip_sample: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any], prediction_type: str | None = None) -> "Schedule":
        import inspect

        from diffusers import DDIMScheduler

        known = set(inspect.signature(DDIMScheduler.__init__).parameters)
        sched = DDIMScheduler.from_config({k: v for k, v in config.items() if k in known})
        ac = sched.alphas_cumprod.double()
        final = 1.0 if config.get("set_alpha_to_one", True) else float(ac[0])
        return cls(ac, final, prediction_type or sched.config.prediction_type, bool(sched.config.clip_sample))

    @property
    def train_steps(self) -> int:
        return len(self.alphas_cumprod)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha-bar at integer timesteps ``t`` (long tensor; -1: ``final``), float64."""
        t = torch.as_tensor(t, dtype=torch.long)
        table = torch.cat([self.alphas_cumprod, torch.tensor([self.final], dtype=torch.float64)])
        return table[torch.where(t < 0, torch.full_like(t, self.train_steps), t)]

    def split(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
              prediction_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from a model output at ``x``, timesteps ``t`` (per sample); x0 clipped to [-1, 1] where the
        schedule clips (the pixel DDPM), eps from the unclipped output (DDIMScheduler.step's default order)."""
        kind = prediction_type or self.prediction_type
        a = _col(self.alpha_bar(t), x)
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        out = out.double()
        xd = x.double()
        if kind == "epsilon":
            x0 = (xd - sigma * out) / alpha
        elif kind == "v_prediction":
            x0 = alpha * xd - sigma * out
        elif kind == "sample":
            x0 = out
        else:
            raise ValueError(f"prediction type {kind!r} is not one of {', '.join(PREDICTION_TYPES)}")
        eps = (xd - alpha * x0) / sigma
        if self.clip_sample:
            x0 = x0.clamp(-1, 1)
        return x0, eps

    def ddim(self, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM (Song et al. 2021, eq. 12) to ``t_next`` from the predictions (x0, eps)."""
        a = _col(self.alpha_bar(t_next), x)
        return (a.sqrt() * x0 + (1 - a).sqrt() * eps).to(x.dtype)

    def v_target(self, x: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v (Salimans and Ho 2022, appendix D) that gives x0 at (x, t): v = (alpha x - x0) / sigma."""
        a = _col(self.alpha_bar(t), x)
        return ((a.sqrt() * x.double() - x0.double()) / (1 - a).sqrt()).to(x.dtype)


class VPDenoiser:
    """An epsilon-parameterised VP model as a denoiser on the sigma scale (Karras et al. 2022, section 2 and
    appendix C.2): D(x, sigma) = x - sigma eps(x / sqrt(1 + sigma^2), t(sigma)), with t(sigma) the fractional
    timestep whose sigma_t = sqrt((1 - alpha-bar) / alpha-bar) is sigma, linear in log sigma between the table's
    entries (k-diffusion's DiscreteEpsDDPMDenoiser; diffusers' ``_sigma_to_t``). A sigma outside the table's range
    takes its end's timestep. ``eps(x, t)``: the network's output at input x and (fractional) timesteps t: epsilon,
    or where ``prediction_type`` says so v (D = (x_in - sigma v) / sqrt(1 + sigma^2)) or x0 (D = the output).

    Used by the consistency-distillation recipe (the teacher's ODE) and the edm sampler (methods/edm.py)."""

    def __init__(self, eps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], alphas_cumprod: torch.Tensor,
                 prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
        self.eps = eps
        self.prediction_type = prediction_type
        self.sigmas = ((1 - alphas_cumprod.double()) / alphas_cumprod.double()).sqrt()  # ascending in t
        self.log_sigmas = self.sigmas.log().float()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timesteps whose sigma is ``sigma`` (linear in log sigma between the table's entries)."""
        log_sigma = sigma.float().log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        idx = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        low, high = self.log_sigmas[idx - 1], self.log_sigmas[idx]
        w = (log_sigma - low) / (high - low)
        return (idx - 1).float() + w

    def sigma_of(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of ``t_of``: sigma at fractional timesteps ``t`` (log sigma linear between entries), float64."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, len(self.sigmas) - 1)
        low = t.floor().long().clamp(max=len(self.sigmas) - 2)
        w = t - low
        log = self.sigmas.log()
        return ((1 - w) * log[low] + w * log[low + 1]).exp()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        s = sigma.reshape(-1, 1, 1, 1).to(x.device, x.dtype)
        x_in = x / (1 + s**2).sqrt()
        out = self.eps(x_in, self.t_of(sigma).reshape(-1).to(x.device))
        if self.prediction_type == "v_prediction":
            return (x_in - s * out) / (1 + s**2).sqrt()
        if self.prediction_type == "sample":
            return out
        return x - s * out


def _col(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def distillation_target(schedule: Schedule, teacher: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        x: torch.Tensor, t: torch.Tensor, t_mid: torch.Tensor, t_next: torch.Tensor,
                        teacher_prediction: str | None = None) -> torch.Tensor:
    """Salimans and Ho 2022, Algorithm 2: two teacher DDIM steps t -> t_mid -> t_next from ``x``, and the x0 that
    one student DDIM step t -> t_next would need to land where they land:
    x~ = (z'' - (sigma''/sigma) z) / (alpha'' - (sigma''/sigma) alpha); at the clean end (sigma'' = 0) x~ = z''.

    ``teacher(x, t)`` is the teacher's raw output (guidance applied), of ``teacher_prediction`` type (default: the
    schedule's). Returns x~ in float64, clipped to [-1, 1] where the schedule clips x0 (the pixel DDPM): on a linear
    beta schedule the first step's denominator alpha'' - (sigma''/sigma) alpha is near 0 (alpha-bar at t = T is 4e-5,
    not the cosine schedule's 0 of the paper) and x~ would amplify the teacher's end point a thousandfold, where the
    landing point hardly depends on x~ at all."""
    with torch.no_grad():
        x0, eps = schedule.split(teacher(x, t), x, t, teacher_prediction)
        mid = schedule.ddim(x, x0, eps, t_mid)
        x0, eps = schedule.split(teacher(mid, t_mid), mid, t_mid, teacher_prediction)
        end = schedule.ddim(mid, x0, eps, t_next).double()
    a, a2 = _col(schedule.alpha_bar(t), x), _col(schedule.alpha_bar(t_next), x)
    alpha, sigma, alpha2, sigma2 = a.sqrt(), (1 - a).sqrt(), a2.sqrt(), (1 - a2).sqrt()
    ratio = sigma2 / sigma
    target = (end - ratio * x.double()) / (alpha2 - ratio * alpha)
    return target.clamp(-1, 1) if schedule.clip_sample else target


# -- the guidance weight as an input (Meng et al. 2023; Luo et al. 2023's w-embedding) ---------------------------------
def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """diffusers' ``get_guidance_scale_embedding`` (the sinusoidal embedding of 1000 w that LatentConsistencyModel-
    and StableDiffusionPipeline feed to a UNet's ``timestep_cond`` when ``time_cond_proj_dim`` is set)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.get_guidance_scale_embedding(None, w.float(), embedding_dim=dim)


def with_guidance_input(unet, dim: int = 256):
    """A copy of a ``UNet2DConditionModel`` that also takes the guidance weight (``time_cond_proj_dim`` = ``dim``):
    the teacher's weights, the new ``time_embedding.cond_proj`` zero, so that at step 0 it is the teacher (for every
    w). The architecture diffusers' LCM and guided-distillation checkpoints use."""
    from diffusers import UNet2DConditionModel

    # without "_use_default_values": from_config would drop a key the teacher only defaulted (time_cond_proj_dim of a
    # UNet built in memory rather than loaded), and the student would have no cond_proj
    config = {k: v for k, v in unet.config.items() if k != "_use_default_values"}
    student = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": dim})
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj") for k in missing):
        raise RuntimeError(f"teacher and student differ beyond cond_proj: missing {missing}, unexpected {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def uniform_steps(count: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` student step indices k in 1..n (the step from grid(n)[n - k] to grid(n)[n - k + 1]), uniform."""
    return torch.randint(1, n + 1, (count,), generator=generator)


def step_timesteps(n: int, k: torch.Tensor, train_steps: int = 1000) -> tuple[torch.Tensor, ...]:
    """(t, t_mid, t_next) of student step ``k`` (1..n, 1 = the first step, from the noisiest point) on grid(n),
    t_mid from grid(2n)."""
    coarse = torch.tensor(grid(n, train_steps))
    fine = torch.tensor(grid(2 * n, train_steps)) if 2 * n <= train_steps else None
    t, t_next = coarse[k - 1], coarse[k]
    if fine is None:
        raise ValueError(f"a {n}-step student needs a {2 * n}-step teacher grid within {train_steps} timesteps")
    return t, fine[2 * k - 1], t_next


def check_grid_matches_ddim(n: int, train_steps: int = 1000) -> bool:
    """Whether DDIMScheduler(timestep_spacing="trailing") at ``n`` steps steps through ``grid(n)``."""
    return train_steps % n == 0 and all(np.diff(grid(n, train_steps)[:-1]) == -(train_steps // n))
