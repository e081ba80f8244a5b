"""Latency of the sampling phase: medians over timed batches, warm-up batches left out.

Per image: a batch's wall time (device-synchronised) over its size. Per denoiser
call: the time inside each network evaluation (CUDA events on a GPU). NFE: denoiser
calls per batch, counted by the wrapper. Peak memory: CUDA's max allocated on a GPU,
the process's max resident set on a CPU; the protocol says which.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.interfaces import Metric


def timed_batches(n_batches: int, warmup: int) -> range:
    """The batches that count: all but the first ``warmup``, unless that would leave none."""
    return range(warmup, n_batches) if n_batches > warmup else range(n_batches)


class Latency(Metric):
    name = "latency"
    summary = "sampling latency per image and per denoiser call (medians), NFE, throughput"

    def protocol(self, spec, reference) -> dict[str, Any]:
        return {
            "batch_size": spec.batch_size,
            "warmup_batches": spec.warmup_batches,
            "statistic": "median over timed batches",
            "device": spec.device,
            "dtype": spec.dtype,
        }

    def compute(self, ctx) -> dict[str, float]:
        t = ctx.timings
        keep = timed_batches(len(t.batch_seconds), ctx.spec.warmup_batches)
        per_image = [t.batch_seconds[i] / t.batch_sizes[i] for i in keep]
        per_call = [s for i in keep for s in t.call_seconds[i]]
        images = sum(t.batch_sizes[i] for i in keep)
        seconds = sum(t.batch_seconds[i] for i in keep)
        return {
            "latency_per_image_ms": 1000 * statistics.median(per_image),
            "latency_per_image_ms_std": 1000 * (statistics.stdev(per_image) if len(per_image) > 1 else 0.0),
            "latency_per_call_ms": 1000 * statistics.median(per_call) if per_call else float("nan"),
            "throughput_images_per_s": images / seconds if seconds > 0 else float("nan"),
            "nfe": statistics.mean(t.batch_calls),
            "timed_batches": float(len(keep)),
            "sampling_seconds": sum(t.batch_seconds),
            "denoiser_seconds": sum(sum(c) for c in t.call_seconds),
        }


class Memory(Metric):
    name = "memory"
    summary = "peak memory of the run (CUDA max allocated, or the process's max RSS on a CPU)"

    def protocol(self, spec, reference) -> dict[str, Any]:
        return {"source": "cuda max_memory_allocated" if spec.device.startswith("cuda") else "process max RSS (includes loading)"}

    def compute(self, ctx) -> dict[str, float]:
        return {"peak_memory_mb": ctx.timings.peak_memory_bytes / 2**20}
