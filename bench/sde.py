"""The SDEs of Song et al. 2021 ("Score-Based Generative Modeling through Stochastic Differential Equations", ICLR
2021) built from a loaded model, their probability-flow ODE, an adaptive RK45 that steps every sample on its own,
and the likelihood in bits per dimension through the ODE (Hutchinson's trace estimator).

Facts carried over from the paper and its code (yang-song/score_sde_pytorch: sde_lib.py, likelihood.py, sampling.py):

- VP (eq. 11): dx = -beta(t)/2 x dt + sqrt(beta(t)) dw, beta(t) = beta_min + t (beta_max - beta_min) on t in [0, 1];
  a DDPM with N linear betas beta_start..beta_end is beta_min = N beta_start, beta_max = N beta_end, and its network
  takes the timestep t (N - 1). Marginal: mean coefficient exp(-t^2 (beta_max - beta_min)/4 - t beta_min/2).
- Nichol and Dhariwal's cosine schedule ("squaredcos_cap_v2") in continuous t: alpha-bar(t) = f(t) / f(0),
  f(t) = cos^2((t + s)/(1 + s) pi/2), s = 0.008; beta(t) = -d log alpha-bar / dt, capped where a step of 1/N would
  exceed iDDPM's beta clip 0.999 (beta <= -N log(1 - 0.999)); training step i has alpha-bar((i + 1)/N), so the network
  takes N t - 1.
- VE (eq. 9): sigma(t) = sigma_min (sigma_max / sigma_min)^t, dx = sigma(t) sqrt(2 log(sigma_max/sigma_min)) dw; the
  network (UNet2DModel with Fourier time embedding, NCSN++) takes sigma(t) and its output is the score.
- The probability-flow ODE (eq. 13): dx/dt = f(x, t) - g(t)^2 / 2 score(x, t).
- Likelihood: integrate [x, log-density change] from eps = 1e-5 to T = 1 with RK45 at rtol = atol = 1e-5; the
  divergence by Hutchinson-Skilling with one Rademacher (or Gaussian) probe per image, fixed along the path;
  bpd = -(log p_T(x_T) + delta) / (D ln 2), plus 7 for data in [-1, 1] from 8-bit pixels with uniform
  dequantization (u + U(0, 1)) / 256 (8 bits, less 1 bit for the factor 2 of the scaling to [-1, 1]).

scipy's RK45 (Dormand-Prince 5(4)) steps a whole system with one step size, so a batch solved as one system gives
each sample steps chosen by the others. ``solve_rk45`` runs scipy's own tableau and step-size rule (scipy.integrate
.RK45: initial step, safety 0.9, factors 0.2..10, RMS error norm) with one step size per sample, the samples of a
batch evaluated together: sample i gets exactly what ``solve_ivp(method="RK45")`` gives it alone (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from bench.errors import BenchError

LIKELIHOOD_EPS = 1e-5  # likelihood.py: the start time of the likelihood ODE
VP_SAMPLING_EPS = 1e-3  # configs: sampling.eps, VP models
VE_SAMPLING_EPS = 1e-5  # configs: sampling.eps, VE models (ScoreSdeVeScheduler's sampling_eps)
RTOL = ATOL = 1e-5  # likelihood.py and the ODE sampler: RK45's tolerances
DEQUANTIZATION_BITS = 8  # 8-bit pixels, dequantized uniformly


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample [B] vector shaped to broadcast over ``x`` ([B, ...])."""
    return v.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


@dataclass(frozen=True)
class SDE:
    """A forward SDE dx = f(x, t) dt + g(t) dw on t in [0, T = 1], and how its model's output gives the score."""

    N: int  # the model's training timesteps (its network's time input), or the VE scheduler's noise levels
    prediction_type: str = "epsilon"  # what the network predicts (VP): epsilon, v_prediction or sample
    T = 1.0
    kind = ""

    # -- the SDE ----------------------------------------------------------------------------------------------------
    def beta(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        """g(t), [B]."""
        raise NotImplementedError

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f(x, t)."""
        raise NotImplementedError

    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean coefficient, std) of p_0t(x_t | x_0) = N(mean x_0, std^2 I), each [B]."""
        raise NotImplementedError

    @property
    def prior_std(self) -> float:
        raise NotImplementedError

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, prior_std^2 I) per sample, [B]."""
        d = z[0].numel()
        s = self.prior_std
        return -0.5 * d * math.log(2 * math.pi * s * s) - z.flatten(1).pow(2).sum(1) / (2 * s * s)

    # -- the network ----------------------------------------------------------------------------------------------
    def label(self, t: torch.Tensor) -> torch.Tensor:
        """The network's time input for continuous t."""
        raise NotImplementedError

    def score(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The score from the network's output at (x, t): a learned-variance output (2C channels) gives its first C."""
        raise NotImplementedError

    # -- derived ----------------------------------------------------------------------------------------------------
    def ode_drift(self, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """The probability-flow ODE's dx/dt (eq. 13)."""
        return self.drift(x, t) - 0.5 * _col(self.diffusion(t) ** 2, x) * score

    def reverse_drift(self, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """The reverse-time SDE's drift (eq. 6), dt negative."""
        return self.drift(x, t) - _col(self.diffusion(t) ** 2, x) * score

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError


def _first_channels(output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    if output.shape[1] == 2 * c:  # learned variances (Nichol and Dhariwal 2021): epsilon, then the interpolation v
        return output[:, :c]
    return output


@dataclass(frozen=True)
class VPSDE(SDE):
    """The variance-preserving SDE (eq. 11) with linear beta(t); DDPM's linear betas (Ho et al. 2020)."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    kind = "vp"

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def diffusion(self, t):
        return self.beta(t).sqrt()

    def drift(self, x, t):
        return -0.5 * _col(self.beta(t), x) * x

    def log_mean_coeff(self, t):
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def marginal(self, t):
        log_mean = self.log_mean_coeff(t)
        return log_mean.exp(), (-torch.expm1(2 * log_mean)).sqrt()

    @property
    def prior_std(self) -> float:
        return 1.0

    def label(self, t):
        return t * (self.N - 1)

    def score(self, output, x, t):
        out = _first_channels(output, x)
        alpha, sigma = (_col(v, x) for v in self.marginal(t))
        if self.prediction_type == "epsilon":
            eps = out
        elif self.prediction_type == "v_prediction":  # v = alpha eps - sigma x0 and x = alpha x0 + sigma eps
            eps = alpha * out + sigma * x
        else:  # "sample": x0
            eps = (x - alpha * out) / sigma
        return -eps / sigma

    def identity(self):
        return {"sde": "vp", "beta_min": self.beta_min, "beta_max": self.beta_max, "N": self.N,
                "time_input": "t (N - 1)", "prediction_type": self.prediction_type}


@dataclass(frozen=True)
class CosineVPSDE(VPSDE):
    """The VP SDE of Nichol and Dhariwal's cosine schedule (Improved DDPM, eq. 17) in continuous t."""

    s: float = 0.008
    max_beta: float = 0.999

    def _f_log(self, t):
        return 2 * torch.log(torch.cos((t + self.s) / (1 + self.s) * math.pi / 2))

    @property
    def beta_cap(self) -> float:
        return -self.N * math.log(1 - self.max_beta)

    @property
    def t_cap(self) -> float:
        """Where beta(t) reaches the cap."""
        return (2 / math.pi) * math.atan(self.beta_cap * (1 + self.s) / math.pi) * (1 + self.s) - self.s

    def beta(self, t):
        raw = math.pi / (1 + self.s) * torch.tan((t.clamp(max=self.t_cap) + self.s) / (1 + self.s) * math.pi / 2)
        return torch.where(t < self.t_cap, raw, torch.full_like(raw, self.beta_cap))

    def log_mean_coeff(self, t):
        tc = torch.full_like(t, self.t_cap)
        f0 = self._f_log(torch.zeros_like(t))
        log_abar = self._f_log(torch.minimum(t, tc)) - f0 - self.beta_cap * (t - tc).clamp(min=0)
        return 0.5 * log_abar

    def label(self, t):
        return t * self.N - 1

    def identity(self):
        return {"sde": "vp-cosine", "s": self.s, "max_beta": self.max_beta, "N": self.N, "time_input": "N t - 1",
                "prediction_type": self.prediction_type}


@dataclass(frozen=True)
class VESDE(SDE):
    """The variance-exploding SDE (eq. 9) of NCSN / NCSN++ (ScoreSdeVeScheduler's sigma_min, sigma_max)."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    kind = "ve"

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def beta(self, t):
        return self.diffusion(t) ** 2

    def diffusion(self, t):
        return self.sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))

    def drift(self, x, t):
        return torch.zeros_like(x)

    def marginal(self, t):
        return torch.ones_like(t), self.sigma(t)

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def label(self, t):
        return self.sigma(t)

    def score(self, output, x, t):
        return _first_channels(output, x)  # the Fourier-embedding UNet divides by sigma: its output is the score

    def identity(self):
        return {"sde": "ve", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "N": self.N,
                "time_input": "sigma(t)"}


SCORE_VE = "score-ve"  # DiffusionModel.kind of a ScoreSdeVePipeline folder


def sde_of(model: Any, owner: str = "") -> SDE:
    """The SDE of a loaded model (a ``bench.interfaces.DiffusionModel``): VP from a DDPMScheduler config with linear
    or squaredcos_cap_v2 betas, VE from a ScoreSdeVeScheduler config; BenchError (one line) for anything else."""
    config: Mapping[str, Any] = model.scheduler_config
    who = f"{owner}: " if owner else ""
    if model.kind == SCORE_VE:
        return VESDE(N=int(config.get("num_train_timesteps", 2000)), sigma_min=float(config["sigma_min"]),
                     sigma_max=float(config["sigma_max"]))
    if model.kind != "pixel-diffusion":
        raise BenchError(f"{who}the Score-SDE view needs a VP (DDPM) or VE (ScoreSdeVe) pixel model; {model.name!r} "
                         f"is {model.kind}")
    if config.get("trained_betas") is not None or config.get("rescale_betas_zero_snr"):
        raise BenchError(f"{who}{model.name!r} has trained or zero-terminal-SNR betas: no VP SDE of Song et al. 2021 "
                         f"describes them")
    n = int(config.get("num_train_timesteps", 1000))
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise BenchError(f"{who}{model.name!r} predicts {prediction!r}: not a VP model's output")
    schedule = config.get("beta_schedule", "linear")
    if schedule == "linear":
        return VPSDE(N=n, prediction_type=prediction, beta_min=float(config.get("beta_start", 1e-4)) * n,
                     beta_max=float(config.get("beta_end", 0.02)) * n)
    if schedule == "squaredcos_cap_v2":
        return CosineVPSDE(N=n, prediction_type=prediction)
    raise BenchError(f"{who}{model.name!r} has beta_schedule {schedule!r}: only linear (Score-SDE's VP) and "
                     f"squaredcos_cap_v2 (Improved DDPM's cosine) have a VP SDE here")


def data_range(model: Any) -> tuple[float, float]:
    """The interval the model's data lives in: [-1, 1] (DDPM's), or what its loader says (``extra["data_range"]``;
    NCSN++'s official VE models take [0, 1])."""
    lo, hi = model.extra.get("data_range", (-1.0, 1.0)) if hasattr(model, "extra") else (-1.0, 1.0)
    return float(lo), float(hi)


def network_score(sde: SDE, network: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """score(x, t) for continuous t [B] from ``network(x, label) -> output`` (a CountingDenoiser or a UNet's
    forward), the network run in its parameters' dtype."""

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return sde.score(network(x, sde.label(t)), x, t)

    return score


# -- RK45, one step size per sample ----------------------------------------------------------------------------------


@dataclass
class ODESolution:
    y: torch.Tensor  # [B, D] the state at t1 (float64)
    nfev: torch.Tensor  # [B] evaluations each sample needed (what solve_ivp alone would count)
    steps: torch.Tensor  # [B] accepted steps
    calls: int  # batched evaluations (calls of ``fun``)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(1).sqrt()


def solve_rk45(fun: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], y0: torch.Tensor, t0: float,
               t1: float, rtol: float = RTOL, atol: float = ATOL) -> ODESolution:
    """Integrate dy/dt = fun(t [R], y [R, D], rows [R]) from t0 to t1 with scipy's RK45 (Dormand-Prince 5(4)), each
    row with its own step size: row i follows ``solve_ivp(fun_i, (t0, t1), y0[i], method="RK45")`` step for step.

    ``fun`` gets the rows still integrating (``rows``: their indices in y0; float64 in, float64 out); the other
    rows of a batch never change a row's steps.
    """
    from scipy.integrate import RK45

    A = torch.as_tensor(RK45.A, dtype=torch.float64)
    B = torch.as_tensor(RK45.B, dtype=torch.float64)
    C = torch.as_tensor(RK45.C, dtype=torch.float64)
    E = torch.as_tensor(RK45.E, dtype=torch.float64)
    n_stages = RK45.n_stages
    order = RK45.error_estimator_order
    exponent = -1.0 / (order + 1)
    SAFETY, MIN_FACTOR, MAX_FACTOR = 0.9, 0.2, 10.0  # scipy.integrate._ivp.rk
    y = y0.to(torch.float64).clone()
    b = y.shape[0]
    direction = 1.0 if t1 >= t0 else -1.0
    t = torch.full((b,), float(t0), dtype=torch.float64)
    nfev = torch.zeros(b, dtype=torch.long)
    steps = torch.zeros(b, dtype=torch.long)
    calls = 0

    def f(rows: torch.Tensor, tt: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        nfev[rows] += 1
        return fun(tt, yy, rows).to(torch.float64)

    every = torch.arange(b)
    f0 = f(every, t, y)
    # scipy.integrate._ivp.common.select_initial_step, per row
    interval = abs(t1 - t0)
    scale = atol + y.abs() * rtol
    d0, d1 = _rms(y / scale), _rms(f0 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1).clamp(max=interval)
    f1 = f(every, t + h0 * direction, y + (h0 * direction)[:, None] * f0)
    d2 = _rms((f1 - f0) / scale) / h0
    h1 = torch.where((d1 <= 1e-15) & (d2 <= 1e-15), torch.clamp(h0 * 1e-3, min=1e-6),
                     (0.01 / torch.maximum(d1, d2)) ** (1.0 / (order + 1)))
    h_abs = torch.minimum(torch.minimum(100 * h0, h1), torch.full_like(h0, interval))
    fcur = f0
    retry = torch.zeros(b, dtype=torch.bool)  # the row's current step was rejected at least once
    active = t != t1
    while bool(active.any()):
        rows = active.nonzero().flatten()
        tr, yr, fr, ha = t[rows], y[rows], fcur[rows], h_abs[rows]
        min_step = 10 * (torch.nextafter(tr, torch.full_like(tr, direction * math.inf)) - tr).abs()
        if bool((retry[rows] & (ha < min_step)).any()):
            raise FloatingPointError("RK45: the step size fell below 10 ulp of t (too stiff for this tolerance)")
        ha = torch.where(retry[rows], ha, torch.maximum(ha, min_step))  # a new step starts at least at min_step
        t_new = tr + ha * direction
        t_new = torch.where(direction * (t_new - t1) > 0, torch.full_like(t_new, t1), t_new)
        h = t_new - tr
        ha = h.abs()
        K = [fr]
        for s in range(1, n_stages):
            dy = sum(K[j] * A[s, j] for j in range(s)) * h[:, None]
            K.append(f(rows, tr + C[s] * h, yr + dy))
        y_new = yr + h[:, None] * sum(K[j] * B[j] for j in range(n_stages))
        f_new = f(rows, t_new, y_new)
        K.append(f_new)
        err = h[:, None] * sum(K[j] * E[j] for j in range(n_stages + 1))
        scale = atol + torch.maximum(yr.abs(), y_new.abs()) * rtol
        error_norm = _rms(err / scale)
        accept = error_norm < 1
        power = SAFETY * error_norm ** exponent  # inf where the error is 0 (then MAX_FACTOR)
        grow = torch.where(error_norm == 0, torch.full_like(error_norm, MAX_FACTOR), power.clamp(max=MAX_FACTOR))
        grow = torch.where(retry[rows], grow.clamp(max=1.0), grow)
        h_abs[rows] = torch.where(accept, ha * grow, ha * power.clamp(min=MIN_FACTOR))
        ok = rows[accept]
        t[ok], y[ok], fcur[ok] = t_new[accept], y_new[accept], f_new[accept]
        steps[ok] += 1
        retry[ok] = False
        retry[rows[~accept]] = True
        active = direction * (t - t1) < 0
    return ODESolution(y, nfev, steps, calls)


# -- likelihood -------------------------------------------------------------------------------------------------------


def probes(shape: tuple[int, ...], generator: torch.Generator, kind: str = "rademacher") -> torch.Tensor:
    """Hutchinson probes: Rademacher (+-1) or Gaussian, drawn on the CPU."""
    if kind == "rademacher":
        return torch.randint(0, 2, shape, generator=generator).to(torch.float32) * 2 - 1
    if kind == "gaussian":
        return torch.randn(shape, generator=generator)
    raise ValueError(f"probe kind {kind!r} is not rademacher or gaussian")


def log_likelihood(sde: SDE, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, *,
                   eps: float = LIKELIHOOD_EPS, rtol: float = RTOL, atol: float = ATOL,
                   probe: torch.Tensor | None = None) -> tuple[torch.Tensor, ODESolution]:
    """log p(x) in nats per image [B] through the probability-flow ODE from ``eps`` to T (the data taken as x_eps).

    ``probe`` [B, *x.shape[1:]]: Hutchinson's estimator with that probe, fixed along the path; None: the exact trace
    (one vector-Jacobian product per dimension: for small tests). ``score`` runs in x's dtype (float32).
    """
    shape = x.shape
    d = x[0].numel()
    dtype = x.dtype

    def divergence_and_drift(t: torch.Tensor, xs: torch.Tensor, rows: torch.Tensor):
        with torch.enable_grad():
            xs = xs.detach().requires_grad_(True)
            drift = sde.ode_drift(xs, t.to(dtype), score(xs, t.to(dtype)))
            if probe is not None:
                v = probe[rows].to(xs.device, dtype)
                (g,) = torch.autograd.grad((drift * v).sum(), xs)
                div = (g * v).flatten(1).sum(1)
            else:
                div = torch.zeros(len(xs), dtype=torch.float64, device=xs.device)
                flat = drift.flatten(1)
                for k in range(d):
                    (g,) = torch.autograd.grad(flat[:, k].sum(), xs, retain_graph=k < d - 1)
                    div = div + g.flatten(1)[:, k].double()
        return drift.detach(), div.detach()

    def fun(t: torch.Tensor, state: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        xs = state[:, :d].to(x.device, dtype).reshape(len(state), *shape[1:])
        drift, div = divergence_and_drift(t.to(x.device), xs, rows)
        return torch.cat([drift.flatten(1).double().cpu(), div.double().cpu()[:, None]], 1)

    state0 = torch.cat([x.detach().flatten(1).double().cpu(), torch.zeros(len(x), 1, dtype=torch.float64)], 1)
    sol = solve_rk45(fun, state0, eps, sde.T, rtol, atol)
    z = sol.y[:, :d].reshape(len(x), *shape[1:])
    return sde.prior_logp(z) + sol.y[:, d], sol


def dequantize(images: torch.Tensor, noise: torch.Tensor, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    """8-bit images (uint8 [B, C, H, W]) to [lo, hi] with uniform dequantization: (u + noise) / 256, noise in [0, 1)."""
    return lo + (hi - lo) * (images.to(torch.float64) + noise.to(torch.float64)) / 2**DEQUANTIZATION_BITS


def bpd_offset(lo: float = -1.0, hi: float = 1.0) -> float:
    """Bits per dimension to add to a density on [lo, hi] for the 8-bit discrete data: 8 - log2(hi - lo) (7 for
    [-1, 1], likelihood.py's offset; 8 for [0, 1])."""
    return DEQUANTIZATION_BITS - math.log2(hi - lo)


def bits_per_dim(log_p: torch.Tensor, dims: int, offset: float = 0.0) -> torch.Tensor:
    """-log p / (D ln 2) + offset."""
    return -log_p / (dims * math.log(2)) + offset
