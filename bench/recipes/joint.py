"""What the embedded text-to-image recipes share (t2i, sdxl, flow, flow-reflow): the frozen VAE's posterior of a
pool, the tokenizer, the joint optimizer of a denoiser and its text encoders, and one training loop (gradient
clipping, warm-up and cosine learning rate, EMA, a progress bar).

The loop draws nothing itself: each recipe's ``step_loss`` makes its batch from its own generator, so a recipe
gives the same weights whichever helper runs it.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from bench.embedded.tokenizer import load as load_tokenizer
from bench.embedded.tokenizer import write_tokenizer_files

CHUNK = 500  # images the VAE encodes at a time


def lr_lambda(warmup: int, steps: int) -> Callable[[int], float]:
    """Linear warm-up, then a cosine decay to a tenth of the learning rate."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    return f


def images(pool: np.ndarray, idx) -> torch.Tensor:
    """uint8 [N, H, W, 3] rows ``idx`` as float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(pool[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def posterior(vae, pool: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen VAE's posterior (mean, std) of every pool image, once: a batch then samples its latents."""
    dists = [vae.encode(images(pool, np.arange(a, min(a + CHUNK, len(pool))))).latent_dist
             for a in range(0, len(pool), CHUNK)]
    return torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])


def build_tokenizer(out_dir: Path):
    """The CLIP tokenizer the embedded models use (converted into a scratch folder that is removed again)."""
    tok_dir = Path(out_dir) / ".tokenizer-build"
    tokenizer = load_tokenizer(write_tokenizer_files(tok_dir))
    shutil.rmtree(tok_dir)
    return tokenizer


def joint_optimizer(denoiser, encoders: Sequence[Any], recipe) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the denoiser (``recipe.lr``) and the text encoders (``recipe.text_lr``; no weight decay on the token
    embeddings: rows of tokens never seen must stay untouched), with ``lr_lambda``'s schedule."""
    body = [p for m in encoders for n, p in m.named_parameters() if "token_embedding" not in n]
    embeddings = [p for m in encoders for p in m.get_input_embeddings().parameters()]
    opt = torch.optim.AdamW([{"params": denoiser.parameters(), "lr": recipe.lr, "weight_decay": 1e-2},
                             {"params": body, "lr": recipe.text_lr, "weight_decay": 1e-2},
                             {"params": embeddings, "lr": recipe.text_lr, "weight_decay": 0.0}])
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe.warmup_steps, recipe.steps))


def fit(step_loss: Callable[[], torch.Tensor], trained: Sequence[torch.nn.Module], opt, sched, recipe,
        progress: bool = True) -> tuple[list[float], float]:
    """``recipe.steps`` updates of ``step_loss()`` (gradients clipped to norm 1 over every trained module), an EMA of
    each module (``recipe.ema_decay``, with warm-up) copied into it at the end; returns (losses, loop seconds)."""
    emas = [EMAModel(m.parameters(), decay=recipe.ema_decay, use_ema_warmup=True) for m in trained]
    params = [p for m in trained for p in m.parameters()]
    losses: list[float] = []
    bar = tqdm(range(recipe.steps), desc=f"train {recipe.name}", disable=not progress)
    t0 = time.time()
    for step in bar:
        loss = step_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        for ema, m in zip(emas, trained):
            ema.step(m.parameters())
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    seconds = time.time() - t0
    for ema, m in zip(emas, trained):
        ema.copy_to(m.parameters())
    return losses, seconds


@torch.no_grad()
def zero_unused_rows(encoders: Sequence[Any], used: torch.Tensor) -> None:
    """Rows of tokens no caption uses got no gradient: stored as zeros (a file that says so, and compresses)."""
    for m in encoders:
        emb = m.get_input_embeddings().weight
        unused = torch.ones(emb.shape[0], dtype=torch.bool)
        unused[used] = False
        emb[unused] = 0.0


def parameters(**modules: torch.nn.Module) -> dict[str, int]:
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
