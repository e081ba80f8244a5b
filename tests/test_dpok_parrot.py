"""DPOK and Parrot (issue 19): the KL bound, Pareto selection, the world's judges as rewards, the adapters' contracts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench.errors import BenchError
from bench.spec import RunSpec
from tests.test_alignment import method, tiny_dir, tiny_model  # noqa: F401 (tiny_dir: the module's tiny model)
from tests.test_alignment import weights_digest as digest

ROLLOUT = dict(train_batch_size=2, prompts_per_epoch=2, images_per_prompt=2, sample_steps=2, inner_epochs=1)
DPOK_TINY = dict(reward="clip:shapes-clip", train_steps=3, updates_per_epoch=2, buffer_size=8, value_batch_size=8,
                 **ROLLOUT)


# -- the pieces ----------------------------------------------------------------------------------------------------------
def test_policy_kl_is_the_kl_of_two_gaussians_of_equal_variance():
    """||mu - mu_ref||^2 / (2 sigma^2) against torch.distributions' KL of the two Gaussians (averaged over dimensions),
    and zero for equal means."""
    from bench.alignment import policy_kl

    g = torch.Generator().manual_seed(0)
    mean, ref = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    std = 0.37
    numeric = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                                torch.distributions.Normal(ref, std)).mean(dim=(1, 2, 3))
    assert torch.allclose(policy_kl(mean, ref, std), numeric, rtol=1e-5)
    assert torch.equal(policy_kl(mean, mean, std), torch.zeros(3))


def test_the_step_gaussian_is_the_one_of_the_logprob_step():
    from diffusers import DDIMScheduler

    from bench.alignment import ddim_step_gaussian, ddim_step_with_logprob, gaussian_log_prob
    from bench.embedded.t2i import SD15_SCHEDULER_CONFIG

    scheduler = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x, eps, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    t = scheduler.timesteps[4]
    prev, log_prob = ddim_step_with_logprob(scheduler, eps, t, x, 0.5, noise=noise)
    mean, std = ddim_step_gaussian(scheduler, eps, t, x, 0.5)
    assert torch.allclose(prev, mean + std * noise) and torch.equal(gaussian_log_prob(prev, mean, std), log_prob)


def test_non_dominated_keeps_the_pareto_front_and_ties():
    from bench.alignment import non_dominated

    scores = torch.tensor([[1.0, 0.0],   # front (best on reward 0)
                           [0.0, 1.0],   # front (best on reward 1)
                           [0.5, 0.5],   # front (nobody beats it on both)
                           [0.4, 0.4],   # dominated by [0.5, 0.5]
                           [0.5, 0.5],   # a tie with a front point: kept
                           [0.0, 0.9],   # dominated by [0.0, 1.0] (equal on one, worse on the other)
                           [1.0, 0.0]])  # a tie with the first: kept
    assert non_dominated(scores).tolist() == [True, True, True, False, True, False, True]
    assert non_dominated(torch.tensor([[0.2], [0.7], [0.7], [0.1]])).tolist() == [False, True, True, False]
    assert non_dominated(torch.ones(3, 4)).all()


def test_parrot_advantages_are_zero_off_the_front():
    from methods.parrot import multi_reward_advantages

    normalized = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0], [2.0, 2.0]])
    adv, kept = multi_reward_advantages(normalized, "pareto", 5.0)
    assert kept.tolist() == [False, False, False, True] and adv.tolist() == [0.0, 0.0, 0.0, 2.0]
    adv, kept = multi_reward_advantages(normalized[:3], "pareto", 0.5)
    assert kept.tolist() == [True, True, False] and adv.tolist() == [0.0, 0.0, 0.0]  # mean 0 on the front
    adv, kept = multi_reward_advantages(normalized, "all", 1.5)
    assert kept.all() and adv.tolist() == [0.0, 0.0, -1.0, 1.5]  # every image, clipped


def test_prompts_parse_back_to_their_targets():
    from bench.embedded.feedback import parse_prompt, prompt_text, prompts

    for text, target in prompts("train", 50) + prompts("heldout", 50):
        assert parse_prompt(text) == target and prompt_text(parse_prompt(text)) == text
    for bad in ("a red circle", "a red dog on a white background", "a red circle on a purple background", ""):
        with pytest.raises(ValueError, match="not a prompt of the feedback world"):
            parse_prompt(bad)


@pytest.mark.parametrize("name", ["human", "features"])
def test_judge_rewards_prefer_the_true_prompt(name):
    """The simulated human and the feature network score rendered scenes higher against their own prompts than
    against perturbed ones (another color, background or count)."""
    from bench.alignment import load_reward
    from bench.embedded.feedback import WORLD, perturb, prompt_text, user_prompt
    from bench.embedded.shapes import render_set

    images, scenes = render_set(23, range(60), WORLD)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    reward = load_reward(name)
    rng = np.random.default_rng(2)
    true = reward(x, [user_prompt(s)[0] for s in scenes])
    false = reward(x, [prompt_text(perturb(user_prompt(s)[1], rng)) for s in scenes])
    assert true.shape == (60,) and float(true.min()) >= 0 and float(true.max()) <= 1
    assert float(true.mean()) > float(false.mean()) + 0.3
    with pytest.raises(BenchError, match="feedback world"):
        reward(x[:1], ["a photo of a dog"])


# -- DPOK -----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dpok_runs(tiny_dir, tmp_path_factory):
    """Three tiny DPOK trainings (seed 1): beta 1 twice, beta 0 once; (weights digest, values, log, folder) each."""
    out = {}
    for key, beta in (("kl", 1.0), ("kl-again", 1.0), ("no-kl", 0.0)):
        model = tiny_model(tiny_dir)
        m = method("dpok", **{**DPOK_TINY, "kl_weight": beta})
        folder = tmp_path_factory.mktemp(f"dpok-{key}")
        values = m.prepare(model, RunSpec(seed=1), folder)
        out[key] = (digest(model.unet), values, m.log, folder)
    return out


def test_dpok_trains_lora_counts_queries_is_deterministic_and_starts_at_kl_0(dpok_runs):
    """LoRA's B starts at zero, so the first update's policy is the pre-trained one: KL exactly 0; later updates
    move away. Same seed, same weights; the LoRA file loads back with diffusers."""
    from diffusers import StableDiffusionPipeline

    assert dpok_runs["kl"][0] == dpok_runs["kl-again"][0]
    _, values, log, folder = dpok_runs["kl"]
    assert log["kl"][0] == 0.0 and log["kl"][-1] > 0 and len(log["kl"]) == 3
    assert values["train_reward_queries"] == 2 * 4  # 3 updates at 2 per epoch: 2 epochs of 4 images
    assert values["train_steps"] == 3 and values["train_params"] < 10**5 and values["train_kl_last"] > 0
    assert len(log["value_loss"]) == 2
    state = StableDiffusionPipeline.lora_state_dict(str(folder / "pytorch_lora_weights.safetensors"))[0]
    assert state and all("lora" in key for key in state)
    assert json.loads((folder / "train_log.json").read_text())["budget"]["steps"] == 3


def test_dpok_kl_weight_changes_the_update_and_is_measured_without_it(dpok_runs):
    """beta 0 (the ablation) trains other weights from the same draws, and its KL is still recorded."""
    assert dpok_runs["kl"][0] != dpok_runs["no-kl"][0]
    assert dpok_runs["no-kl"][2]["kl"][0] == 0.0 and dpok_runs["no-kl"][1]["train_kl_last"] > 0


def test_dpok_without_a_baseline_fits_no_value_function(tiny_dir, tmp_path):
    m = method("dpok", **{**DPOK_TINY, "baseline": "none", "train_steps": 1})
    m.prepare(tiny_model(tiny_dir), RunSpec(seed=1), tmp_path)
    assert m.log["value_loss"] == [] and len(m.log["kl"]) == 1


@pytest.mark.parametrize("name, args, message", [
    ("dpok", dict(kl_weight=-1), "--kl-weight"),
    ("dpok", dict(baseline="critic"), "--baseline must be value or none"),
    ("dpok", dict(train_batch_size=64, buffer_size=32), "--buffer-size"),
    ("parrot", dict(rewards="feedback,aesthetic"), "--rewards must be"),
    ("parrot", dict(rewards="human,human"), "distinct rewards"),
    ("parrot", dict(selection="best"), "--selection must be pareto or all"),
    ("parrot", dict(reward="human"), "Parrot trains on --rewards"),
])
def test_bad_options_are_one_line(name, args, message):
    from bench.catalog import METHODS

    with pytest.raises(BenchError, match=message):
        METHODS.get(name).parse_args(args)


# -- Parrot -------------------------------------------------------------------------------------------------------------
def test_parrot_scores_every_reward_selects_and_trains(tiny_dir, tmp_path):
    model = tiny_model(tiny_dir)
    before = digest(model.unet)
    m = method("parrot", rewards="clip:shapes-clip,human,features", train_steps=2, **ROLLOUT)
    values = m.prepare(model, RunSpec(seed=0), tmp_path)
    assert digest(model.unet) != before
    assert values["train_reward_queries"] == 4 * 3  # 4 images, 3 rewards each
    assert 0 < values["train_kept_fraction"] <= 1
    assert {"reward_clip:shapes-clip", "reward_human", "reward_features"} <= set(m.log)


def test_parrot_records_its_rewards_in_the_protocol_and_needs_the_embedded_model(tiny_dir, tmp_path):
    from bench.runner import plan_run

    plan = plan_run(RunSpec(method="parrot", num_samples=128, steps=2, output=str(tmp_path / "p")))
    assert [r["reward"] for r in plan.protocol["method"]["rewards"]] == ["feedback", "features", "human",
                                                                          "clip:shapes-clip"]
    assert "reward" not in plan.protocol["method"]
    with pytest.raises(BenchError, match="judge of the embedded world"):
        method("parrot", rewards="clip:shapes-clip,human").check(tiny_model(tiny_dir), 10)


@pytest.mark.parametrize("name", ["dpok", "parrot"])
def test_declared_claims_name_valid_runs(name):
    from bench.catalog import METHODS

    cls = METHODS.get(name)
    assert cls.claims
    for claim in cls.claims:
        for _, arm in claim.arms:
            METHODS.get(arm.method).parse_args({**arm.options, **arm.quick_options})
            assert arm.dataset == "shapes32-heldout"
    assert "measured" not in cls.card.embedded_claim and not any(ch.isdigit() for ch in cls.card.embedded_claim)


def test_reward_fronts_plot_marks_the_base_and_needs_two_judges(tmp_path):
    from bench.tradeoff import plot_reward_fronts

    rows = [{"cell": c, "seed": s, "reward": r + s * 0.01, "feedback_accuracy": f, "human_approval": h,
             "clip_score": 70 + r, "train_steps": steps}
            for s in (0, 1)
            for c, r, f, h, steps in (("base", 0.5, 0.7, 0.6, 0), ("dpok", 0.6, 0.72, 0.6, 64),
                                      ("parrot", 0.55, 0.75, 0.66, 120))]
    path = plot_reward_fronts(rows, tmp_path / "fronts.png", "fronts")
    assert path is not None and path.stat().st_size > 1000
    assert plot_reward_fronts([{"cell": "x", "reward": 0.1}], tmp_path / "none.png", "none") is None
