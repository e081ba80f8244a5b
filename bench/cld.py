"""Critically-damped Langevin diffusion (Dockhorn et al. 2022, CLD) and gDDIM's coefficients (Zhang et al. 2023).

CLD diffuses u = (x, v), data x and a velocity v of the same shape, with the SDE (Dockhorn et al., eq. 5)

    dx = M^-1 v beta dt,    dv = (-x - Gamma M^-1 v) beta dt + sqrt(2 Gamma beta) dW,

i.e. du = F u dt + G dW per dimension with the 2x2 matrices F = beta [[0, M^-1], [-1, -Gamma M^-1]] and
G G^T = [[0, 0], [0, 2 Gamma beta]]; critical damping Gamma^2 = 4M. The constants are the paper's CIFAR-10 ones
(M^-1 = 4, Gamma = 2 sqrt(M) = 1, constant beta = 4, T = 1) and v0 ~ N(0, gamma M) with gamma = 0.04; data and
velocity are independent per dimension, so every matrix here is 2x2 and acts on (x, v) channel by channel.

- ``psi(s, t)``: the transition matrix exp(F (t - s)) in closed form (critical damping makes it e^{-a b / 2} times a
  matrix polynomial in b = beta (t - s), a = Gamma M^-1 = 2 sqrt(M^-1)).
- ``mean`` / ``cov``: the perturbation kernel p(u_t | x0) of hybrid score matching (v0 marginalized), in closed form:
  mean psi(0, t) (x0, 0); covariance psi Sigma_0 psi^T + int_0^t psi G G^T psi^T (integrals of u^k e^{-a u}).
  ``Sigma_0`` = diag(eps, gamma M): gDDIM's official code adds eps = 1e-6 to the data's variance so that Sigma_t is
  invertible at t = 0.
- ``r_table``: gDDIM's K_t = R_t, the solution of dR/dt = F R + 1/2 G G^T R^{-T} with R_0 R_0^T = Sigma_0 (Zhang
  et al. 2023, eq. 15 and 17; qsh-zh/gDDIM ``sde_lib.CLD``), integrated once with RK4 on a fine grid (float64);
  R_t R_t^T = Sigma_t. The network predicts eps with u_t = mean + R_t eps (the score is -R_t^{-T} eps).
- ``gddim_coefficients``: the deterministic gDDIM step (exponential integrator, eps held constant over the step):
  u_s = psi(t, s) u_t + [int_t^s psi(tau, s) 1/2 G G^T R_tau^{-T} dtau] eps; with K = R the integral is exactly
  R_s - psi(t, s) R_t, so for a Dirac data distribution (eps constant along the probability-flow ODE) one step is
  exact. ``euler_coefficients`` / ``euler_maruyama_coefficients``: the baselines, Euler on the probability-flow ODE
  and Euler-Maruyama on the reverse SDE, written in the same (mean matrix, eps matrix) form.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

CONFIG_FILE = "cld.json"


@dataclass(frozen=True)
class CLD:
    """The SDE's constants (Dockhorn et al. 2022, Table 6 / gDDIM's ``sde_lib.CLD`` defaults)."""

    m_inv: float = 4.0  # M^-1: inverse mass
    beta: float = 4.0  # constant time rescaling beta(t) = beta (beta_1 = 0)
    gamma: float = 0.04  # initial velocity variance gamma M
    numerical_eps: float = 1e-6  # Sigma_0^xx: keeps Sigma_t invertible at t = 0 (gDDIM's numerical_eps)
    t_min: float = 1e-3  # sampling stops here (the paper's and gDDIM's sampling_eps)
    T: float = 1.0

    @property
    def mass(self) -> float:
        return 1.0 / self.m_inv

    @property
    def Gamma(self) -> float:
        return 2.0 / math.sqrt(self.m_inv)  # critical damping: Gamma^2 = 4 M

    @property
    def a(self) -> float:
        return self.Gamma * self.m_inv  # = 2 sqrt(M^-1): psi's decay rate per unit of beta t

    # -- the SDE ---------------------------------------------------------------------------------------------------------
    def F(self) -> np.ndarray:
        return self.beta * np.array([[0.0, self.m_inv], [-1.0, -self.Gamma * self.m_inv]])

    def GGT(self) -> np.ndarray:
        return np.array([[0.0, 0.0], [0.0, 2.0 * self.Gamma * self.beta]])

    def sigma0(self) -> np.ndarray:
        return np.diag([self.numerical_eps, self.gamma * self.mass])

    def psi(self, s: float, t: float) -> np.ndarray:
        """exp(F (t - s)), the transition from time s to time t (either direction), in closed form."""
        a, b = self.a, self.beta * (t - s)
        return math.exp(-a * b / 2) * np.array([[1 + a * b / 2, a * a * b / 4], [-b, 1 - a * b / 2]])

    def cov(self, t: float) -> np.ndarray:
        """Sigma_t of p(u_t | x0): psi Sigma_0 psi^T + 2 Gamma int_0^{beta t} e^{-a u} c(u) c(u)^T du in closed form,
        c(u) = (a^2 u / 4, 1 - a u / 2) the second column of psi without its exponential."""
        a, B = self.a, self.beta * t
        e = math.exp(-a * B)
        i0 = (1 - e) / a
        i1 = (1 - e * (1 + a * B)) / a ** 2
        i2 = (2 - e * (2 + 2 * a * B + (a * B) ** 2)) / a ** 3
        xx = a ** 4 / 16 * i2
        xv = a * a / 4 * (i1 - a / 2 * i2)
        vv = i0 - a * i1 + a * a / 4 * i2
        p = self.psi(0.0, t)
        return p @ self.sigma0() @ p.T + 2 * self.Gamma * np.array([[xx, xv], [xv, vv]])

    def prior_std(self) -> tuple[float, float]:
        """The stationary distribution's standard deviations of x and v: N(0, 1) and N(0, M)."""
        return 1.0, math.sqrt(self.mass)

    # -- gDDIM's K_t = R_t --------------------------------------------------------------------------------------------------
    def R(self, t: float | np.ndarray) -> np.ndarray:
        """R_t ([..., 2, 2]), linearly interpolated in the fine RK4 table of ``r_table``."""
        ts, rs = r_table(self)
        t = np.asarray(t, dtype=np.float64)
        flat = t.reshape(-1)
        out = np.stack([np.stack([np.interp(flat, ts, rs[:, i, j]) for j in range(2)], -1) for i in range(2)], -2)
        return out.reshape(*t.shape, 2, 2)

    # -- serialization ---------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"_class_name": "CLD", "paper": "Dockhorn et al. 2022, critically-damped Langevin diffusion",
                **asdict(self)}

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "CLD":
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k != "paper" and k not in names)
        if unknown:
            raise ValueError(f"unknown CLD constants {', '.join(unknown)}")
        cld = cls(**{k: float(v) for k, v in config.items() if k in names})
        if not (cld.m_inv > 0 and cld.beta > 0 and cld.gamma > 0 and cld.numerical_eps > 0 and 0 < cld.t_min < cld.T):
            raise ValueError(f"CLD constants out of range: {asdict(cld)}")
        return cld

    def save(self, folder: Path) -> Path:
        path = Path(folder) / CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


R_GRID = (0.01, 2000, 10000)  # [0, 0.01] in 2000 RK4 steps (stiff near 0), then [0.01, T] in 10000


@functools.lru_cache(maxsize=8)
def r_table(cld: CLD) -> tuple[np.ndarray, np.ndarray]:
    """(times, R_t) on a fine grid of [0, T]: RK4 on dR/dt = (F + 1/2 G G^T Sigma_t^-1) R (= F R + 1/2 G G^T R^{-T}
    since R R^T = Sigma), R_0 = Sigma_0^{1/2} (diagonal), in float64."""
    knee, n_fine, n_coarse = R_GRID
    ts = np.concatenate([np.linspace(0.0, knee, n_fine + 1), np.linspace(knee, cld.T, n_coarse + 1)[1:]])
    F, GGT = cld.F(), cld.GGT()

    def drift(t: float, r: np.ndarray) -> np.ndarray:
        return (F + 0.5 * GGT @ np.linalg.inv(cld.cov(t))) @ r

    rs = np.empty((len(ts), 2, 2))
    r = np.sqrt(cld.sigma0())
    rs[0] = r
    for k in range(len(ts) - 1):
        t, h = ts[k], ts[k + 1] - ts[k]
        k1 = drift(t, r)
        k2 = drift(t + h / 2, r + h / 2 * k1)
        k3 = drift(t + h / 2, r + h / 2 * k2)
        k4 = drift(t + h, r + h * k3)
        r = r + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        rs[k + 1] = r
    return ts, rs


# -- time grids and step coefficients ---------------------------------------------------------------------------------------
TIME_GRIDS = ("quadratic", "uniform")


def time_grid(cld: CLD, steps: int, kind: str = "quadratic") -> np.ndarray:
    """``steps + 1`` times from T down to t_min: uniform in sqrt(t) ("quadratic", DEIS and gDDIM's) or in t."""
    if kind == "quadratic":
        return np.linspace(math.sqrt(cld.T), math.sqrt(cld.t_min), steps + 1) ** 2
    if kind == "uniform":
        return np.linspace(cld.T, cld.t_min, steps + 1)
    raise ValueError(f"time grid {kind!r} is not one of {', '.join(TIME_GRIDS)}")


def gddim_coefficients(cld: CLD, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic gDDIM (Zhang et al. 2023, eq. 17 with K = R): per step t -> s, (psi(t, s), R_s - psi(t, s) R_t)."""
    rs = cld.R(ts)
    psis = np.stack([cld.psi(t, s) for t, s in zip(ts[:-1], ts[1:])])
    return psis, rs[1:] - psis @ rs[:-1]


def euler_coefficients(cld: CLD, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Euler on the probability-flow ODE du/dt = F u + 1/2 G G^T R^{-T} eps: (I + F dt, 1/2 G G^T R_t^{-T} dt)."""
    return _euler(cld, ts, 0.5)


def euler_maruyama_coefficients(cld: CLD, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Euler-Maruyama's drift on the reverse SDE du = (F u + G G^T R^{-T} eps) dt + G dW: (I + F dt, G G^T R_t^{-T}
    dt); its noise is ``noise_scales``."""
    return _euler(cld, ts, 1.0)


def _euler(cld: CLD, ts: np.ndarray, weight: float) -> tuple[np.ndarray, np.ndarray]:
    dts = ts[1:] - ts[:-1]  # negative: the sampler runs backwards in time
    r_inv_t = np.linalg.inv(cld.R(ts[:-1])).transpose(0, 2, 1)
    mean = np.eye(2)[None] + cld.F()[None] * dts[:, None, None]
    return mean, weight * cld.GGT()[None] @ r_inv_t * dts[:, None, None]


def noise_scales(cld: CLD, ts: np.ndarray) -> np.ndarray:
    """Euler-Maruyama's noise on v per step: sqrt(2 Gamma beta |dt|) (none on x: G acts on v only)."""
    return np.sqrt(2 * cld.Gamma * cld.beta * np.abs(ts[1:] - ts[:-1]))


# -- acting on (x, v) channel stacks ----------------------------------------------------------------------------------------
def apply(matrix: np.ndarray, u: torch.Tensor) -> torch.Tensor:
    """A 2x2 ``matrix`` on u = [x; v] stacked along channels ([B, 2C, H, W]): [m00 x + m01 v; m10 x + m11 v]."""
    x, v = u.chunk(2, dim=1)
    m = [[float(matrix[i, j]) for j in range(2)] for i in range(2)]
    return torch.cat([m[0][0] * x + m[0][1] * v, m[1][0] * x + m[1][1] * v], dim=1)


def data_mean(cld: CLD, x0: torch.Tensor, t: float) -> torch.Tensor:
    """The kernel's mean psi(0, t) (x0, 0) as [x; v] channels."""
    return apply(cld.psi(0.0, t), torch.cat([x0, torch.zeros_like(x0)], dim=1))


def solve(eps_fn: Callable[[torch.Tensor, float, int], torch.Tensor], u: torch.Tensor, ts: np.ndarray,
          coefficients: tuple[np.ndarray, np.ndarray], noise: Callable[[int], torch.Tensor] | None = None,
          scales: np.ndarray | None = None) -> torch.Tensor:
    """u_{k+1} = A_k u_k + E_k eps(u_k, t_k) (+ scales_k noise(k) on v, not after the last step): the one loop of
    gDDIM and both baselines."""
    mean, eps_matrix = coefficients
    for k in range(len(ts) - 1):
        eps = eps_fn(u, float(ts[k]), k)
        u = apply(mean[k], u) + apply(eps_matrix[k], eps)
        if noise is not None and scales is not None and k < len(ts) - 2:
            x, v = u.chunk(2, dim=1)
            u = torch.cat([x, v + float(scales[k]) * noise(k)], dim=1)
    return u


def dirac_eps(cld: CLD, x0: torch.Tensor) -> Callable[[torch.Tensor, float, int], torch.Tensor]:
    """The exact eps of a Dirac data distribution at ``x0``: R_t^{-1} (u - mean_t), for tests and checks."""
    def eps(u: torch.Tensor, t: float, k: int) -> torch.Tensor:
        return apply(np.linalg.inv(cld.R(t)), u - data_mean(cld, x0, t).to(u))

    return eps
