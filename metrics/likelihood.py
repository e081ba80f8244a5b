"""Negative log-likelihood in bits per dimension through the probability-flow ODE (Song et al. 2021, section 4.3 and
appendix D.2): the model's exact likelihood of held-out real images, the reference set's, dequantized.

Not a metric of the samples: it reads the run's model (``needs_model``) and the reference images. Images drawn by a
fixed seed from the reference set (a held-out render seed for the embedded world: the pixel DDPM trains on seed 1,
shapes16 is seed 2), each with its own dequantization noise and Hutchinson probe from (seed, index), integrated with
a step size of its own (bench.sde.solve_rk45): an image's value does not depend on the batch it is solved in.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from bench.denoiser import sample_seed
from bench.errors import BenchError
from bench.interfaces import Metric
from bench.outputs import Output
from bench.sde import (ATOL, LIKELIHOOD_EPS, RTOL, bits_per_dim, bpd_offset, data_range, dequantize, log_likelihood,
                       network_score, probes, sde_of)

IMAGES = 128  # reference images whose likelihood is averaged
SEED = 0  # which images, their dequantization noise and probes
BATCH = 64  # images integrated together (each with its own steps)
PROBE = "rademacher"
NAME = "nll-bpd"


def image_noise(index: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image ``index``'s dequantization noise U[0, 1) and Hutchinson probe, from its own generator."""
    g = torch.Generator().manual_seed(sample_seed(SEED, index))
    return torch.rand(shape, generator=g, dtype=torch.float64), probes(shape, g, PROBE)


def chosen(n_reference: int, n: int = IMAGES) -> list[int]:
    g = torch.Generator().manual_seed(SEED)
    return torch.randperm(n_reference, generator=g)[:n].tolist()


def nll_bpd(model: Any, images: torch.Tensor, indices: list[int], batch: int = BATCH, rtol: float = RTOL,
            atol: float = ATOL, eps: float = LIKELIHOOD_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Bits per dimension of uint8 ``images`` [N, C, H, W] under ``model`` (a DiffusionModel), image i dequantized and
    probed with ``image_noise(indices[i])``; returns (bpd [N], ODE evaluations [N])."""
    sde = sde_of(model, owner=f"metric {NAME}")
    lo, hi = data_range(model)
    param = next(model.unet.parameters())
    unet = model.unet

    def network(x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return unet(x.to(param.dtype), label.to(param.device, torch.float32)).sample.to(x.dtype)

    score = network_score(sde, network)
    shape = tuple(images.shape[1:])
    dims = math.prod(shape)
    values, nfe = [], []
    for a in range(0, len(images), batch):
        noise, probe = zip(*(image_noise(i, shape) for i in indices[a:a + batch]))
        x = dequantize(images[a:a + batch], torch.stack(noise), lo, hi).to(param.device, torch.float32)
        log_p, sol = log_likelihood(sde, score, x, eps=eps, rtol=rtol, atol=atol, probe=torch.stack(probe))
        values.append(bits_per_dim(log_p, dims, bpd_offset(lo, hi)))
        nfe.append(sol.nfev.double())
    return torch.cat(values), torch.cat(nfe)


class NLLBitsPerDim(Metric):
    name = NAME
    summary = "NLL in bits/dim of held-out reference images through the probability-flow ODE (Song et al. 2021)"
    needs_model = True
    outputs = (
        Output("nll_bpd", "NLL (bits/dim, probability-flow ODE)", "lower", ".3f", NAME, 0.02),
        Output("nll_bpd_sem", "NLL standard error over images (bits/dim)", "none", ".3f", NAME, None),
        Output("nll_nfe", "NLL ODE evaluations / image", "none", ".0f", NAME, None),
    )

    def check(self, spec, reference) -> None:
        if not reference.has_images:
            raise BenchError(f"metric {NAME} needs reference images; data set {reference.name} has none")
        if spec.dtype != "float32":
            raise BenchError(f"metric {NAME} integrates the probability-flow ODE at rtol {RTOL}: it needs --dtype "
                             f"float32, not {spec.dtype}")

    def check_model(self, model) -> None:
        sde_of(model, owner=f"metric {NAME}")

    def protocol(self, spec, reference) -> dict[str, Any]:
        return {
            "ode": "probability flow (Song et al. 2021, eq. 13) from eps to T = 1; the SDE from the model's schedule "
                   "(bench.sde: VP linear or cosine, VE)",
            "solver": "RK45 (scipy's Dormand-Prince 5(4) tableau and step rule), one step size per image",
            "rtol": RTOL, "atol": ATOL, "eps": LIKELIHOOD_EPS,
            "estimator": f"Hutchinson-Skilling, one {PROBE} probe per image fixed along the path",
            "images": IMAGES, "seed": SEED, "batch": BATCH,
            "selection": "images drawn without replacement from the reference set by the seed",
            "dequantization": "uniform: (u + U[0, 1)) / 256, scaled to the model's data range; bpd + 8 - log2(range)",
            "reference": reference.identity(),
        }

    def compute(self, ctx) -> dict[str, float]:
        reference = ctx.reference_images()
        if len(reference) < IMAGES:
            raise BenchError(f"metric {NAME} needs {IMAGES} reference images; {ctx.reference.name} has {len(reference)}")
        indices = chosen(len(reference), IMAGES)
        bpd, nfe = nll_bpd(ctx.model, reference[indices], indices, BATCH, RTOL, ATOL, LIKELIHOOD_EPS)
        return {"nll_bpd": float(bpd.mean()), "nll_bpd_sem": float(bpd.std() / math.sqrt(len(bpd))),
                "nll_nfe": float(nfe.mean())}
