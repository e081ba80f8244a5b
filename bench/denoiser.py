"""The denoiser wrapper every method calls: it counts real network evaluations and times them.

NFE is counted here, never assumed from ``--steps`` (multistep, Heun and
ancestral samplers differ). Time inside the denoiser is what the harness-overhead
figure compares the sampling phase against.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from typing import Any

import torch


def sample_seed(run_seed: int, index: int) -> int:
    """The seed of sample ``index`` in a run: independent of batch size, shard and process count."""
    digest = hashlib.sha256(f"diffbench:{run_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timestep_is_keyword(model: Any) -> bool:
    """Whether ``model`` takes the timestep by keyword only in practice: the diffusion transformers (SD3's, FLUX's
    ``forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, ...)``) put the text second, where
    the UNets put the timestep."""
    module = getattr(model, "_orig_mod", model)  # a torch.compile'd module: its original's signature
    try:
        params = list(inspect.signature(getattr(module, "forward", module)).parameters)
    except (TypeError, ValueError):
        return False
    return "timestep" in params and params.index("timestep") != 1


class CountingDenoiser:
    """``denoiser(x, t, **kwargs) -> prediction``; counts calls and per-sample evaluations.

    On CUDA each call is timed with CUDA events (no host synchronisation per call);
    elsewhere with ``time.perf_counter`` around the call.
    """

    def __init__(self, model: Any, device: torch.device):
        self.model = model
        self.device = device
        self.calls = 0
        self.evaluations = 0
        self._cpu_seconds: list[float] = []
        self._events: list[tuple[Any, Any]] = []
        self._timestep_keyword = timestep_is_keyword(model)

    def _forward(self, sample: torch.Tensor, timestep: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        if self._timestep_keyword:
            return self.model(sample, timestep=timestep, **kwargs).sample
        return self.model(sample, timestep, **kwargs).sample

    def __call__(self, sample: torch.Tensor, timestep: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        self.evaluations += sample.shape[0]
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self._forward(sample, timestep, kwargs)
            end.record()
            self._events.append((start, end))
            return out
        start = time.perf_counter()
        out = self._forward(sample, timestep, kwargs)
        self._cpu_seconds.append(time.perf_counter() - start)
        return out

    def call_seconds(self) -> list[float]:
        """Seconds of each call so far (synchronises the device once on CUDA)."""
        if self._events:
            synchronize(self.device)
            self._cpu_seconds.extend(s.elapsed_time(e) / 1000.0 for s, e in self._events)
            self._events.clear()
        return list(self._cpu_seconds)

    def reset(self) -> None:
        self.calls = self.evaluations = 0
        self._cpu_seconds.clear()
        self._events.clear()
