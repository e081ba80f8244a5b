"""Image tensor conversions shared by the runner, the embedded world and the adapters."""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(images) -> np.ndarray:
    """[-1, 1] float [B, C, H, W] -> uint8 [B, H, W, C], rounding as diffusers' numpy_to_pil does."""
    x = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
    return (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
