"""The feedback world's recipe (``bench embedded train feedback``): collect feedback, train the reward model.

It sits above the runtime world (bench.embedded.feedback: prompts, the judge, the reward network) and above
the sampler it draws the base model's images with (bench.alignment), which reads that world.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from bench.alignment import sample_with_logprob
from bench.denoiser import sample_seed
from bench.embedded.feedback import (FEEDBACK_FILE, FEEDBACK_IMAGE_SEED, FEEDBACK_META, JUDGED, MAX_WORDS,
                                     REWARD_CONFIG, REWARD_FILE, VALIDATION_IMAGE_SEED, WORDS, RewardNet, decode,
                                     judge, perturb, prompt_text, prompts, word_ids)
from bench.models import embedded_t2i


# -- the recipe: collect feedback, train the reward model ------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    prompts: int = 512  # distinct training prompts (one-object prompts are few and nearly always drawn right)
    images_per_prompt: int = 4
    validation_prompts: int = 128  # held-out prompts whose images validate the reward model
    validation_images_per_prompt: int = 2
    guidance: float = 7.5
    sampling_steps: int = 20  # DDIM, eta 0
    steps: int = 1000  # reward-model optimizer steps
    batch_size: int = 64
    lr: float = 1e-3
    pc_weight: float = 1.0  # Lee et al.'s prompt-classification term
    pc_negatives: int = 3  # perturbed prompts per good image
    width: int = 64
    seed: int = 0
    threads: int = 1
    name: str = "feedback"


@torch.no_grad()
def generate_latents(model, texts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
                     batch: int = 128) -> torch.Tensor:
    """The base model's final latents (CFG, DDIM eta 0: the runner's ``cfg`` sampler) for prompt i and seed i."""
    return torch.cat([sample_with_logprob(model, texts[a : a + batch], seeds[a : a + batch], steps, guidance, 0.0)
                      .latents[-1].float().cpu() for a in range(0, len(texts), batch)])


def reward_loss(net: RewardNet, images: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor,
                negatives: torch.Tensor | None, pc_weight: float) -> torch.Tensor:
    """Lee et al. Sec. 3.2: MSE(r, y) plus pc_weight x cross-entropy of the true prompt among perturbed ones (good images)."""
    features = net.image(images)
    logits = net.score(features, net.encode_text(ids))
    loss = F.mse_loss(torch.sigmoid(logits), labels)
    if negatives is not None and pc_weight > 0 and bool(labels.bool().any()):
        good = labels.bool()
        k = negatives.shape[1]
        neg = net.score(features[good].repeat_interleave(k, 0), net.encode_text(negatives[good].flatten(0, 1))).view(-1, k)
        scores = torch.cat([logits[good].unsqueeze(1), neg], dim=1)
        loss = loss + pc_weight * F.cross_entropy(scores, torch.zeros(len(scores), dtype=torch.long))
    return loss


def train(out_dir: Path, recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    """``bench embedded train feedback``: the base model's images, the judge's labels, the reward model; saved."""
    torch.set_num_threads(recipe.threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = embedded_t2i()
    t0 = time.time()
    train_prompts = prompts("train", recipe.prompts, distinct=True)
    k = recipe.images_per_prompt
    texts = [t for t, _ in train_prompts for _ in range(k)]
    targets = [a for _, a in train_prompts for _ in range(k)]
    seeds = [sample_seed(FEEDBACK_IMAGE_SEED, i) for i in range(len(texts))]
    latents = generate_latents(model, texts, seeds, recipe.sampling_steps, recipe.guidance)
    images = decode(model, latents)
    verdict = judge(images.permute(0, 2, 3, 1).numpy(), targets)
    val_prompts = prompts("heldout", recipe.validation_prompts)
    kv = recipe.validation_images_per_prompt
    val_texts = [t for t, _ in val_prompts for _ in range(kv)]
    val_targets = [a for _, a in val_prompts for _ in range(kv)]
    val_seeds = [sample_seed(VALIDATION_IMAGE_SEED, i) for i in range(len(val_texts))]
    val_images = decode(model, generate_latents(model, val_texts, val_seeds, recipe.sampling_steps, recipe.guidance))
    val_verdict = judge(val_images.permute(0, 2, 3, 1).numpy(), val_targets)
    collect_s = time.time() - t0

    t1 = time.time()
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    net = RewardNet(recipe.width)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps)
    x_all = images.float() / 127.5 - 1.0
    ids_all = word_ids(texts)
    y_all = torch.from_numpy(verdict["label"].astype(np.float32))
    losses = []
    bar = tqdm(range(recipe.steps), desc="train reward model", disable=not progress)
    for _ in bar:
        idx = torch.randint(0, len(texts), (recipe.batch_size,), generator=gen)
        negatives = torch.stack([word_ids([prompt_text(perturb(targets[i], rng)) for _ in range(recipe.pc_negatives)])
                                 for i in idx.tolist()])
        loss = reward_loss(net, x_all[idx], ids_all[idx], y_all[idx], negatives, recipe.pc_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    net.eval()
    train_s = time.time() - t1
    with torch.no_grad():
        r_train = torch.sigmoid(net(x_all, ids_all)).numpy()
        r_val = torch.sigmoid(net(val_images.float() / 127.5 - 1.0, word_ids(val_texts))).numpy()

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out_dir / REWARD_FILE))
    (out_dir / REWARD_CONFIG).write_text(json.dumps({"width": recipe.width, "words": list(WORDS),
                                                     "max_words": MAX_WORDS}, indent=2) + "\n")
    save_file({"latents": latents.contiguous(), "label": torch.from_numpy(verdict["label"].astype(np.uint8)),
               **{f"judge_{a}": torch.from_numpy(verdict[a].astype(np.uint8)) for a in JUDGED},
               "prompt_index": torch.arange(len(train_prompts)).repeat_interleave(k),
               "seed": torch.tensor(seeds, dtype=torch.int64)}, str(out_dir / FEEDBACK_FILE))
    (out_dir / FEEDBACK_META).write_text(json.dumps({
        "base_model": {"name": model.name, "digest": model.digest},
        "sampler": {"scheduler": "ddim", "eta": 0.0, "steps": recipe.sampling_steps, "guidance": recipe.guidance},
        "image_seeds": f"sample_seed({FEEDBACK_IMAGE_SEED}, i)",
        "labels": "the simulated human (bench.embedded.feedback.judge): count, color (left to right) and background",
        "prompts": [{"text": t, "target": a} for t, a in train_prompts],
    }, indent=1) + "\n")

    def accuracy(r: np.ndarray, y: np.ndarray) -> float:
        return float(((r >= 0.5) == y).mean())

    record = {
        "model": recipe.name,
        "command": f"bench embedded train {recipe.name}",
        "recipe": asdict(recipe),
        "feedback": {
            "images": len(texts), "prompts": len(train_prompts), "distinct_prompts": len(set(texts)),
            "approval_rate": float(verdict["label"].mean()),
            **{f"judge_{a}_rate": float(verdict[a].mean()) for a in JUDGED},
        },
        "validation_heldout_prompts": {
            "images": len(val_texts), "approval_rate": float(val_verdict["label"].mean()),
            "reward_accuracy": accuracy(r_val, val_verdict["label"]),
            "reward_mean_good": float(r_val[val_verdict["label"]].mean()) if val_verdict["label"].any() else None,
            "reward_mean_bad": float(r_val[~val_verdict["label"]].mean()) if (~val_verdict["label"]).any() else None,
        },
        "reward_train_accuracy": accuracy(r_train, verdict["label"]),
        "reward_parameters": sum(p.numel() for p in net.parameters()),
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "collect_s": round(collect_s, 1),
        "reward_train_s": round(train_s, 1),
        "wall_time_s": round(time.time() - t0, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
                   "a 2-core machine shared with other jobs (wall time is an upper bound)",
    }
    (out_dir / "RECIPE.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
