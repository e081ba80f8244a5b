"""Shared pieces of the alignment methods: rewards, the feedback data, the held-out prompts, log-prob sampling.

- ``Reward``: a scorer of (image, prompt) pairs, higher is better. ``load_reward`` names them:
  ``feedback`` is the embedded world's learned reward model (``bench.embedded.feedback``, trained
  from the simulated human's binary labels); ``clip:<backbone>`` is a CLIP score through
  clip-anytorch (``clip:ViT-B/32`` for real models, once its weights are in ``~/.cache/clip``;
  ``clip:shapes-clip`` is the embedded evaluation CLIP, so a run that trains on it is graded by
  its own judge on the CLIP-score column); ``human`` is the simulated human (the pixel judge: the
  fraction of count, colors and background it finds right) and ``features`` the feature network's
  probability that count, colors and background are what the prompt asks (both read the target
  from the prompt, ``bench.embedded.feedback.parse_prompt``). The four are Parrot's reward set.
- ``FeedbackSet``: the committed "human-labeled" data of the embedded world (the base model's latents,
  prompts, labels), loaded with its digest for the protocol.
- ``HeldoutPrompts`` (data set ``shapes32-heldout``): the held-out user prompts, with the shapes32
  reference images for FID/KID.
- ``sample_with_logprob``: CFG sampling with diffusers' ``DDIMScheduler``, keeping the trajectory
  and the Gaussian log-density of every step for eta > 0 (DDPO's ``ddim_step_with_logprob``, built
  on the scheduler's own ``step`` with zero variance noise for the mean); ``policy_kl``: the closed-form
  KL between two such Gaussian steps of equal variance (DPOK's regularizer).
- ``non_dominated``: the batch's Pareto-optimal points over several rewards (Parrot's selection).
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file

from bench import sampling
from bench.clip import SCALE, clip_scores, load_clip, preflight, weights_digest
from bench.datasets import Shapes32
from bench.embedded.feature_extractor import WEIGHTS_DIR32, load_network
from bench.embedded.feature_net import to_input
from bench.embedded.feedback import (FEEDBACK_FILE, FEEDBACK_META, HELDOUT_MODULUS, HELDOUT_PROMPT_SEED, JUDGED,
                                     REWARD_CONFIG, REWARD_FILE, judge, load_reward_net, parse_prompt, prompts,
                                     word_ids)
from bench.embedded.shapes import ALL_COLORS, BACKGROUNDS
from bench.errors import BenchError
from bench.files import file_digest
from bench.interfaces import Prompt
from bench.models import EMBEDDED_WEIGHTS
from bench.sampling import guide

REWARD_CHOICES = ("feedback (the embedded learned reward model), human (the simulated human), features (the feature "
                  "network) or clip:<backbone> (e.g. clip:ViT-B/32, clip:shapes-clip)")
EMBEDDED_REWARDS = ("feedback", "human", "features")  # judges of the embedded world's 32x32 shapes and its prompts


def feedback_folder() -> Path:
    return EMBEDDED_WEIGHTS / "feedback"


# -- rewards ----------------------------------------------------------------------------------------------------------------
class Reward(ABC):
    """r(image, prompt): uint8 images [N, 3, H, W] and their prompts -> float scores [N], higher is better."""

    name: str

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What defines the scores (weights digest, scale): part of the protocol of a run that trains on it."""

    @abstractmethod
    def __call__(self, images_uint8: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


class FeedbackReward(Reward):
    """The embedded reward model: P(the simulated human approves), in [0, 1]."""

    name = "feedback"

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder else feedback_folder()
        self.net = load_reward_net(self.folder)

    def identity(self) -> dict[str, Any]:
        return {"reward": self.name, "kind": "learned from binary labels (Lee et al. 2023)", "range": "[0, 1]",
                "digest": file_digest([self.folder / REWARD_FILE, self.folder / REWARD_CONFIG])}

    @torch.no_grad()
    def __call__(self, images_uint8, prompts):
        if images_uint8.shape[-2:] != (32, 32):
            raise BenchError(f"the embedded reward model scores 32x32 images, not {tuple(images_uint8.shape[-2:])}")
        out = [torch.sigmoid(self.net(images_uint8[a : a + 512].float() / 127.5 - 1.0, word_ids(prompts[a : a + 512])))
               for a in range(0, len(prompts), 512)]
        return torch.cat(out)


class ClipReward(Reward):
    """CLIP score as a reward: max(cos(image, text), 0), the CLIP-score metric's value / 100."""

    def __init__(self, backbone: str):
        preflight(backbone)
        self.backbone = backbone
        self.name = f"clip:{backbone}"
        self._model = None

    def identity(self) -> dict[str, Any]:
        return {"reward": self.name, "kind": "CLIP score (clip-anytorch)", "range": "[0, 1]",
                "weights": weights_digest(self.backbone)}

    def __call__(self, images_uint8, prompts):
        device = torch.device("cpu")
        if self._model is None:
            self._model = load_clip(self.backbone, device)
        model, preprocess = self._model
        return clip_scores(model, preprocess, images_uint8.cpu(), list(prompts), device) / SCALE


def _targets(prompts: Sequence[str]) -> list[dict[str, Any]]:
    try:
        return [parse_prompt(p) for p in prompts]
    except ValueError as exc:
        raise BenchError(f"{exc}: the human and features rewards judge the feedback world's prompts") from None


def _check_32(name: str, images_uint8: torch.Tensor) -> None:
    if images_uint8.shape[-2:] != (32, 32):
        raise BenchError(f"the {name} reward scores the embedded world's 32x32 images, not {tuple(images_uint8.shape[-2:])}")


class HumanReward(Reward):
    """The simulated human (``bench.embedded.feedback.judge``): the fraction of the judged attributes (count, colors left
    to right, background) it finds right, in {0, 1/3, 2/3, 1}; 1 is its approval."""

    name = "human"

    def identity(self) -> dict[str, Any]:
        return {"reward": self.name, "kind": "the simulated human's judged attributes right (pixels, no network)",
                "judged": list(JUDGED), "range": "[0, 1]"}

    def __call__(self, images_uint8, prompts):
        _check_32(self.name, images_uint8)
        verdict = judge(images_uint8.permute(0, 2, 3, 1).cpu().numpy(), _targets(prompts))
        return torch.from_numpy(np.mean([verdict[k] for k in JUDGED], axis=0)).float()


class FeatureReward(Reward):
    """The feature network (shapes-cnn32, the evaluation's attribute heads): the product of its probabilities of the
    prompt's count, colors (left to right) and background, in [0, 1]."""

    name = "features"

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder else WEIGHTS_DIR32
        self.net = load_network(self.folder)

    def identity(self) -> dict[str, Any]:
        return {"reward": self.name, "kind": "shapes-cnn32 P(count, colors, background as prompted)", "range": "[0, 1]",
                "digest": file_digest([self.folder / "model.safetensors", self.folder / "config.json"])}

    @torch.no_grad()
    def __call__(self, images_uint8, prompts):
        _check_32(self.name, images_uint8)
        targets = _targets(prompts)
        logits = self.net(to_input(images_uint8.cpu()))
        p = {k: torch.softmax(v, 1) for k, v in logits.items()}
        colors, backgrounds = list(ALL_COLORS), list(BACKGROUNDS)
        out = torch.empty(len(targets))
        for i, t in enumerate(targets):
            objects = t["objects"]
            second = colors.index(objects[1]["color"]) if len(objects) > 1 else len(colors)  # "none" slot
            out[i] = (p["count"][i, len(objects) - 1] * p["background"][i, backgrounds.index(t["background"])]
                      * p["color"][i, colors.index(objects[0]["color"])] * p["color2"][i, second])
        return out


def load_reward(spec: str) -> Reward:
    if spec == "feedback":
        return FeedbackReward()
    if spec == "human":
        return HumanReward()
    if spec == "features":
        return FeatureReward()
    if spec.startswith("clip:") and len(spec) > 5:
        return ClipReward(spec[5:])
    raise BenchError(f"unknown reward {spec!r}: use {REWARD_CHOICES}")


def check_reward_name(spec: str, option: str = "--reward") -> None:
    if spec not in EMBEDDED_REWARDS and not (spec.startswith("clip:") and len(spec) > 5):
        raise ValueError(f"{option} must be {REWARD_CHOICES}, got {spec!r}")


# -- the committed feedback data -------------------------------------------------------------------------------------------
@dataclass
class FeedbackSet:
    """The base model's images (as final latents) for training prompts, with the simulated human's labels."""

    texts: list[str]  # per image
    targets: list[dict[str, Any]]
    latents: torch.Tensor  # [N, 4, 8, 8], scaled as the UNet sees them
    labels: torch.Tensor  # [N] bool
    prompt_index: torch.Tensor  # [N]: which training prompt
    meta: dict[str, Any]
    digest: str

    def pairs(self) -> torch.Tensor:
        """[P, 2] (preferred, rejected) image indices: every approved image against every rejected one of its prompt."""
        by_text: dict[str, list[int]] = {}
        for i, text in enumerate(self.texts):
            by_text.setdefault(text, []).append(i)
        out = []
        for idx in by_text.values():
            good = [i for i in idx if self.labels[i]]
            out += [(w, l) for w in good for l in idx if not self.labels[l]]
        return torch.tensor(out, dtype=torch.long).view(-1, 2)


def load_feedback(folder: Path | None = None) -> FeedbackSet:
    folder = Path(folder) if folder else feedback_folder()
    try:
        meta = json.loads((folder / FEEDBACK_META).read_text())
        data = load_file(str(folder / FEEDBACK_FILE))
    except Exception as exc:
        raise BenchError(f"cannot read the embedded feedback data in {folder} ({type(exc).__name__}); "
                         f"rebuild it with `bench embedded train feedback`") from None
    index = data["prompt_index"]
    prompts = meta["prompts"]
    return FeedbackSet(
        texts=[prompts[i]["text"] for i in index.tolist()],
        targets=[prompts[i]["target"] for i in index.tolist()],
        latents=data["latents"].float(),
        labels=data["label"].bool(),
        prompt_index=index,
        meta=meta,
        digest=file_digest([folder / FEEDBACK_FILE, folder / FEEDBACK_META]),
    )


# -- the held-out prompts -------------------------------------------------------------------------------------------------
class HeldoutPrompts(Shapes32):
    """Held-out user prompts of the feedback world (never trained on), with the shapes32 reference images.

    Prompt i is held-out prompt i of seed 12 (repeats kept: the world's one/two-object mix); its target names
    count, shapes, colors and background (no sizes: the prompts name none).
    """

    name = "shapes32-heldout"
    summary = ("embedded feedback world's held-out prompts (count, color, background; no sizes), "
               "shapes32 reference images")
    default_metrics = ("fid", "kid", "clip-score", "attribute-accuracy", "feedback-reward", "latency", "memory")
    default_num_samples = 500

    def identity(self) -> dict[str, Any]:
        return Shapes32.identity(self) | {"name": Shapes32.name}  # the same reference images (and feature cache)

    def prompts(self, num_samples: int):
        return [Prompt(text, target, f"{target['count']} object(s)") for text, target in prompts("heldout", num_samples)]

    def prompts_identity(self) -> dict[str, Any]:
        return {**self.identity(), "prompts": "feedback world, held-out split (sha256(prompt)[:8] mod "
                f"{HELDOUT_MODULUS} == 0)", "seed": HELDOUT_PROMPT_SEED, "format": "user prompts without sizes"}


# -- sampling with log-probabilities (DDPO) ----------------------------------------------------------------------------------
def ddim_step_gaussian(scheduler, eps: torch.Tensor, t, x: torch.Tensor, eta: float) -> tuple[torch.Tensor, float]:
    """The Gaussian policy of one stochastic DDIM step (Song et al. eq. 12): its mean (``scheduler.step`` with zero
    variance noise) and its standard deviation sigma_t = eta sqrt(variance)."""
    mean = scheduler.step(eps, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    std = eta * float(scheduler._get_variance(t, prev_t)) ** 0.5
    if std <= 0:
        raise ValueError("log-probabilities need eta > 0 (a stochastic DDIM step)")
    return mean, std


def policy_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: float) -> torch.Tensor:
    """KL(N(mean, std^2 I) || N(reference_mean, std^2 I)) = ||mean - reference_mean||^2 / (2 std^2), per sample and
    averaged over dimensions as the log-densities are (DPOK, Fan et al. 2023, Sec. 4.2: the per-step term of its
    upper bound on the KL between the fine-tuned and the pre-trained model)."""
    return ((mean - reference_mean) ** 2).mean(dim=tuple(range(1, mean.ndim))) / (2 * std**2)


def ddim_step_with_logprob(scheduler, eps: torch.Tensor, t, x: torch.Tensor, eta: float,
                           prev: torch.Tensor | None = None, noise: torch.Tensor | None = None):
    """One DDIM step (Song et al. eq. 12) by ``scheduler.step``, and log N(prev; mean, std^2) averaged over dimensions.

    ``prev`` given: its log-density under this step (DDPO's recomputation); else ``prev = mean + std * noise``.
    """
    mean, std = ddim_step_gaussian(scheduler, eps, t, x, eta)
    if prev is None:
        prev = mean + std * noise
    return prev, gaussian_log_prob(prev, mean, std)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """log N(x; mean, std^2 I) per sample, averaged over dimensions (ddpo-pytorch's convention)."""
    log_prob = -((x.detach() - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return log_prob.mean(dim=tuple(range(1, x.ndim)))


def guided_eps(unet, x: torch.Tensor, t, context: torch.Tensor, guidance: float) -> torch.Tensor:
    """CFG noise estimate with ``context`` = [uncond; cond] (or cond alone when guidance is 1)."""
    if guidance == 1.0:
        return unet(x, t, encoder_hidden_states=context).sample

    eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
    return guide(eps_u, eps_c, guidance)


def text_context(model, texts: Sequence[str], guidance: float) -> torch.Tensor:
    device = next(model.unet.parameters()).device
    cond, uncond = model.pipeline.encode_prompt(list(texts), device, 1, guidance != 1.0, None)
    return torch.cat([uncond, cond]) if guidance != 1.0 else cond


@dataclass
class Trajectory:
    latents: torch.Tensor  # [T + 1, B, C, h, w]: x_T ... x_0
    log_probs: torch.Tensor | None  # [T, B] (eta > 0)
    timesteps: torch.Tensor  # [T]


def ddim_scheduler(model, steps: int):
    scheduler = sampling.make_scheduler(model, "DDIMScheduler", sampler_defaults=False)
    scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def sample_with_logprob(model, texts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
                        eta: float) -> Trajectory:
    """CFG + DDIM(eta) from per-sample seeds (initial noise and step noise drawn on the CPU from seed i), by
    ``bench.sampling.denoise`` with the trajectory recorded and, for eta > 0, the log-prob step."""
    scheduler = ddim_scheduler(model, steps)
    param = next(model.unet.parameters())
    context = text_context(model, texts, guidance).to(param.dtype)
    gens = sampling.generators(seeds)
    x = sampling.initial_noise(gens, model.latent_shape, scheduler, param)

    def predict(x: torch.Tensor, t, k: int) -> torch.Tensor:
        return guided_eps(model.unet, scheduler.scale_model_input(x, t), t, context, guidance)

    def logprob_step(eps: torch.Tensor, t, x: torch.Tensor, k: int):
        noise = sampling.cpu_noise(gens, model.latent_shape, param.device, param.dtype)
        return ddim_step_with_logprob(scheduler, eps, t, x, eta, noise=noise)

    out = sampling.denoise(scheduler, x, predict, step=logprob_step if eta > 0 else None, record=True)
    return Trajectory(torch.stack(out.latents), torch.stack(out.log_probs) if out.log_probs else None,
                      scheduler.timesteps.clone())


def feedback_hits(predicted: dict[str, np.ndarray], targets: Sequence[Any]) -> np.ndarray:
    """Per sample: the feature network's heads (``metrics.attribute_accuracy.predict``) find the count, every object's
    color (left to right) and the background of its target right: the attributes the feedback judged."""
    colors, backgrounds = list(ALL_COLORS), list(BACKGROUNDS)
    hits = np.zeros(len(targets), dtype=bool)
    for i, t in enumerate(targets):
        objects = t["objects"]
        ok = int(predicted["count"][i]) + 1 == len(objects)
        ok = ok and int(predicted["background"][i]) == backgrounds.index(t["background"])
        ok = ok and int(predicted["color"][i]) == colors.index(objects[0]["color"])
        if len(objects) > 1:
            ok = ok and int(predicted["color2"][i]) == colors.index(objects[1]["color"])
        hits[i] = ok
    return hits


def approval(images_uint8: torch.Tensor, targets: Sequence[Any]) -> np.ndarray:
    """The simulated human's labels of uint8 [N, 3, H, W] images against their prompts' targets."""
    return judge(images_uint8.permute(0, 2, 3, 1).numpy(), targets)["label"]


def non_dominated(scores: torch.Tensor) -> torch.Tensor:
    """Parrot's batch-wise Pareto-optimal selection: for scores [N, K] (K rewards, higher is better), True where no
    other point is at least as good on every reward and better on one. Equal points do not dominate each other (all
    are kept); with K = 1 the maximum (and its ties) is kept."""
    s = scores.double()
    at_least = (s[:, None, :] >= s[None, :, :]).all(-1)  # [j, i]: j >= i everywhere
    better = (s[:, None, :] > s[None, :, :]).any(-1)
    return ~(at_least & better).any(0)
