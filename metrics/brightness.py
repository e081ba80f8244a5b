"""Image brightness extremes: the measurable form of the zero-terminal-SNR claim.

Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed")
show that a model trained with non-zero terminal SNR cannot make very dark or
very bright images. Per image, the mean intensity (0-255 over all pixels and
channels); over the run, its 1st and 99th percentiles and the same for the
reference set, so a model that cannot reach the black backgrounds of the shapes
world shows a 1st percentile far above the reference's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.interfaces import Metric
from bench.outputs import Output


def per_image_brightness(images_uint8) -> np.ndarray:
    x = np.asarray(images_uint8, dtype=np.float64)
    return x.reshape(len(x), -1).mean(axis=1)


class Brightness(Metric):
    name = "brightness"
    summary = "per-image mean intensity: 1st/99th percentiles and mean, against the reference set's"
    outputs = (
        Output("brightness_mean", "mean brightness (0-255)", "none", ".1f", "brightness", None),
        Output("brightness_p01", "brightness p1", "none", ".1f", "brightness", None),
        Output("brightness_p99", "brightness p99", "none", ".1f", "brightness", None),
        Output("reference_brightness_p01", "reference brightness p1", "none", ".1f", "brightness", None),
        Output("reference_brightness_p99", "reference brightness p99", "none", ".1f", "brightness", None),
    )

    def protocol(self, spec, reference) -> dict[str, Any]:
        return {"statistic": "per-image mean of all pixels and channels, 0-255; percentiles 1 and 99",
                "reference": reference.identity()}

    def compute(self, ctx) -> dict[str, float]:
        gen = per_image_brightness(ctx.samples.numpy())
        ref = per_image_brightness(ctx.reference_images().numpy())
        return {
            "brightness_mean": float(gen.mean()),
            "brightness_p01": float(np.percentile(gen, 1)),
            "brightness_p99": float(np.percentile(gen, 99)),
            "reference_brightness_p01": float(np.percentile(ref, 1)),
            "reference_brightness_p99": float(np.percentile(ref, 99)),
        }
