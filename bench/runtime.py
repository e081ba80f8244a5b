"""Execution options of the denoiser that change its speed (and may change its last bits): recorded and hashed.

- attention: ``sdpa`` leaves diffusers' default processors (``AttnProcessor2_0``: torch's scaled_dot_product_attention,
  torch picking the kernel); ``sdpa-math`` / ``sdpa-flash`` / ``sdpa-efficient`` / ``sdpa-cudnn`` pin SDPA to one
  kernel (``torch.nn.attention.sdpa_kernel``); ``classic`` sets diffusers' ``AttnProcessor`` (explicit
  baddbmm-softmax-bmm).
- compile: ``torch.compile`` of the denoiser (``nn.Module.compile``, default mode, inductor).
- channels_last: the denoiser's weights in channels-last memory format.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from bench.errors import BenchError

ATTENTION = ("sdpa", "sdpa-math", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "classic")
SDPA_KERNELS = {"sdpa-math": "MATH", "sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                "sdpa-cudnn": "CUDNN_ATTENTION"}
DEFAULTS = {"attention": "sdpa", "compile": False, "channels_last": False}


def attention_context(attention: str):
    """The context every denoiser call of a run runs in: an SDPA kernel pinned, or nothing."""
    if attention not in SDPA_KERNELS:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel  # lazy: bench.cli imports this module at startup

    return sdpa_kernel(getattr(SDPBackend, SDPA_KERNELS[attention]))


def check_attention(attention: str, device, dtype) -> None:
    """One line before any work if the pinned SDPA kernel cannot run on this device and dtype."""
    if attention not in SDPA_KERNELS:
        return
    import torch  # lazy: bench.cli imports this module at startup
    import torch.nn.functional as F

    q = torch.zeros(1, 2, 8, 64, device=device, dtype=dtype)
    try:
        with attention_context(attention):
            F.scaled_dot_product_attention(q, q, q)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise BenchError(f"--attention {attention} cannot run on {device} in {dtype}: {first}") from None


def configure(module: Any, attention: str, compile: bool, channels_last: bool) -> dict[str, Any]:
    """Apply the options to a diffusers model in place; returns what ran (recorded in the run's protocol)."""
    import torch  # lazy: bench.cli imports this module at startup

    from diffusers.models.attention_processor import Attention, AttnProcessor

    layers = [m for m in module.modules() if isinstance(m, Attention)]
    if attention == "classic":
        for layer in layers:
            layer.set_processor(AttnProcessor())
    processors = sorted({type(layer.processor).__name__ for layer in layers})
    if channels_last:
        module.to(memory_format=torch.channels_last)
    if compile:
        module.compile()
    return {"attention": attention, "attention_processors": processors, "compile": compile,
            "channels_last": channels_last}


def non_default(options: dict[str, Any]) -> dict[str, Any]:
    """The options that differ from eager SDPA defaults (added to the latency protocol only then, so that the
    metric-protocol hashes of runs made before these options existed stay valid)."""
    return {k: v for k, v in options.items() if k in DEFAULTS and v != DEFAULTS[k]}
