"""DDNM (Wang et al. 2023) and the pseudo-inverse baseline: operators, the paper's update, batching, bad input.

The operators are checked against their defining identities (A A+ A = A, A+A idempotent) in float64; DDNM's
``generate`` against an independent loop written from the official code's ``ddnm_diffusion`` (functions/svd_ddnm.py:
compute_alpha over the linear betas, x0|t from eps, x^0|t = x0|t - A+(A x0|t - y), the eta update) on the tiny pixel
DDPM; its output against A x = y in float.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bench.catalog import DATASETS, METHODS
from bench.denoiser import CountingDenoiser, sample_seed
from bench.errors import BenchError
from bench.interfaces import Batch, EditItem
from bench.restoration import TASKS, Operators, degrade, observe, pinv, project
from bench.spec import RunSpec


def method(name, **args):
    cls = METHODS.get(name)
    return cls(cls.parse_args(args))


@pytest.fixture(scope="module")
def items6():
    return DATASETS.get("embedded-restoration")().edits(6)


def run(model, m, items, steps, seeds=None):
    seeds = seeds or [sample_seed(0, i) for i in range(len(items))]
    den = CountingDenoiser(model.unet, torch.device("cpu"))
    out = m.generate(model, Batch(seeds=tuple(seeds), steps=steps, edits=tuple(items)), den)
    return out, den


def source_of(items) -> torch.Tensor:
    return torch.from_numpy(np.stack([it.source for it in items])).permute(0, 3, 1, 2).double() / 127.5 - 1


# -- operators -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_operators_are_a_generalized_inverse_pair(task):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=gen, dtype=torch.float64) * 2 - 1
    mask = (torch.rand(3, 16, 16, generator=gen, dtype=torch.float64) > 0.5).double()
    a = degrade(task, x, mask)
    assert torch.allclose(degrade(task, pinv(task, a, mask), mask), a, atol=1e-12)  # A A+ A = A
    p = project(task, x, mask)
    assert torch.allclose(project(task, p, mask), p, atol=1e-12)  # A+A idempotent
    assert not torch.allclose(p, x)  # a real degradation: the null space is not empty
    shapes = {"inpainting": (3, 3, 16, 16), "sr4": (3, 3, 4, 4), "colorization": (3, 1, 16, 16)}
    assert tuple(a.shape) == shapes[task]


def test_operators_are_ddnm_official_ones():
    """sr_averagepooling: 4x4 block means, copied back; colorization: the channel mean, copied into every channel;
    inpainting: the missing pixels zeroed (the item's mask is 1 where missing)."""
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float64).reshape(2, 3, 16, 16)
    assert torch.equal(degrade("sr4", x)[0, 1, 2, 3], x[0, 1, 8:12, 12:16].mean())
    assert torch.equal(pinv("sr4", degrade("sr4", x))[0, 1, 9, 13], x[0, 1, 8:12, 12:16].mean())
    assert torch.allclose(degrade("colorization", x)[:, 0], x.mean(1))
    assert torch.allclose(pinv("colorization", degrade("colorization", x)), x.mean(1, keepdim=True).expand_as(x))
    mask = torch.zeros(2, 16, 16, dtype=torch.float64)
    mask[:, :4] = 1
    out = degrade("inpainting", x, mask)
    assert (out[:, :, :4] == 0).all() and torch.equal(out[:, :, 4:], x[:, :, 4:])


def test_observations_hold_y_exactly(items6):
    assert [it.edit_type for it in items6] == list(TASKS) * 2
    ops = Operators(items6, (16, 16))
    src = source_of(items6) * 0.5 + 0.5
    assert torch.allclose(ops.project(src), src, atol=1e-12)  # the observation is A+ y: in the range of A+
    truth = torch.from_numpy(np.stack([it.target for it in items6])).permute(0, 3, 1, 2).double() / 255
    err = ops.consistency(truth, src)
    assert err.max() <= 0.5 / 255 + 1e-12  # y from the stored bytes is A(ground truth), rounded
    box = items6[0].mask
    assert box.shape == (16, 16) and 36 <= box.sum() <= 100 and not items6[1].mask.any()
    assert (items6[0].source[box > 0] == 0).all()  # the holes black, as DDNM's Apy images


def test_single_task_sets_and_reference():
    sr = DATASETS.get("embedded-restoration-sr4")()
    mixed = DATASETS.get("embedded-restoration")()
    a, b = sr.edits(3), mixed.edits(3)
    assert [it.edit_type for it in a] == ["sr4"] * 3
    assert np.array_equal(a[1].source, b[1].source) and np.array_equal(a[0].target, b[0].target)
    assert sr.identity() != mixed.identity()
    ref = mixed.dataset().images
    assert ref.shape == (1000, 3, 16, 16)
    assert torch.equal(ref[4], torch.from_numpy(mixed.edits(5)[4].target).permute(2, 0, 1))  # the ground truths


# -- DDNM against the official loop ------------------------------------------------------------------------------------
def official_ddnm(model, items, seeds, steps, eta=0.85):
    """functions/svd_ddnm.py ``ddnm_diffusion`` (no time-travel) with the items' operators, written anew."""
    betas = torch.from_numpy(np.linspace(1e-4, 0.02, 1000, dtype=np.float64)).float()

    def compute_alpha(t):
        b = torch.cat([torch.zeros(1), betas])
        return (1 - b).cumprod(0)[t + 1]

    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.randn(3, 16, 16, generator=g) for g in gens])
    y_img = source_of(items).float()
    skip = 1000 // steps
    times = list(range(steps - 1, -1, -1)) + [-1]
    for i, j in zip(times[:-1], times[1:]):
        i, j = i * skip, max(j * skip, -1)
        at, at_next = compute_alpha(i), compute_alpha(j)
        with torch.no_grad():
            et = model.unet(x, torch.tensor(i)).sample
        x0 = (x - et * (1 - at).sqrt()) / at.sqrt()
        x0_hat = torch.empty_like(x0)
        for n, it in enumerate(items):  # x0 - A+(A x0 - y), item by item
            m = torch.from_numpy(np.asarray(it.mask, np.float32))[None]
            y = degrade(it.edit_type, y_img[n : n + 1], m)
            x0_hat[n : n + 1] = x0[n : n + 1] - pinv(it.edit_type, degrade(it.edit_type, x0[n : n + 1], m) - y, m)
        if j < 0:
            return x0_hat
        z = torch.stack([torch.randn(3, 16, 16, generator=g) for g in gens])
        c1, c2 = (1 - at_next).sqrt() * eta, (1 - at_next).sqrt() * (1 - eta**2) ** 0.5
        x = at_next.sqrt() * x0_hat + c1 * z + c2 * et
    raise AssertionError("unreachable")


def test_ddnm_is_the_official_update_and_consistent(tiny_model, items6):
    seeds = [sample_seed(0, i) for i in range(6)]
    out, den = run(tiny_model, method("ddnm"), items6, 5, seeds)
    assert den.calls == 5 and den.evaluations == 30
    ref = official_ddnm(tiny_model, items6, seeds, 5)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    err = Operators(items6, (16, 16)).consistency(out.double(), source_of(items6))
    assert err.max() < 1e-5  # A x = y in float (the range space reproduced exactly)
    assert not torch.allclose(out.double(), Operators(items6, (16, 16)).project(source_of(items6)), atol=1e-3)


def paper_ddnm(model, items, seeds, steps):
    """Algorithm 1 as written: x_{t-1} from the DDPM posterior q(x_{t-1} | x_t, x^0|t) (Ho et al. eq. 6-7), over the
    skipped timesteps (beta_t = 1 - a_t / a_prev), the last step returning x^0|t."""
    a = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))).float()
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.randn(3, 16, 16, generator=g) for g in gens])
    ops, y_img = Operators(items, (16, 16)), source_of(items).float()
    apy = ops.project(y_img)
    skip = 1000 // steps
    for t in range((steps - 1) * skip, -1, -skip):
        with torch.no_grad():
            eps = model.unet(x, torch.tensor(t)).sample
        x0 = (x - (1 - a[t]).sqrt() * eps) / a[t].sqrt()
        x0_hat = apy + x0 - ops.project(x0)
        if t - skip < 0:
            return x0_hat
        a_prev = a[t - skip]
        beta = 1 - a[t] / a_prev
        mean = a_prev.sqrt() * beta / (1 - a[t]) * x0_hat + (1 - beta).sqrt() * (1 - a_prev) / (1 - a[t]) * x
        var = (1 - a_prev) / (1 - a[t]) * beta
        x = mean + var.sqrt() * torch.stack([torch.randn(3, 16, 16, generator=g) for g in gens])
    raise AssertionError("unreachable")


def test_ddnm_paper_update_is_algorithm_1_and_consistent(tiny_model, items6):
    seeds = [sample_seed(1, i) for i in range(6)]
    out, _ = run(tiny_model, method("ddnm", update="ddpm"), items6, 4, seeds)
    ref = paper_ddnm(tiny_model, items6, seeds, 4)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    err = Operators(items6, (16, 16)).consistency(out.double(), source_of(items6))
    assert err.max() < 1e-5
    assert not torch.allclose(out, run(tiny_model, method("ddnm"), items6, 4, seeds)[0], atol=1e-3)


def test_pseudo_inverse_is_a_plus_y_without_network_calls(tiny_model, items6):
    out, den = run(tiny_model, method("pseudo-inverse"), items6, 10)
    assert den.calls == 0
    assert torch.allclose(out.double(), Operators(items6, (16, 16)).project(source_of(items6)), atol=1e-6)


def test_sample_i_depends_on_item_i_and_seed_i_only(tiny_model, items6):
    m = method("ddnm")
    seeds = [sample_seed(3, i) for i in range(6)]
    both, _ = run(tiny_model, m, items6, 4, seeds)
    alone, _ = run(tiny_model, m, items6[4:5], 4, seeds[4:5])
    assert torch.allclose(both[4:5], alone, atol=1e-5), (both[4:5] - alone).abs().max()
    shuffled, _ = run(tiny_model, m, items6[::-1], 4, seeds[::-1])
    assert torch.allclose(both, shuffled.flip(0), atol=1e-5)


# -- the metric ---------------------------------------------------------------------------------------------------------
def metric_values(samples, items):
    from bench.evaluation import EvalContext
    from metrics.restoration import Restoration

    ref = DATASETS.get("embedded-restoration")()
    return Restoration().compute(EvalContext(spec=RunSpec(), samples=samples, reference=ref, device=torch.device("cpu"),
                                             items=items))


def test_restoration_metric(items6):
    truth = torch.from_numpy(np.stack([it.target for it in items6])).permute(0, 3, 1, 2).contiguous()
    values = metric_values(truth, items6)
    assert values["restore_psnr"] == pytest.approx(100.0)
    assert values["consistency_error"] <= 0.5 / 255 + 1e-9 and values["consistency_error_unclipped"] < 1e-12
    assert {f"{k}/{t}" for t in TASKS for k in ("restore_psnr", "consistency_error")} <= set(values)
    src = torch.from_numpy(np.stack([it.source for it in items6])).permute(0, 3, 1, 2).contiguous()
    values = metric_values(src, items6)
    assert values["consistency_error"] == 0 and values["restore_psnr"] < 40
    off = src.clone()
    block = src[1, 0, :4, :4].double()
    assert 0 < block.min() and block.max() < 255  # no clipping here: the rounding allowance alone
    off[1, 0, :4, :4] = 200  # an sr4 item: one block's red mean moved
    values = metric_values(off, items6)
    moved = abs(200 - float(block.mean())) / 255
    assert values["consistency_error/sr4"] == pytest.approx(moved) and values["consistency_error/inpainting"] == 0
    assert values["consistency_error_unclipped/sr4"] == pytest.approx(moved - 0.5 / 255)


def test_unclipped_consistency_allows_clipping_only_where_the_bytes_show_it(items6):
    from bench.restoration import stored_interval

    ops = Operators(items6[1:2], (16, 16))  # sr4
    y_img = torch.full((1, 3, 16, 16), 0.9, dtype=torch.float64)  # every block's mean is 0.9
    x = y_img.clone()
    x[0, :, 0, 0], x[0, :, 0, 1] = 1.3, 0.5  # consistent in float, 1.3 clipped when stored
    stored = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    assert ops.consistency(stored.double() / 255, y_img).max() > 0.01  # the bytes alone look inconsistent
    assert ops.interval_distance(*stored_interval(stored), y_img).max() < 1e-12  # clipping explains it
    stored[0, :, 0, 0] = 240  # not clipped: nothing explains the missing brightness
    gap = ops.interval_distance(*stored_interval(stored), y_img).max()
    assert gap == pytest.approx(0.9 - (240.5 + 128.5 + 14 * 230.5) / 255 / 16)  # the block's bytes at their highest


# -- bad input ------------------------------------------------------------------------------------------------------
def test_bad_items_are_refused_before_any_network_call(tiny_model, items6):
    from bench.editing import EmbeddedEdits

    m = method("ddnm")
    edit = EmbeddedEdits().edits(1)[0]  # a 32x32 "color" edit
    for bad, match in [([dataclasses.replace(items6[0], edit_type="color")], "not a restoration task"),
                       ([dataclasses.replace(items6[0], mask=np.zeros((8, 8), np.float32))], "mask is 8x8"),
                       ([edit], "not a restoration task")]:
        den = CountingDenoiser(tiny_model.unet, torch.device("cpu"))
        with pytest.raises(BenchError, match=match) as info:
            m.generate(tiny_model, Batch(seeds=(1,), steps=3, edits=tuple(bad)), den)
        assert "\n" not in str(info.value) and den.calls == 0


def test_bad_runs_are_refused_in_planning(tiny_model_dir, tmp_path):
    from bench.runner import plan_run

    for spec, match in [
        (RunSpec(method="ddnm", model=str(tiny_model_dir), dataset="embedded-edits", metrics=("latency",)),
         "no degradation operators"),
        (RunSpec(method="ddnm", model="embedded-t2i", metrics=("latency",)), "needs a model of kind pixel-diffusion"),
        (RunSpec(method="pseudo-inverse", model=str(tiny_model_dir), dataset="shapes16", metrics=("latency",)),
         "no degradation operators"),
        (RunSpec(method="ddim", model=str(tiny_model_dir), dataset="embedded-restoration", metrics=("restoration",)),
         "needs an editing run"),
        (RunSpec(method="sdedit", model="embedded-t2i", dataset="embedded-edits", metrics=("restoration",)),
         "needs a restoration data set"),
    ]:
        with pytest.raises(BenchError, match=match) as info:
            plan_run(spec.replace(output=str(tmp_path / "x")))
        assert "\n" not in str(info.value)
    for args, match in [({"eta": 1.5}, "--eta"), ({"update": "ddrm"}, "--update"),
                        ({"update": "ddpm", "eta": 0.5}, "--eta is the official")]:
        with pytest.raises(BenchError, match=match):
            METHODS.get("ddnm").parse_args(args)


def test_runner_defaults_and_batching(tiny_model_dir, tmp_path):
    from bench.runner import plan_run, sample

    outs = []
    for batch_size in (2, 3):
        spec = RunSpec(method="ddnm", model=str(tiny_model_dir), steps=3, num_samples=6, batch_size=batch_size,
                       metrics=("restoration",), output=str(tmp_path / f"run-{batch_size}"))
        plan = plan_run(spec)
        assert plan.spec.dataset == "embedded-restoration" and plan.protocol["edits"]["items_sha256"]
        outs.append(sample(plan, progress=False)[0])
    assert np.abs(outs[0].astype(int) - outs[1].astype(int)).max() <= 1
    default = plan_run(RunSpec(method="ddnm", model=str(tiny_model_dir), output=str(tmp_path / "d")))
    assert default.spec.num_samples == 256 and default.spec.metrics == ("restoration", "fid", "latency")
