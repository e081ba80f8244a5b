"""Latency of the sampling phase: medians and spread over timed batches, warm-up batches left out.

Per image: a batch's wall time (device-synchronised) over its size. Per denoiser
call: the time inside each network evaluation (CUDA events on a GPU). The first
``warmup_batches`` batches of each process (a sharded run has several; a resumed
run starts a new one) are left out. Spread: interquartile range, min and max.
NFE: denoiser calls per batch, counted by the wrapper. Peak memory: CUDA's max
allocated on a GPU, the process's max resident set on a CPU; the protocol says
which. The denoiser's execution options (attention kernel, torch.compile,
channels-last) join the protocol when they differ from the eager defaults.
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence

import numpy as np

from bench.interfaces import Metric
from bench.outputs import Output
from bench.runtime import non_default


def timed_batches(n_batches: int, warmup: int) -> range:
    """The batches that count: all but the first ``warmup``, unless that would leave none."""
    return range(warmup, n_batches) if n_batches > warmup else range(n_batches)


def spread(values_ms: Sequence[float], prefix: str) -> dict[str, float]:
    """Median, quartiles, min and max of timings in milliseconds, named ``{prefix}``, ``{prefix}_p25``, ..."""
    if not len(values_ms):
        return {prefix: float("nan")}
    p25, p50, p75 = np.percentile(np.asarray(values_ms, dtype=np.float64), [25, 50, 75])
    return {prefix: float(p50), f"{prefix}_p25": float(p25), f"{prefix}_p75": float(p75),
            f"{prefix}_min": float(min(values_ms)), f"{prefix}_max": float(max(values_ms))}


class Latency(Metric):
    name = "latency"
    summary = "sampling latency per image and per denoiser call (medians), NFE, throughput"
    outputs = (
        Output("latency_per_image_ms", "ms / image", "lower", ".2f", "latency", None),
        Output("latency_per_image_ms_std", "ms / image (std over batches)", "none", ".2f", "latency", None),
        Output("latency_per_image_ms_*", "ms / image (spread)", "none", ".2f", "latency", None),
        Output("latency_per_call_ms", "ms / denoiser call", "lower", ".2f", "latency", None),
        Output("latency_per_call_ms_*", "ms / denoiser call (spread)", "none", ".2f", "latency", None),
        Output("throughput_images_per_s", "images / s", "higher", ".2f", "latency", None),
        Output("nfe", "NFE", "lower", "g", "nfe", 0.0),  # counted, whatever the protocol: nothing to match
        Output("timed_batches", "timed batches", "none", ".0f", "latency", None),
        Output("sampling_seconds", "sampling s", "lower", ".2f", "latency", None),
        Output("denoiser_seconds", "denoiser s", "lower", ".2f", "latency", None),
    )

    def protocol(self, spec, reference) -> dict[str, Any]:
        return {
            "batch_size": spec.batch_size,
            "warmup_batches": spec.warmup_batches,
            "statistic": "median over timed batches",
            "device": spec.device,
            "dtype": spec.dtype,
            **non_default({"attention": spec.attention, "compile": spec.compile, "channels_last": spec.channels_last}),
        }

    def compute(self, ctx) -> dict[str, float]:
        t = ctx.timings
        if t.batch_warmup:  # flagged per batch by the process that made it
            keep = [i for i, warm in enumerate(t.batch_warmup) if not warm] or list(range(len(t.batch_warmup)))
        else:
            keep = timed_batches(len(t.batch_seconds), ctx.spec.warmup_batches)
        per_image = [1000 * t.batch_seconds[i] / t.batch_sizes[i] for i in keep]
        per_call = [1000 * s for i in keep for s in t.call_seconds[i]]
        images = sum(t.batch_sizes[i] for i in keep)
        seconds = sum(t.batch_seconds[i] for i in keep)
        return {
            **spread(per_image, "latency_per_image_ms"),
            "latency_per_image_ms_std": statistics.stdev(per_image) if len(per_image) > 1 else 0.0,
            **spread(per_call, "latency_per_call_ms"),
            "throughput_images_per_s": images / seconds if seconds > 0 else float("nan"),
            "nfe": statistics.mean(t.batch_calls),
            "timed_batches": float(len(keep)),
            "sampling_seconds": sum(t.batch_seconds),
            "denoiser_seconds": sum(sum(c) for c in t.call_seconds),
        }


class Memory(Metric):
    name = "memory"
    summary = "peak memory of the run (CUDA max allocated, or the process's max RSS on a CPU)"
    outputs = (Output("peak_memory_mb", "peak MB", "lower", ".0f", "memory", None),)

    def protocol(self, spec, reference) -> dict[str, Any]:
        return {"source": "cuda max_memory_allocated" if spec.device.startswith("cuda") else "process max RSS (includes loading)"}

    def compute(self, ctx) -> dict[str, float]:
        return {"peak_memory_mb": ctx.timings.peak_memory_bytes / 2**20}
