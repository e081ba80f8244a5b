"""Shared pieces for methods that fine-tune a latent text-to-image model (personalization, alignment).

Every method that trains in ``Method.prepare`` needs the same few things; they live here so
that each adapter holds only its paper's part:

- ``training_scheduler(model)``: the DDPM noise schedule the model was trained with (its own
  scheduler config: same betas, same prediction type).
- ``encode_prompts(model, prompts, grad=False)``: CLIP text hidden states, tokenized as
  ``bench.embedded.t2i`` trained them (padding to the tokenizer's 77 tokens).
- ``encode_images(model, images_uint8)``: the frozen VAE's posterior (mean, std) of uint8
  images; ``sample_latents`` draws scaled latents from it (as the embedded model was trained).
- ``prediction_target(scheduler, latents, noise, t)``: the regression target of the model's
  ``prediction_type`` (noise, velocity or clean latents); ``diffusion_loss`` and Diffusion-DPO use it.
- ``diffusion_loss(unet, scheduler, latents, hidden, generator)``: the noise-prediction loss of
  Ho et al. 2020 (eq. 14, "L_simple"), with the target of the model's ``prediction_type``
  (epsilon, v or sample); ``reduction="none"`` gives one loss per sample (for weighted losses:
  DreamBooth's prior term, reward weighting). The random draws are noise first, then timesteps,
  as in ``bench.recipes.t2i.train_unet`` (which uses it).
- ``trainable_parameters(params)``: the parameter count a method trains (a leaderboard column).
- ``BudgetMeter``: wall time, peak memory and device of a training phase; ``Budget.metrics()``
  gives the ``train_*`` metrics ``Method.prepare`` returns (``train_steps``, ``train_params``,
  ``train_seconds``, ``train_peak_memory_bytes``, ``train_saved_bytes``).

Everything draws from explicit ``torch.Generator`` objects, so a training run with the same seed
gives the same weights on a CPU.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from bench.embedded.tokenizer import tokenize


def training_scheduler(model: Any):
    """A ``DDPMScheduler`` with the model's training schedule (the scheduler config it ships with)."""
    config = {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}
    return DDPMScheduler.from_config(config)


def encode_prompts(model: Any, prompts: Sequence[str], grad: bool = False) -> torch.Tensor:
    """Text-encoder hidden states [B, 77, D] of ``prompts``; ``grad=True`` keeps the graph (textual inversion)."""
    device = next(model.text_encoder.parameters()).device
    ids = tokenize(model.tokenizer, list(prompts)).to(device)
    with torch.set_grad_enabled(grad):
        return model.text_encoder(ids)[0]


@torch.no_grad()
def encode_images(model: Any, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, std) of uint8 images [N, 3, H, W] (unscaled latents)."""
    param = next(model.vae.parameters())
    x = (images_uint8.float() / 127.5 - 1.0).to(param.device, param.dtype)
    dist = model.vae.encode(x).latent_dist
    return dist.mean, dist.std


def sample_latents(model: Any, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scaled latents drawn from the posterior, as the UNet was trained on them."""
    eps = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
    return (mean + std * eps) * model.vae.config.scaling_factor


def prediction_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict at ``add_noise(latents, noise, t)``, by the scheduler's ``prediction_type``:
    the noise (``epsilon``), the velocity alpha_t eps - sigma_t x_0 (``v_prediction``, Salimans & Ho 2022) or the clean
    latents (``sample``); any other type raises ``ValueError``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    if kind == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {kind!r} (epsilon, v_prediction or sample)")


def diffusion_loss(unet: Any, scheduler: Any, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   generator: torch.Generator, reduction: str = "mean", mask: torch.Tensor | None = None,
                   added_cond_kwargs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Noise-prediction MSE at uniformly drawn timesteps (Ho et al. 2020, L_simple); noise, then t, from ``generator``.

    ``mask`` (broadcastable to the latents, e.g. [B, 1, h, w] in [0, 1]): the masked reconstruction loss, each
    sample's squared error averaged over its mask's region only (MagiCapture). ``added_cond_kwargs``: the UNet's
    extra conditioning where it takes one (SDXL: ``text_embeds`` and ``time_ids``)."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    t = t.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    extra = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}
    prediction = unet(noisy, t, encoder_hidden_states=encoder_hidden_states, **extra).sample
    target = prediction_target(scheduler, latents, noise, t)
    if mask is not None:
        error = F.mse_loss(prediction.float(), target.float(), reduction="none")
        weight = mask.to(error).expand_as(error).flatten(1)
        per_sample = (weight * error.flatten(1)).sum(1) / weight.sum(1).clamp_min(1e-8)
        return per_sample if reduction == "none" else per_sample.mean()
    if reduction == "none":
        return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=tuple(range(1, latents.ndim)))
    return F.mse_loss(prediction.float(), target.float(), reduction=reduction)


def trainable_parameters(params: Iterable[torch.nn.Parameter]) -> int:
    """How many numbers a method trains (each parameter counted once)."""
    seen: dict[int, int] = {}
    for p in params:
        if p.requires_grad:
            seen[id(p)] = p.numel()
    return sum(seen.values())


def saved_bytes(paths: Iterable[Path]) -> int:
    """Total size of saved files (folders: every file inside)."""
    total = 0
    for path in map(Path, paths):
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        total += sum(f.stat().st_size for f in files)
    return total


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Budget:
    """What a training phase cost: the leaderboard's budget columns."""

    steps: int = 0
    params: int = 0
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    memory_source: str = ""
    device: str = "cpu"
    saved_bytes: int = 0

    def metrics(self, prefix: str = "train_") -> dict[str, float]:
        return {f"{prefix}steps": float(self.steps), f"{prefix}params": float(self.params),
                f"{prefix}seconds": float(self.seconds), f"{prefix}peak_memory_bytes": float(self.peak_memory_bytes),
                f"{prefix}saved_bytes": float(self.saved_bytes)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def add(self, other: "Budget") -> "Budget":
        """Two phases run one after the other: steps, time and saved bytes add up, peak memory is the larger.

        ``params`` is per phase (what one adapter trains), so it is the larger too, not a sum.
        """
        return Budget(self.steps + other.steps, max(self.params, other.params), self.seconds + other.seconds,
                      max(self.peak_memory_bytes, other.peak_memory_bytes), other.memory_source or self.memory_source,
                      other.device, self.saved_bytes + other.saved_bytes)


class BudgetMeter:
    """Measures a training phase: ``with BudgetMeter(device) as meter: ...; budget = meter.budget(steps, params)``.

    Peak memory: CUDA's ``max_memory_allocated`` (reset on entry) on a GPU; on a CPU the peak resident set size
    of the process during the phase, polled every 20 ms from /proc/self/statm (falls back to the process's
    max RSS where /proc is absent). The process's own baseline (torch, the loaded model) is included.
    """

    def __init__(self, device: torch.device | str = "cpu", poll_seconds: float = 0.02):
        self.device = torch.device(device)
        self.poll_seconds = poll_seconds
        self.seconds = 0.0
        self.peak = 0
        self.source = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.is_set():
            rss = _rss_bytes()
            if rss is not None:
                self.peak = max(self.peak, rss)
            self._stop.wait(self.poll_seconds)

    def __enter__(self) -> "BudgetMeter":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif _rss_bytes() is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self._t0
        if self.device.type == "cuda":
            self.peak, self.source = torch.cuda.max_memory_allocated(self.device), "cuda max_memory_allocated"
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes() or 0)
            self.source = "process peak RSS during training (polled /proc/self/statm)"
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.source = "process max RSS"

    def budget(self, steps: int, params: int, saved: int = 0) -> Budget:
        return Budget(steps, params, self.seconds, self.peak, self.source, str(self.device), saved)
