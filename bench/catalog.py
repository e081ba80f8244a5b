"""The built-in registry entries. Listing them imports nothing heavy."""

from __future__ import annotations

from bench.interfaces import Method, Metric, ReferenceSet
from bench.registry import Registry

METHODS: Registry[type[Method]] = Registry("method", "diffbench.methods", base=Method)
METRICS: Registry[type[Metric]] = Registry("metric", "diffbench.metrics", base=Metric)
DATASETS: Registry[type[ReferenceSet]] = Registry("dataset", "diffbench.datasets", base=ReferenceSet)
MODELS: Registry = Registry("model", "diffbench.models")

# -- methods: one paper each ------------------------------------------------------------------
METHODS.register(
    "ddpm", "methods.ddpm:DDPM",
    "DDPM ancestral sampler (Algorithm 2), with a choice of variance",
    "Ho et al. 2020, Denoising Diffusion Probabilistic Models",
)
METHODS.register(
    "ddim", "methods.ddim:DDIM",
    "DDIM sampler (eta interpolates deterministic DDIM and DDPM-like noise)",
    "Song et al. 2021, Denoising Diffusion Implicit Models",
)

# -- metrics -----------------------------------------------------------------------------------
METRICS.register("fid", "metrics.fidelity:FID", "Frechet distance between feature Gaussians (Heusel et al. 2017), via torch-fidelity")
METRICS.register("kid", "metrics.fidelity:KID", "Kernel distance, unbiased at small N (Binkowski et al. 2018), mean and std over subsets")
METRICS.register("latency", "metrics.latency:Latency", "sampling latency per image and per denoiser call (medians), NFE, throughput")
METRICS.register("memory", "metrics.latency:Memory", "peak memory of the run (CUDA max allocated, or the process's max RSS on a CPU)")

# -- data sets (reference sets of the metrics) -------------------------------------------------
DATASETS.register("shapes16", "bench.datasets:Shapes16", "embedded shapes world, 16x16, one object; 10k rendered reference images")
DATASETS.register("cifar10", "bench.datasets:Cifar10Train", "CIFAR-10 train (50k, 32x32) via torch-fidelity; Inception-v3 features; needs the download")

# -- models ------------------------------------------------------------------------------------
MODELS.register(
    "embedded-ddpm", "bench.models:embedded_pixel_ddpm",
    "pixel DDPM of the shapes world (16x16, UNet2DModel 1.1M params, committed safetensors)",
)
MODELS.register(
    "google/ddpm-cifar10-32", "bench.models:ddpm_cifar10",
    "Ho et al.'s CIFAR-10 DDPM (35.7M params); needs the download",
)
