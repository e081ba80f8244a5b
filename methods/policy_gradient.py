"""What the policy-gradient adapters share: denoising as a multi-step MDP, rollouts with log-densities, the policy's
log-density of a recorded step.

DDPO (``methods/ddpo.py``, Black et al. 2024), DPOK (``methods/dpok.py``, Fan et al. 2023) and Parrot
(``methods/parrot.py``, Lee et al. 2024) all treat denoising as an MDP (DDPO Sec. 4.1, DPOK Sec. 4.1): the state
is (c, t, x_t), the action x_{t-1}, the policy the stochastic DDIM step p_theta(x_{t-1} | x_t, c) (eta > 0: a
Gaussian of mean mu_theta(x_t, c) and standard deviation sigma_t), the reward r(x_0, c) at the end. This module
holds the shared parts:

- ``PolicyGradientArgs``: the options of the rollouts (prompts per epoch, images per prompt, DDIM steps and eta)
  and of the updates (trajectories per optimizer step, passes over each sampled batch, the ratio's clip range).
- ``PolicyGradientMethod.rollout``: one epoch's samples: ``prompts_per_epoch`` training prompts drawn from
  the run's generator, ``images_per_prompt`` trajectories each from per-sample seeds (CFG, DDIM(eta) with every
  step's log-density under the sampling policy: ``bench.alignment.sample_with_logprob``), the decoded images and
  the prompts' text-encoder states. Every image scored by a reward is one reward query
  (``train_reward_queries``).
- ``PolicyGradientMethod.step_policy``: the current policy's Gaussian (mean, sigma_t) at recorded step j of some
  trajectories and the log-density of the recorded action under it (``bench.alignment.ddim_step_gaussian``,
  ``gaussian_log_prob``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from bench.alignment import Trajectory, ddim_step_gaussian, gaussian_log_prob, guided_eps, sample_with_logprob
from bench.denoiser import sample_seed
from bench.embedded.feedback import prompts
from methods.alignment import AlignmentArgs, AlignmentMethod, _check, decode_uint8

ROLLOUT_SEED_OFFSET = 10_000_000  # rollout image i of epoch e: sample_seed(run seed, offset + e * n + i)


@dataclass(frozen=True)
class PolicyGradientArgs(AlignmentArgs):
    train_batch_size: int = field(default=16, metadata={"help": "trajectories per optimizer step"})
    inner_epochs: int = field(default=2, metadata={"help": "passes over each sampled batch"})
    feedback_prompts: int = field(default=512, metadata={"help": "the training prompts the epochs draw from"})
    prompts_per_epoch: int = field(default=8, metadata={"help": "training prompts sampled per epoch"})
    images_per_prompt: int = field(default=4, metadata={"help": "trajectories per prompt"})
    sample_steps: int = field(default=10, metadata={"help": "DDIM steps of the training trajectories"})
    eta: float = field(default=0.5, metadata={"help": "DDIM eta of the trajectories (> 0: a density per step)"})
    clip_range: float = field(default=1e-4, metadata={"help": "clip range of the importance ratio"})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check("inner_epochs", self.inner_epochs)
        _check("prompts_per_epoch", self.prompts_per_epoch)
        _check("sample_steps", self.sample_steps)
        _check("eta", self.eta, integer=False, upper=1.0)
        _check("clip_range", self.clip_range, integer=False)

    @property
    def rollout_size(self) -> int:
        return self.prompts_per_epoch * self.images_per_prompt


@dataclass
class Rollout:
    """Trajectories with what the updates need: prompts, targets, the recorded trajectory, decoded images, the
    text-encoder states (conditional and empty prompt) and, once scored, the rewards."""

    texts: list[str]
    targets: list[Any]
    traj: Trajectory
    images: torch.Tensor  # uint8 [N, 3, H, W]
    cond: torch.Tensor  # [N, 77, D]
    uncond: torch.Tensor
    rewards: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def context(self, idx: torch.Tensor, guidance: float) -> torch.Tensor:
        """[uncond; cond] of trajectories ``idx`` (cond alone without guidance), as ``guided_eps`` takes it."""
        return torch.cat([self.uncond[idx], self.cond[idx]]) if guidance != 1.0 else self.cond[idx]

    def join(self, other: "Rollout", keep: int) -> "Rollout":
        """This rollout followed by ``other``, the last ``keep`` trajectories kept (a replay buffer)."""
        def cat(a, b, dim=0):
            return torch.cat([a, b], dim).narrow(dim, max(0, a.shape[dim] + b.shape[dim] - keep),
                                                 min(keep, a.shape[dim] + b.shape[dim]))

        start = max(0, len(self) + len(other) - keep)
        traj = Trajectory(cat(self.traj.latents, other.traj.latents, 1), cat(self.traj.log_probs, other.traj.log_probs, 1),
                          other.traj.timesteps)
        rewards = None if self.rewards is None or other.rewards is None else cat(self.rewards, other.rewards)
        return Rollout((self.texts + other.texts)[start:], (self.targets + other.targets)[start:], traj,
                       cat(self.images, other.images), cat(self.cond, other.cond), cat(self.uncond, other.uncond), rewards)


class PolicyGradientMethod(AlignmentMethod):
    """Base of DDPO, DPOK and Parrot: rollouts and the policy's log-density of their steps."""

    def prompt_pool(self) -> list[tuple[str, Any]]:
        args = self.args
        return prompts("train", max(args.feedback_prompts, args.prompts_per_epoch), distinct=True)

    def rollout(self, model, pool: Sequence[tuple[str, Any]], epoch: int, gen: torch.Generator, spec) -> Rollout:
        """Epoch ``epoch``'s trajectories of the current policy (its prompts drawn from ``gen``), decoded, unscored."""
        args = self.args
        n = args.rollout_size
        chosen = torch.randperm(len(pool), generator=gen)[: args.prompts_per_epoch].tolist()
        texts = [pool[i][0] for i in chosen for _ in range(args.images_per_prompt)]
        targets = [pool[i][1] for i in chosen for _ in range(args.images_per_prompt)]
        seeds = [sample_seed(spec.seed, ROLLOUT_SEED_OFFSET + epoch * n + i) for i in range(n)]
        model.unet.eval()
        traj = sample_with_logprob(model, texts, seeds, args.sample_steps, args.guidance, args.eta)
        model.unet.train()
        images = decode_uint8(model, traj.latents[-1])
        cond, uncond = model.pipeline.encode_prompt(texts, next(model.unet.parameters()).device, 1, True, None)
        return Rollout(texts, targets, traj, images, cond, uncond)

    def step_policy(self, unet, scheduler, ro: Rollout, idx: torch.Tensor, j: int):
        """(log p(x_{j+1} | x_j, c), mean, sigma) of recorded step j of trajectories ``idx`` under ``unet``'s policy."""
        t = ro.traj.timesteps[j]
        x_t = ro.traj.latents[j][idx]
        eps = guided_eps(unet, scheduler.scale_model_input(x_t, t), t, ro.context(idx, self.args.guidance),
                         self.args.guidance)
        mean, std = ddim_step_gaussian(scheduler, eps, t, x_t, self.args.eta)
        return gaussian_log_prob(ro.traj.latents[j + 1][idx], mean, std), mean, std
