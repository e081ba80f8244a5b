"""The shared loop of the alignment adapters: fine-tune the UNet from feedback in ``prepare``, then generate with CFG.

Each paper is one module holding its objective (``train``): reward-weighted likelihood
(``methods/reward_weighted.py``, Lee et al. 2023), policy gradient (``methods/ddpo.py``, Black et al.
2023) and preference pairs (``methods/diffusion_dpo.py``, Wallace et al. 2023). This base does what
they share:

- What is trained: the whole UNet (``--lora-rank 0``) or LoRA (Hu et al. 2022, through peft's
  ``LoraConfig`` injected by ``UNet2DConditionModel.add_adapter``) on its attention projections
  (to_q, to_k, to_v, to_out.0), ``lora_alpha`` = rank. The text encoder and the VAE stay frozen, as
  in all three papers. Saved into the run's ``method/`` folder: ``unet/`` (diffusers'
  ``save_pretrained``, safetensors) or ``pytorch_lora_weights.safetensors``
  (``StableDiffusionPipeline.save_lora_weights``), with ``train_log.json`` (the curves).
- Randomness: every training draw comes from ``torch.Generator().manual_seed(run seed)`` (LoRA's
  initialization from the global generator, seeded the same way), so a run seed fixes the trained
  weights on a CPU; ``bench sweep --seeds N`` spreads over training runs, not only over samples.
- The feedback data: the embedded world's committed set (``bench.alignment.load_feedback``) when the
  model is the one that drew it (same weight digest); else ``collect_feedback`` draws
  ``images_per_prompt`` images for each of ``feedback_prompts`` training prompts from the model.
- Budget (``bench.finetune.BudgetMeter``): steps, trained parameters, wall time, peak memory and the
  saved bytes of everything ``prepare`` does (data collection, reward scoring and training).
- Generation: ``LatentTextToImage`` (CFG, the configured scheduler) with the fine-tuned UNet.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from bench.alignment import (EMBEDDED_REWARDS, FeedbackSet, Reward, approval, check_reward_name, feedback_folder,
                             load_feedback, load_reward, sample_with_logprob)
from bench.claim import Arm
from bench.denoiser import sample_seed
from bench.embedded.feedback import FEEDBACK_IMAGE_SEED, decode, prompts
from bench.errors import BenchError
from bench.finetune import BudgetMeter, encode_images, saved_bytes, trainable_parameters
from bench.interfaces import DiffusionModel
from bench.validate import check_option
from methods.text_to_image import GuidanceArgs, LatentTextToImage

LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER = "alignment"


ALIGNMENT_METRICS = ("feedback-reward",)


def heldout(method: str, quick_options: dict[str, Any] | None = None, metrics: tuple[str, ...] = ALIGNMENT_METRICS,
            **options: Any) -> Arm:
    """An arm on the feedback world's held-out prompts (shapes32-heldout): CFG 7.5, DDIM 20 steps, 500 samples, three
    training seeds (the run seed seeds the training too); --quick: 64 samples (128 with FID, which needs twice the
    features' 64 dimensions), 10 steps, one seed, the ``quick_options`` (a smaller training budget)."""
    return Arm(method, 20, dict(options), model="embedded-t2i", dataset="shapes32-heldout", num_samples=500,
               seeds=(0, 1, 2), quick_num_samples=128 if "fid" in metrics else 64, quick_seeds=(0,), quick_steps=10,
               metrics=tuple(metrics), quick_options=dict(quick_options or {}))


BASE = ("base model", heldout("cfg", guidance=7.5))  # the untuned model, sampled as the adapters sample


def _check(name: str, value: Any, integer: bool = True, zero: bool = False, upper: float | None = None) -> None:
    check_option(name, value, 0, upper, integer=integer, lo_open=not zero)


@dataclass(frozen=True)
class AlignmentArgs(GuidanceArgs):
    reward: str = field(default="feedback", metadata={"help": "reward: feedback (the embedded reward model), human (the "
                                                              "simulated human), features (the feature network) or "
                                                              "clip:<backbone> (clip:ViT-B/32 for real models)"})
    train_steps: int = field(default=300, metadata={"help": "optimizer steps (0: the untuned model)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (constant)"})
    train_batch_size: int = field(default=32, metadata={"help": "examples per optimizer step"})
    lora_rank: int = field(default=0, metadata={"help": "0: fine-tune the whole UNet; r > 0: LoRA of rank r on its "
                                                        "attention projections"})
    feedback_prompts: int = field(default=512, metadata={"help": "training prompts of a feedback set collected from "
                                                                 "a model other than the embedded one"})
    images_per_prompt: int = field(default=4, metadata={"help": "images per training prompt of a collected feedback set"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_reward_name(self.reward)
        _check("train_steps", self.train_steps, zero=True)
        _check("learning_rate", self.learning_rate, integer=False)
        _check("train_batch_size", self.train_batch_size)
        _check("lora_rank", self.lora_rank, zero=True)
        _check("feedback_prompts", self.feedback_prompts)
        _check("images_per_prompt", self.images_per_prompt)


class AlignmentMethod(LatentTextToImage):
    """Base of the three adapters; a subclass supplies ``train`` (the paper's objective)."""

    default_dataset: ClassVar[str | None] = "shapes32-heldout"
    Args: ClassVar[type] = AlignmentArgs
    uses_reward_model: ClassVar[bool] = True  # False: Diffusion-DPO on the embedded labels needs no reward model

    def __init__(self, args: Any):
        super().__init__(args)
        self.log: dict[str, Any] = {}
        self._reward: Reward | None = None

    # -- the paper's part ----------------------------------------------------------------------------------------------
    def train(self, model: DiffusionModel, params: list[torch.nn.Parameter], gen: torch.Generator, spec: Any) -> int:
        """Optimize ``params`` (the rest is frozen); record curves in ``self.log``; return the optimizer steps taken."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------------------------------
    def reward(self) -> Reward:
        if self._reward is None:
            self._reward = load_reward(self.args.reward)
        return self._reward

    def reward_names(self) -> tuple[str, ...]:
        """The rewards the method trains on (Parrot: several)."""
        return (self.args.reward,)

    def check(self, model: DiffusionModel, steps: int) -> None:
        super().check(model, steps)
        for name in self.reward_names():
            if name in EMBEDDED_REWARDS and not model.embedded:
                raise BenchError(f"reward {name} is a judge of the embedded world (32x32 shapes); for {model.name} "
                                 f"use a real reward, e.g. --reward clip:ViT-B/32")
        if self.uses_reward_model or self.args.reward != "feedback":
            self.reward()  # missing weights: one line now, before the run exists

    def protocol(self, model: DiffusionModel) -> dict[str, Any]:
        out: dict[str, Any] = {**super().protocol(model), "training_seed": "torch.Generator().manual_seed(run seed)"}
        if self.uses_reward_model or self.args.reward != "feedback":
            out["reward"] = self.reward().identity()
        feedback = committed_feedback(model)
        out["feedback"] = ({"committed": True, "digest": feedback.digest} if feedback is not None else
                           {"committed": False, "collected": "feedback_prompts x images_per_prompt from the model"})
        return out

    def feedback(self, model: DiffusionModel) -> FeedbackSet:
        """The committed set if ``model`` drew it, else a set collected from ``model`` now (no labels)."""
        committed = committed_feedback(model)
        if committed is not None:
            return committed
        return collect_feedback(model, self.args.feedback_prompts, self.args.images_per_prompt, self.args.guidance)

    def prepare(self, model: DiffusionModel, spec: Any, workdir: Path) -> dict[str, float]:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        device = next(model.unet.parameters()).device
        gen = torch.Generator().manual_seed(spec.seed)
        for module in (model.unet, model.text_encoder, model.vae):
            module.requires_grad_(False)
        self.log = {"method": self.name, "args": asdict(self.args), "seed": spec.seed}
        with BudgetMeter(device) as meter:
            params = self.trainable(model, spec.seed)
            count = trainable_parameters(params)
            model.unet.train()
            try:
                steps = self.train(model, params, gen, spec) if self.args.train_steps else 0
                if not steps:
                    self.log["summary"] = {"train_reward_queries": 0.0}  # the untuned model asked no reward
            finally:
                model.unet.eval()
                for p in params:
                    p.requires_grad_(False)
        saved = self.save(model, workdir)
        budget = meter.budget(steps, count, saved_bytes(saved))
        self.log["budget"] = budget.to_dict()
        self.log["trains"] = "LoRA (peft) on the UNet's attention projections" if self.args.lora_rank else "the whole UNet"
        (workdir / "train_log.json").write_text(json.dumps(self.log, indent=1, default=float) + "\n")
        values = budget.metrics()
        values.update({k: float(v) for k, v in self.log.get("summary", {}).items()})
        return values

    def trainable(self, model: DiffusionModel, seed: int) -> list[torch.nn.Parameter]:
        if not self.args.lora_rank:
            params = list(model.unet.parameters())
        else:
            config = LoraConfig(r=self.args.lora_rank, lora_alpha=self.args.lora_rank, init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGETS))
            with torch.random.fork_rng(devices=[]):  # A's Gaussian init draws from the global generator
                torch.manual_seed(seed)
                model.unet.add_adapter(config, adapter_name=ADAPTER)
            params = [p for n, p in model.unet.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        return params

    def reference_unet(self, model: DiffusionModel):
        """A frozen copy of the UNet as it is now (before training: the reference model)."""
        return copy.deepcopy(model.unet).eval().requires_grad_(False)

    def save(self, model: DiffusionModel, workdir: Path) -> list[Path]:
        if not self.args.lora_rank:
            model.unet.save_pretrained(workdir / "unet", safe_serialization=True)
            return [workdir / "unet"]

        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model.unet, adapter_name=ADAPTER))
        StableDiffusionPipeline.save_lora_weights(workdir, unet_lora_layers=state, safe_serialization=True)
        return [workdir / LORA_FILE]

    def approval(self, images_uint8: torch.Tensor, targets: Sequence[Any] | None) -> float | None:
        """The simulated human's approval rate of training images (a curve in the log; the embedded world only)."""
        if not targets or images_uint8.shape[-1] != 32:
            return None

        return float(np.mean(approval(images_uint8, targets)))


def committed_feedback(model: DiffusionModel) -> FeedbackSet | None:
    """The embedded feedback set if ``model`` is the model that drew it, else None."""
    if not model.embedded or not (feedback_folder() / "feedback.json").exists():
        return None
    feedback = load_feedback()
    return feedback if feedback.meta["base_model"]["digest"] == model.digest else None


@torch.no_grad()
def collect_feedback(model: DiffusionModel, n_prompts: int, per_prompt: int, guidance: float, steps: int = 20,
                     batch: int = 64) -> FeedbackSet:
    """``per_prompt`` images of each of ``n_prompts`` training prompts from ``model`` (CFG, DDIM 20 steps), unlabeled."""
    train = prompts("train", n_prompts, distinct=True)
    texts = [t for t, _ in train for _ in range(per_prompt)]
    seeds = [sample_seed(FEEDBACK_IMAGE_SEED, i) for i in range(len(texts))]
    latents = torch.cat([sample_with_logprob(model, texts[a : a + batch], seeds[a : a + batch], steps, guidance, 0.0)
                         .latents[-1].float().cpu() for a in range(0, len(texts), batch)])
    index = torch.arange(n_prompts).repeat_interleave(per_prompt)
    return FeedbackSet(texts, [a for _, a in train for _ in range(per_prompt)], latents,
                       torch.zeros(len(texts), dtype=torch.bool), index, {"collected": True}, "")


def decode_uint8(model: DiffusionModel, latents: torch.Tensor) -> torch.Tensor:
    return decode(model, latents)


@torch.no_grad()
def image_posterior(model: DiffusionModel, latents: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen VAE's posterior (mean, std) of the decoded feedback images.

    The papers' feedback data are images (Lee et al.'s labeled set, Pick-a-Pic), encoded by the VAE for training
    as the pre-training images were; training on the sampler's raw final latents instead taught the model their
    off-manifold speckle (measured: twice the stray small regions in the samples after reward-weighted training).
    """
    images = decode_uint8(model, latents)
    parts = [encode_images(model, images[a : a + batch]) for a in range(0, len(images), batch)]
    return torch.cat([m for m, _ in parts]), torch.cat([s for _, s in parts])
