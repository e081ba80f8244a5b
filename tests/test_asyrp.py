"""Asyrp (methods/asyrp.py) and embedded-recolor16 (bench/attribute_edits.py): checks that can fail.

Strength 0 is DDIM inversion + regeneration by diffusers' schedulers exactly; the hook changes the mid-block output
alone; the asymmetric step and the directional loss against hand computations; sample i depends on item i alone;
training is deterministic from the run's seed and shared through the cache; bad options and data sets are refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.attribute_edits import RECOLOR_SEED, RECOLOR_TRAIN_SEED, EmbeddedRecolor16
from bench.denoiser import CountingDenoiser, sample_seed
from bench.errors import BenchError
from bench.interfaces import Batch, DiffusionModel
from bench.spec import RunSpec
from methods.asyrp import (Asyrp, asymmetric_step, directional_loss, new_delta_block, shifted_h)


def make(**args) -> Asyrp:
    return Asyrp(Asyrp.parse_args(args))


@pytest.fixture(scope="module")
def items():
    return EmbeddedRecolor16().edits(3)


def run(model, m, items, steps=6):
    seeds = tuple(sample_seed(0, i) for i in range(len(items)))
    return m.generate(model, Batch(seeds, steps, edits=tuple(items)), CountingDenoiser(model.unet, torch.device("cpu")))


def with_block(model, m, seed=0, scale_weights=1.0):
    m.block = new_delta_block(model.unet, seed)
    with torch.no_grad():  # a visible Δh on the tiny model
        m.block.conv2.weight.mul_(scale_weights)
    return m


# -- the data set ---------------------------------------------------------------------------------------------------
def test_recolor_set_has_blue_targets_masks_and_a_distinct_training_split():
    ref = EmbeddedRecolor16()
    edits, train = ref.edits(12), ref.training_edits(12)
    assert RECOLOR_SEED != RECOLOR_TRAIN_SEED
    for it in edits:
        assert it.edit_type == "color" and it.blend_words[1] == "blue" and it.blend_words[0] != "blue"
        assert it.source.shape == (16, 16, 3) and it.target.shape == (16, 16, 3) and it.mask.shape == (16, 16)
        assert " blue " in it.target_prompt and it.source_prompt.replace(it.blend_words[0], "blue") == it.target_prompt
        changed = np.abs(it.source.astype(int) - it.target.astype(int)).sum(-1) > 0
        assert changed.any() and not (changed & (it.mask == 0)).any()  # the change is inside the mask
    assert not any(np.array_equal(a.source, b.source) for a in edits for b in train)
    assert [p.attributes["objects"][0]["color"] for p in ref.prompts(12)] == ["blue"] * 12


def test_attribute_accuracy_and_ground_truth_metrics_take_the_recolor_set():
    from bench.evaluation import EvalContext
    from metrics.attribute_accuracy import AttributeAccuracy
    from metrics.editing import EditGroundTruth

    ref = EmbeddedRecolor16()
    items = ref.edits(16)
    AttributeAccuracy().check(RunSpec(), ref)
    EditGroundTruth().check(RunSpec(), ref)  # any embedded set with targets, not embedded-edits alone
    targets = [p.attributes for p in ref.prompts(16)]
    for images, color in (([it.target for it in items], 1.0), ([it.source for it in items], 0.0)):
        samples = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        ctx = EvalContext(spec=RunSpec(), samples=samples, reference=ref, device=torch.device("cpu"), items=items,
                          targets=targets)
        assert AttributeAccuracy().compute(ctx)["attr_acc_color"] == color  # shapes-cnn16 at 16x16
    assert EditGroundTruth().compute(ctx)["gt_psnr"] < 40  # the sources are not the targets


# -- the pieces against hand computations ---------------------------------------------------------------------------
def test_hook_shifts_the_mid_block_output_alone(tiny_model):
    unet = tiny_model.unet
    block = new_delta_block(unet, 3)
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor(600)
    seen: dict[str, list[torch.Tensor]] = {"down": [], "mid_in": [], "mid_out": []}
    hooks = [unet.down_blocks[-1].register_forward_hook(lambda m, a, o: seen["down"].append(o[0])),
             unet.mid_block.register_forward_pre_hook(lambda m, a: seen["mid_in"].append(a[0])),
             unet.mid_block.register_forward_hook(lambda m, a, o: seen["mid_out"].append(o))]
    with torch.no_grad():
        plain = unet(x, t).sample
        temb = unet.time_embedding(unet.time_proj(t.expand(2)).to(x.dtype))
        with shifted_h(unet, block, 0.7):
            moved = unet(x, t).sample
        with shifted_h(unet, block, 0.0):
            zero = unet(x, t).sample
        after = unet(x, t).sample
    for h in hooks:
        h.remove()
    assert torch.equal(seen["down"][0], seen["down"][1]) and torch.equal(seen["mid_in"][0], seen["mid_in"][1])
    h = seen["mid_out"][0]
    # the hook registered first sees the unshifted output; the shift is h + 0.7 f_t(h, temb)
    with torch.no_grad():
        expected = h + 0.7 * block(h, temb)
        recomputed = unet.mid_block(seen["mid_in"][0], temb)
    assert torch.allclose(recomputed, h, atol=1e-6)
    assert not torch.allclose(moved, plain) and torch.equal(zero, plain) and torch.equal(after, plain)
    with torch.no_grad():  # the shifted output, fed to the decoder, is what the hook produced
        with shifted_h(unet, block, 0.7):
            captured = []
            handle = unet.mid_block.register_forward_hook(lambda m, a, o: captured.append(o))
            unet(x, t)
            handle.remove()
    assert torch.allclose(captured[0], expected, atol=1e-6)


def test_asymmetric_step_is_eq_4():
    from diffusers import DDIMScheduler

    s = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    s.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x, eps, eps_s = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    t = s.timesteps[3]
    a_t, a_prev = s.alphas_cumprod[int(t)], s.alphas_cumprod[int(t) - 100]
    p_t = (x - (1 - a_t).sqrt() * eps_s) / a_t.sqrt()
    expected = a_prev.sqrt() * p_t + (1 - a_prev).sqrt() * eps
    got, pred = asymmetric_step(s, eps, eps_s, t, x)
    assert torch.allclose(got, expected, atol=1e-5) and torch.allclose(pred, p_t, atol=1e-5)
    last, _ = asymmetric_step(s, eps, eps_s, s.timesteps[-1], x)  # t = 0: a_prev is final_alpha_cumprod (1)
    a0 = s.alphas_cumprod[0]
    assert torch.allclose(last, (x - (1 - a0).sqrt() * eps_s) / a0.sqrt(), atol=1e-5)


def test_directional_loss_by_hand():
    img_src, img_edit = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 3.0, 0.0]])
    txt_src, txt_tgt = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 5.0]])
    # unit features: image direction (-1, 1, 0)/sqrt2, text direction (-1, 0, 1)/sqrt2: cos = 1/2
    assert torch.allclose(directional_loss(img_edit, img_src, txt_tgt, txt_src), torch.tensor([0.5]))
    assert torch.allclose(directional_loss(txt_tgt * 7, txt_src * 2, txt_tgt, txt_src), torch.tensor([0.0]), atol=1e-6)


# -- the adapter ------------------------------------------------------------------------------------------------------
def test_strength_zero_is_ddim_inversion_and_regeneration_exactly(tiny_model, items):
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    m = with_block(tiny_model, make(edit_strength=0.0), scale_weights=50.0)
    got = run(tiny_model, m, items)
    config = {k: v for k, v in tiny_model.scheduler_config.items() if not k.startswith("_")}
    inverse = DDIMInverseScheduler.from_config({k: v for k, v in config.items()
                                                if k in DDIMInverseScheduler.__init__.__code__.co_varnames})
    forward = DDIMScheduler.from_config(config)
    inverse.set_timesteps(6)
    forward.set_timesteps(6)
    x = torch.from_numpy(np.stack([it.source for it in items])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        for t in inverse.timesteps:
            x = inverse.step(tiny_model.unet(x, t).sample, t, x).prev_sample
        for t in forward.timesteps:
            x = forward.step(tiny_model.unet(x, t).sample, t, x).prev_sample
    assert torch.equal(got, x.clamp(-1, 1))
    edited = run(tiny_model, with_block(tiny_model, make(edit_strength=1.0), scale_weights=50.0), items)
    assert (edited - got).abs().max() > 1e-3  # a nonzero Δh edits


def test_sample_i_depends_on_item_i_alone(tiny_model, items):
    m = with_block(tiny_model, make(edit_strength=1.0, t_edit=300), scale_weights=50.0)
    seeds = tuple(sample_seed(0, i) for i in range(3))
    den = CountingDenoiser(tiny_model.unet, torch.device("cpu"))
    both = m.generate(tiny_model, Batch(seeds, 5, edits=tuple(items)), den)
    alone = m.generate(tiny_model, Batch(seeds[2:], 5, edits=tuple(items[2:])), den)
    # float round-off of batched convolutions, amplified by the 50x Δh; a leak between samples would be O(0.1)
    assert torch.allclose(both[2:], alone, atol=1e-3), (both[2:] - alone).abs().max()
    assert (both[1] - both[2]).abs().max() > 0.1


def test_training_is_deterministic_from_the_seed_and_shared_by_the_cache(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path / "cache"))
    spec = RunSpec(method="asyrp", dataset="embedded-recolor16", seed=0)
    opts = dict(train_images=2, train_batch=2, train_iters=1, train_ddim_steps=4, optimizer="adam", lr=0.05)
    a = make(**opts)
    budget = a.prepare(tiny_model, spec, tmp_path / "a")
    assert budget["train_steps"] == 2 and budget["train_params"] > 0  # t_edit 500: timesteps 750, 500 of 4
    untrained = new_delta_block(tiny_model.unet, 0)
    assert any(not torch.equal(p, q) for p, q in zip(a.block.state_dict().values(), untrained.state_dict().values()))
    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path / "fresh"))
    b = make(**opts)
    budget_b = b.prepare(tiny_model, spec, tmp_path / "b")  # trained again from nothing: the same f_t
    for k, v in a.block.state_dict().items():
        assert torch.equal(v, b.block.state_dict()[k]), k
    c = make(**opts, edit_strength=0.5)  # another strength: the cached f_t, the recorded budget
    assert c.prepare(tiny_model, spec, tmp_path / "c") == budget_b and (tmp_path / "c" / "delta_block.safetensors").is_file()
    for k, v in a.block.state_dict().items():
        assert torch.equal(v, c.block.state_dict()[k]), k


def test_bad_options_models_and_data_sets_are_refused_in_one_line(tiny_model):
    from bench.editing import EmbeddedEdits

    for args, match in [({"edit_strength": float("nan")}, "finite"), ({"t_edit": 1000}, "--t-edit"),
                        ({"train_images": 0}, "--train-images"), ({"lr": 0.0}, "--lr"), ({"optimizer": "lbfgs"}, "--optimizer"),
                        ({"lr_gamma": 2.0}, "--lr-gamma"), ({"l1_loss_w": -1.0}, "--l1-loss-w"), ({"strength": 1.0}, "no option")]:
        with pytest.raises(BenchError, match=match) as info:
            Asyrp.parse_args(args)
        assert "\n" not in str(info.value)
    with pytest.raises(BenchError, match="training split") as info:
        make().check_dataset(EmbeddedEdits())
    assert "\n" not in str(info.value)
    t2i = DiffusionModel("t2i", "x", "d", "text-to-image", tiny_model.unet, tiny_model.scheduler_config, (3, 16, 16))
    with pytest.raises(BenchError, match="pixel-diffusion"):
        make().check(t2i, 10)
    vpred = DiffusionModel("v", "x", "d", "pixel-diffusion", tiny_model.unet,
                           {**tiny_model.scheduler_config, "prediction_type": "v_prediction"}, (3, 16, 16))
    with pytest.raises(BenchError, match="epsilon"):
        make().check(vpred, 10)
    with pytest.raises(BenchError, match="after prepare"):
        run(tiny_model, make(), EmbeddedRecolor16().edits(1))
    make().check(tiny_model, 10)
