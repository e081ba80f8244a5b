"""Alignment (issue 9): the feedback world, the reward model, the three fine-tuning adapters and their claims."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bench.errors import BenchError
from bench.interfaces import Batch
from bench.spec import RunSpec
from tests.tiny_t2i import save_tiny_t2i

METHOD_NAMES = ("reward-weighted", "ddpo", "diffusion-dpo")
TINY = {  # contract-test settings on the tiny random model (a CLIP reward: the tiny model is not the embedded one)
    "reward-weighted": dict(train_steps=2, train_batch_size=4, feedback_prompts=3, images_per_prompt=2, pretrain_images=8),
    "ddpo": dict(train_steps=2, train_batch_size=2, prompts_per_epoch=2, images_per_prompt=2, sample_steps=2,
                 inner_epochs=1),
    "diffusion-dpo": dict(train_steps=2, train_batch_size=2, feedback_prompts=3, images_per_prompt=2),
}


def method(name, **args):
    from bench.catalog import METHODS

    cls = METHODS.get(name)
    return cls(cls.parse_args(args))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_t2i(tmp_path_factory.mktemp("tiny-t2i-align"))


def tiny_model(tiny_dir):
    from bench.models import load_model

    return load_model(str(tiny_dir))


def weights_digest(unet) -> str:
    from methods.personalization import state_digest

    return state_digest(dict(unet.state_dict()))


# -- the feedback world ----------------------------------------------------------------------------------------------------
def test_prompts_split_is_disjoint_deterministic_and_names_no_size():
    from bench.embedded.feedback import is_heldout, prompts

    train, heldout = prompts("train", 300), prompts("heldout", 100)
    assert train == prompts("train", 300)
    assert not {t for t, _ in train} & {t for t, _ in heldout}
    assert all(is_heldout(t) for t, _ in heldout) and not any(is_heldout(t) for t, _ in train)
    words = " ".join(t for t, _ in train + heldout).split()
    assert "small" not in words and "large" not in words
    counts = [a["count"] for _, a in heldout]
    assert 1 in counts and 2 in counts  # the world's one/two-object mix


def test_heldout_data_set_gives_prompts_with_targets_and_shapes32_references():
    from bench.alignment import HeldoutPrompts
    from bench.datasets import Shapes32

    prompts = HeldoutPrompts().prompts(20)
    assert len(prompts) == 20 and all(p.attributes and "count" in p.attributes for p in prompts)
    assert HeldoutPrompts().identity() == Shapes32().identity()  # FID against the same reference images


def test_simulated_human_reads_rendered_scenes_and_rejects_wrong_prompts():
    """The judge agrees with the renderer's ground truth (its blind spot: same-colored overlapping objects)."""
    from bench.embedded.feedback import WORLD, judge, perturb, user_prompt
    from bench.embedded.shapes import WorldConfig, render_set

    one, scenes1 = render_set(21, range(120), WorldConfig(32, 1, "train"))
    assert judge(one, [user_prompt(s)[1] for s in scenes1])["label"].all()
    two, scenes = render_set(21, range(200), WORLD)
    targets = [user_prompt(s)[1] for s in scenes]
    truth = judge(two, targets)
    assert truth["background"].all() and truth["label"].mean() >= 0.88
    rng = np.random.default_rng(0)
    wrong = judge(two, [perturb(t, rng) for t in targets])["label"]
    assert wrong.mean() <= 0.05


def test_reward_model_prefers_the_true_prompt():
    """The committed reward model (trained on generated images only) ranks a rendered scene's prompt above a perturbed one."""
    from bench.alignment import FeedbackReward
    from bench.embedded.feedback import WORLD, perturb, prompt_text, user_prompt
    from bench.embedded.shapes import render_set

    images, scenes = render_set(22, range(200), WORLD)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    reward = FeedbackReward()
    rng = np.random.default_rng(1)
    true = reward(x, [user_prompt(s)[0] for s in scenes])
    false = reward(x, [prompt_text(perturb(user_prompt(s)[1], rng)) for s in scenes])
    assert float((true > false).float().mean()) >= 0.8  # measured 0.84 (rendered scenes are sharper than samples)
    assert float(true.mean()) > float(false.mean()) + 0.2  # measured 0.36 against 0.07


def test_committed_feedback_set_matches_the_embedded_model():
    from bench.alignment import load_feedback
    from bench.models import embedded_t2i

    feedback = load_feedback()
    assert feedback.meta["base_model"]["digest"] == embedded_t2i().digest
    assert len(feedback.texts) == len(feedback.latents) == len(feedback.labels)
    assert 0.2 < float(feedback.labels.float().mean()) < 0.9  # both kinds of feedback
    pairs = feedback.pairs()
    assert len(pairs) and bool(feedback.labels[pairs[:, 0]].all()) and not bool(feedback.labels[pairs[:, 1]].any())
    assert bool((feedback.prompt_index[pairs[:, 0]] == feedback.prompt_index[pairs[:, 1]]).all())


# -- pieces of the methods ---------------------------------------------------------------------------------------------
def test_ddim_step_with_logprob_is_the_schedulers_step_and_a_gaussian_density():
    from diffusers import DDIMScheduler

    from bench.alignment import ddim_step_with_logprob
    from bench.embedded.t2i import SD15_SCHEDULER_CONFIG

    scheduler = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, eps, noise = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    t = scheduler.timesteps[3]
    prev, log_prob = ddim_step_with_logprob(scheduler, eps, t, x, 1.0, noise=noise)
    assert torch.allclose(prev, scheduler.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample, atol=1e-6)
    mean = scheduler.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
    std = (prev - mean).flatten().div(noise.flatten()).median()
    expected = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
    assert torch.allclose(log_prob, expected, atol=1e-4)
    _, again = ddim_step_with_logprob(scheduler, eps, t, x, 1.0, prev=prev)
    assert torch.allclose(again, log_prob)
    with pytest.raises(ValueError, match="eta > 0"):
        ddim_step_with_logprob(scheduler, eps, t, x, 0.0, noise=noise)


def test_per_prompt_stat_tracker_is_ddpo_pytorchs():
    """ddpo-pytorch's PerPromptStatTracker: a prompt's own mean and std once its buffer holds min_count rewards, else
    the batch's mean and std; the buffer keeps the last buffer_size rewards across epochs."""
    from methods.ddpo import PerPromptStatTracker

    prompts = ["a", "a", "b", "b", "c"]
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.5, 0.2], dtype=torch.float64)
    adv = PerPromptStatTracker(buffer_size=4, min_count=2).update(prompts, rewards)
    assert torch.allclose(adv[:2], torch.tensor([-1.0, 1.0], dtype=torch.float64), atol=1e-5)  # (r - 0.5) / 0.5
    assert torch.allclose(adv[2:4], torch.zeros(2, dtype=torch.float64))  # equal rewards: no preference
    r = rewards.numpy()
    assert float(adv[4]) == pytest.approx((0.2 - r.mean()) / (r.std() + 1e-6))  # one reward: the batch's statistics
    tracker = PerPromptStatTracker(buffer_size=3, min_count=3)
    tracker.update(["a", "a"], torch.tensor([0.0, 1.0]))
    second = tracker.update(["a"], torch.tensor([2.0]))  # the buffer now holds 0, 1, 2
    assert float(second[0]) == pytest.approx((2.0 - 1.0) / (np.std([0.0, 1.0, 2.0]) + 1e-6), rel=1e-5)
    tracker.update(["a"], torch.tensor([5.0]))
    assert list(tracker.stats["a"]) == [1.0, 2.0, 5.0]


# -- the adapters: contracts on the tiny model ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_prepare_trains_saves_records_budget_and_is_deterministic(tiny_dir, tmp_path, name):
    runs = []
    for k in range(2):
        model = tiny_model(tiny_dir)
        before = weights_digest(model.unet)
        m = method(name, reward="clip:shapes-clip", **TINY[name])
        values = m.prepare(model, RunSpec(seed=3), tmp_path / f"{name}-{k}")
        runs.append((weights_digest(model.unet), values))
    assert runs[0][0] == runs[1][0] != before  # same seed, same weights; and training changed them
    values = runs[0][1]
    assert values["train_steps"] == TINY[name]["train_steps"] and values["train_params"] > 0
    assert values["train_seconds"] > 0 and values["train_peak_memory_bytes"] > 0 and values["train_saved_bytes"] > 0
    log = json.loads((tmp_path / f"{name}-0" / "train_log.json").read_text())
    assert log["budget"]["steps"] == TINY[name]["train_steps"]
    saved = {p.name for p in (tmp_path / f"{name}-0").iterdir()}
    assert "unet" in saved  # the whole UNet by default (LoRA: test_lora_weights_load_back_with_diffusers)


def test_zero_steps_leave_the_model_and_its_samples_untouched(tiny_dir, tmp_path):
    from bench.denoiser import CountingDenoiser

    model = tiny_model(tiny_dir)
    prompts = ["a red circle on a black background", "a blue square and a green circle on a white background"]
    base = method("cfg", guidance=7.5).generate(model, Batch((1, 2), 3, prompts=prompts), CountingDenoiser(model.unet, torch.device("cpu")))
    m = method("reward-weighted", reward="clip:shapes-clip", train_steps=0)
    values = m.prepare(model, RunSpec(seed=0), tmp_path)
    assert values["train_steps"] == 0
    out = m.generate(model, Batch((1, 2), 3, prompts=prompts), CountingDenoiser(model.unet, torch.device("cpu")))
    assert torch.equal(out, base)


def test_lora_weights_load_back_with_diffusers(tiny_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    model = tiny_model(tiny_dir)
    m = method("diffusion-dpo", reward="clip:shapes-clip", lora_rank=2, **TINY["diffusion-dpo"])
    values = m.prepare(model, RunSpec(seed=0), tmp_path)
    assert values["train_params"] < sum(p.numel() for p in model.unet.parameters()) / 10
    state = StableDiffusionPipeline.lora_state_dict(str(tmp_path / "pytorch_lora_weights.safetensors"))[0]
    assert state and all("lora" in k for k in state)


def test_diffusion_dpo_starts_at_log_2(tiny_dir, tmp_path):
    """Policy = reference at step 0: the implicit reward margin is 0, the loss log 2 (eq. 14)."""
    model = tiny_model(tiny_dir)
    m = method("diffusion-dpo", reward="clip:shapes-clip", **TINY["diffusion-dpo"])
    m.prepare(model, RunSpec(seed=0), tmp_path)
    assert m.log["loss"][0] == pytest.approx(math.log(2), abs=1e-5)


class _Oracle(torch.nn.Module):
    """A "UNet" that predicts a fixed tensor (whatever ``answer`` holds)."""

    def __init__(self):
        super().__init__()
        self.answer = None

    def forward(self, x, t, encoder_hidden_states=None):
        from types import SimpleNamespace

        return SimpleNamespace(sample=self.answer)


def test_diffusion_dpo_target_follows_the_models_prediction_type():
    """A v-prediction model is scored against the velocity alpha_t eps - sigma_t x_0, not the noise; an unknown type
    raises instead of training on a wrong target."""
    from diffusers import DDPMScheduler

    from bench.embedded.t2i import SD15_SCHEDULER_CONFIG
    from methods.diffusion_dpo import prediction_errors

    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t, context, unet = torch.tensor([10, 500, 900]), torch.zeros(3, 77, 16), _Oracle()
    v = DDPMScheduler.from_config({**SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction"})
    abar = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    velocity = abar.sqrt() * noise - (1 - abar).sqrt() * latents
    unet.answer = velocity
    assert torch.allclose(prediction_errors(unet, v, latents, noise, t, context), torch.zeros(3), atol=1e-10)
    unet.answer = noise
    assert (prediction_errors(unet, v, latents, noise, t, context) > 1e-3).all()  # the noise is the wrong answer here
    eps = DDPMScheduler.from_config({**SD15_SCHEDULER_CONFIG, "prediction_type": "epsilon"})
    assert torch.allclose(prediction_errors(unet, eps, latents, noise, t, context), torch.zeros(3))
    sample = DDPMScheduler.from_config({**SD15_SCHEDULER_CONFIG, "prediction_type": "sample"})
    unet.answer = latents
    assert torch.allclose(prediction_errors(unet, sample, latents, noise, t, context), torch.zeros(3))
    bad = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    bad.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="unknown prediction_type 'flow'"):
        prediction_errors(unet, bad, latents, noise, t, context)


@pytest.mark.parametrize("args, message", [
    (dict(reward="aesthetic"), "--reward must be"),
    (dict(train_steps=-1), "--train-steps"),
    (dict(lora_rank=1.5), "--lora-rank"),
    (dict(learning_rate=0), "--learning-rate"),
])
def test_bad_options_are_one_line(args, message):
    from bench.catalog import METHODS

    with pytest.raises(BenchError, match=message):
        METHODS.get("reward-weighted").parse_args(args)


def test_ddpo_batch_must_divide_the_epoch():
    from bench.catalog import METHODS

    with pytest.raises(BenchError, match="must divide"):
        METHODS.get("ddpo").parse_args(dict(prompts_per_epoch=3, images_per_prompt=3, train_batch_size=2))


def test_ddpo_is_reuses_each_sampled_batch_so_ratios_leave_1_and_the_clip_binds(tiny_dir, tmp_path):
    """DDPO-IS (Black et al. 2024, Sec. 4.3): two minibatches x two inner epochs = four updates per sampled batch. The
    first update of a batch is scored by the policy that drew it (ratio 1 up to rounding, nothing clipped); later ones
    by a moved policy: ratios away from 1, a clipped fraction above 0 and a positive approximate KL. DDPO-SF's ratio
    is exactly 1 at every update."""
    options = dict(reward="clip:shapes-clip", prompts_per_epoch=2, images_per_prompt=2, sample_steps=2,
                   train_batch_size=2, inner_epochs=2)
    m = method("ddpo", train_steps=4, **options)
    values = m.prepare(tiny_model(tiny_dir), RunSpec(seed=0), tmp_path / "is")
    ratio, clipped, kl = (np.array(m.log[k]) for k in ("ratio_mean", "clipped_fraction", "approx_kl"))
    print(f"\nDDPO-IS per update: ratio {ratio.round(6).tolist()}, clipped {clipped.round(3).tolist()}, "
          f"approx KL {kl.tolist()}")
    assert len(ratio) == 4 and len(m.log["reward"]) == 1  # 4 updates on one sampled batch
    assert abs(ratio[0] - 1) < 1e-4 and clipped[0] == 0.0
    assert (ratio[1:] != 1.0).all() and (clipped[1:] > 0).all() and (kl[1:] > 0).all()
    assert values["train_clipped_fraction"] > 0 and values["train_approx_kl"] > 0
    sf = method("ddpo", estimator="sf", train_steps=2, **options)
    sf.prepare(tiny_model(tiny_dir), RunSpec(seed=0), tmp_path / "sf")
    print(f"DDPO-SF per update: ratio {sf.log['ratio_mean']}, clipped {sf.log['clipped_fraction']}")
    assert len(sf.log["reward"]) == 2  # one update per sampled batch
    assert sf.log["ratio_mean"] == [1.0, 1.0] and sf.log["clipped_fraction"] == [0.0, 0.0]


def test_reward_weighted_ablations_change_only_the_weighting(tiny_dir, tmp_path):
    """--weighting reward (eq. 3), uniform (the mean reward on every model image) and none (the pre-training term
    alone) train different weights from the same draws; the loss of none is the pre-training term's alone."""
    digests = {}
    for weighting in ("reward", "uniform", "none"):
        model = tiny_model(tiny_dir)
        m = method("reward-weighted", reward="clip:shapes-clip", weighting=weighting, **TINY["reward-weighted"])
        m.prepare(model, RunSpec(seed=0), tmp_path / weighting)
        digests[weighting] = weights_digest(model.unet)
    assert len(set(digests.values())) == 3
    from bench.catalog import METHODS

    with pytest.raises(BenchError, match="--weighting must be reward, uniform or none"):
        METHODS.get("reward-weighted").parse_args(dict(weighting="rank"))
    with pytest.raises(BenchError, match="--pretrain-weight must be > 0"):
        METHODS.get("reward-weighted").parse_args(dict(weighting="none", pretrain_weight=0))


@pytest.mark.parametrize("name", (*METHOD_NAMES, "diffedit"))
def test_declared_claims_name_valid_runs(name):
    """Every arm of the adapter's claims parses (full and --quick options), and the alignment claims are decided on
    the feedback world's held-out prompts by the judges the papers use (the simulated human for human raters)."""
    from bench.catalog import METHODS

    cls = METHODS.get(name)
    assert cls.claims
    for claim in cls.claims:
        for _, arm in claim.arms:
            METHODS.get(arm.method).parse_args(dict(arm.options))
            METHODS.get(arm.method).parse_args({**arm.options, **arm.quick_options})
            if name != "diffedit":
                assert arm.dataset == "shapes32-heldout" and arm.metrics == ("feedback-reward",)
    assert "measured" not in cls.card.embedded_claim and not any(ch.isdigit() for ch in cls.card.embedded_claim)


def test_ddpo_estimator_is_is_or_sf():
    from bench.catalog import METHODS

    with pytest.raises(BenchError, match="--estimator must be is or sf"):
        METHODS.get("ddpo").parse_args(dict(estimator="ppo"))


def test_the_embedded_reward_needs_the_embedded_model(tiny_dir):
    model = tiny_model(tiny_dir)
    with pytest.raises(BenchError, match="clip:ViT-B/32"):
        method("ddpo").check(model, 10)


def test_plan_defaults_to_heldout_prompts_and_records_the_feedback_protocol(tmp_path):
    from bench.runner import plan_run

    plan = plan_run(RunSpec(method="diffusion-dpo", num_samples=128, steps=2, output=str(tmp_path / "a")))
    assert plan.spec.dataset == "shapes32-heldout" and "feedback-reward" in plan.metrics
    assert plan.protocol["method"]["feedback"]["committed"] is True
    assert "reward" not in plan.protocol["method"]  # Diffusion-DPO on human labels uses no reward model
    other = plan_run(RunSpec(method="reward-weighted", num_samples=128, steps=2, output=str(tmp_path / "b")))
    assert other.protocol["method"]["reward"]["reward"] == "feedback"


# -- the claims: each adapter raises held-out accuracy above the base model's (the real budget: slow) -------------------
CLAIM_SAMPLES = 500  # at 256 Diffusion-DPO's gain (0.762 -> 0.785, 13 samples gained, 7 lost) is not significant


def heldout_accuracy(model, m, n=CLAIM_SAMPLES, steps=20):
    """Per-sample hits on the first n held-out prompts (seeds 0..n-1) by the feature network: the feedback's attributes
    (count, colors, background: ``feedback_accuracy``) and every attribute (shape too: ``attr_acc_all``)."""
    from bench.alignment import HeldoutPrompts, feedback_hits
    from bench.denoiser import CountingDenoiser, sample_seed
    from bench.images import to_uint8
    from metrics.attribute_accuracy import predict, score
    from bench.embedded.feature_extractor import WEIGHTS_DIR32, load_network

    prompts = HeldoutPrompts().prompts(n)
    seeds = [sample_seed(0, i) for i in range(n)]
    images = torch.cat([m.generate(model, Batch(tuple(seeds[a : a + 128]), steps,
                                         prompts=tuple(p.text for p in prompts[a : a + 128])),
                                   CountingDenoiser(model.unet, torch.device("cpu"))) for a in range(0, n, 128)])
    u8 = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2)
    predicted = predict(load_network(WEIGHTS_DIR32), u8)
    targets = [p.attributes for p in prompts]
    return feedback_hits(predicted, targets), score(predicted, targets)["attr_acc_all"]


@pytest.fixture(scope="module")
def base_heldout():
    from bench.models import embedded_t2i

    return heldout_accuracy(embedded_t2i(), method("cfg", guidance=7.5))


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    "reward-weighted",
    pytest.param("ddpo", marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
        "DDPO-IS at its defaults (120 updates, 960 trajectories) does not raise held-out feedback accuracy above the "
        "base model's: bench sweep --suite suites/alignment.yaml, rows base and ddpo"))),
    "diffusion-dpo",
])
def test_alignment_raises_heldout_accuracy_above_the_base_model(name, base_heldout, tmp_path):
    """Same held-out prompts and seeds before and after fine-tuning with the defaults: more samples turn right than
    wrong on the feedback's attributes by the evaluation network (McNemar's test, one-sided 5%)."""
    from bench.models import embedded_t2i

    model = embedded_t2i()
    m = method(name)
    m.prepare(model, RunSpec(seed=0), tmp_path)
    hits, attr_all = heldout_accuracy(model, m)
    base_hits, base_all = base_heldout
    gained, lost = int((hits & ~base_hits).sum()), int((~hits & base_hits).sum())
    z = (gained - lost) / math.sqrt(max(gained + lost, 1))
    assert hits.mean() > base_hits.mean() and z > 1.645, (name, base_hits.mean(), hits.mean(), gained, lost,
                                                           base_all, attr_all)
