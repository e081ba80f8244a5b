"""EDICT and Blended Latent Diffusion on the tiny text-to-image model: the coupled step against the paper's formula
over diffusers' DDIM step, exact inversion in float64, the blend's two identity cases (an all-zeros mask is the
autoencoder's round trip, an all-ones mask is SDEdit), per-sample independence, and the refusals."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from bench.denoiser import CountingDenoiser, sample_seed
from bench.editing import EmbeddedEdits
from bench.errors import BenchError
from bench.interfaces import Batch
from bench.models import load_model
from tests.tiny_t2i import save_tiny_t2i


def method(name, **args):
    from bench.catalog import METHODS

    cls = METHODS.get(name)
    return cls(cls.parse_args(args))


def run(model, m, items, steps, seeds=None):
    seeds = seeds or [sample_seed(0, i) for i in range(len(items))]
    return m.generate(model, Batch(tuple(seeds), steps, edits=tuple(items)), CountingDenoiser(model.unet, torch.device("cpu")))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(str(save_tiny_t2i(tmp_path_factory.mktemp("tiny-t2i"))))


@pytest.fixture(scope="module")
def tiny64(tiny):
    model = copy.deepcopy(tiny)
    for module in model.modules():
        module.double()
    return model


@pytest.fixture(scope="module")
def items3():
    return EmbeddedEdits().edits(3)


def denoiser(model):
    return CountingDenoiser(model.unet, torch.device("cpu"))


# -- EDICT -------------------------------------------------------------------------------------------------------------
def test_ddim_coefficients_are_diffusers_ddim_step(tiny):
    from methods.edict import ddim_coefficients

    m = method("edict")
    scheduler = m.make_scheduler(tiny)
    scheduler.set_timesteps(7)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    for t in scheduler.timesteps:  # the last step goes to final_alpha_cumprod
        a, b = ddim_coefficients(scheduler, t)
        ref = scheduler.step(eps, t, x, eta=0.0).prev_sample
        assert torch.allclose(a * x + b * eps, ref, atol=1e-6), (t, (a * x + b * eps - ref).abs().max())


@pytest.mark.parametrize("leapfrog", [True, False])
def test_coupled_step_is_eq14_over_ddim_steps(tiny64, items3, leapfrog):
    """The paper's eq. 14 written out with DDIMScheduler.step for the two affine couplings, then the mixing."""
    m = method("edict", leapfrog=leapfrog)
    scheduler = m.make_scheduler(tiny64)
    scheduler.set_timesteps(5)
    den = denoiser(tiny64)
    cond, uncond = m.encode_text(tiny64, [it.source_prompt for it in items3])
    g = torch.Generator().manual_seed(1)
    pair = torch.randn(2, 3, 4, 8, 8, generator=g, dtype=torch.float64)
    p, s = 0.93, 3.0

    def eps(z, t):
        u, c = tiny64.unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        return u + s * (c - u)

    for k in (0, 1):
        t = scheduler.timesteps[k]
        x, y = pair[0], pair[1]
        if k % 2 == 0 or not leapfrog:  # x first
            x = scheduler.step(eps(y, t), t, x).prev_sample
            y = scheduler.step(eps(x, t), t, y).prev_sample
        else:  # y first (the official code's leapfrog at odd steps)
            y = scheduler.step(eps(x, t), t, y).prev_sample
            x = scheduler.step(eps(y, t), t, x).prev_sample
        x = p * x + (1 - p) * y
        y = p * y + (1 - p) * x
        ours = m.coupled_step(den, pair, t, k, cond, uncond, scheduler)
        # rtol 1e-5: the UNet's float32 sums differ by batch size and CPU (values reach ~30; Intel gave 7e-6 where AMD
        # gave under 1e-6); a wrong coupling or mixing is off by O(1)
        assert torch.allclose(ours, torch.stack([x, y]), rtol=1e-5, atol=1e-5), (ours - torch.stack([x, y])).abs().max()
        back = m.inverse_step(den, ours, t, k, cond, uncond, scheduler)
        assert torch.allclose(back, pair, atol=1e-8), (back - pair).abs().max()


@pytest.mark.parametrize("options", [{}, {"mixing": 0.8, "leapfrog": False}])
def test_edict_inversion_reconstructs_the_source_latent_exactly_in_float64(tiny64, items3, options):
    m = method("edict-inversion", **options)
    z0 = m.encode_images(tiny64, items3[:2])
    cond, uncond = m.encode_text(tiny64, [it.source_prompt for it in items3[:2]])
    den = denoiser(tiny64)
    steps = 4 if options else 8
    out = m.edit_latents(tiny64, den, z0, cond, cond, uncond, steps, 1.0)
    assert den.calls == 2 * 2 * steps  # two guided evaluations per step, inversion and regeneration
    assert (out - z0).abs().max() < 1e-5, (out - z0).abs().max()
    if not options:  # another prompt lands elsewhere: the inverted pair is not the source
        cond_tgt, _ = m.encode_text(tiny64, [it.target_prompt for it in items3[:2]])
        edited = m.edit_latents(tiny64, den, z0, cond, cond_tgt, uncond, steps, 1.0)
        assert (edited - z0).abs().max() > 1e-2


def test_edict_edit_from_strength_zero_is_the_round_trip(tiny, items3):
    m = method("edict", strength=0.0)
    z0 = m.encode_images(tiny, items3)
    assert torch.equal(run(tiny, m, items3, 4), m.decode(tiny, z0))


@pytest.mark.parametrize("name,options", [("edict", {}), ("blended-latent", {}), ("blended-latent", {"blend_level": "input"})])
def test_sample_i_depends_on_item_i_and_seed_i_alone(tiny, tiny64, items3, name, options):
    # EDICT in float64: its inversion divides by p twice a step, so float32's batch-dependent rounding grows
    model = tiny64 if name == "edict" else tiny
    m = method(name, **options)
    seeds = [sample_seed(0, i) for i in range(3)]
    steps = 5
    both = run(model, m, items3, steps, seeds)
    alone = run(model, m, items3[1:2], steps, seeds[1:2])
    # atol 1e-4: float32 convolutions round differently by batch size on some CPUs (Intel: 1.6e-5 here); a sample
    # that read another item or seed is off by far more
    assert torch.allclose(both[1:2], alone, atol=1e-4), (both[1:2] - alone).abs().max()
    if name == "blended-latent":  # the seed matters where noise is drawn (EDICT is deterministic)
        assert not torch.allclose(run(model, m, items3[1:2], steps, [seeds[1] + 1]), alone)


# -- Blended Latent Diffusion ----------------------------------------------------------------------------------------------
def with_masks(items, value):
    return [dataclasses.replace(it, mask=np.full(it.mask.shape, value, np.float32)) for it in items]


@pytest.mark.parametrize("level", ["output", "input"])
def test_all_ones_mask_is_sdedit_at_the_same_strength_and_seed(tiny, items3, level):
    ones = with_masks(items3, 1.0)
    ours = run(tiny, method("blended-latent", strength=0.6, blend_level=level), ones, 6)
    assert torch.equal(ours, run(tiny, method("sdedit", strength=0.6), ones, 6))


def test_all_zeros_mask_is_the_autoencoders_round_trip(tiny, items3):
    zeros = with_masks(items3, 0.0)
    m = method("blended-latent")
    ours = run(tiny, m, zeros, 6)
    assert torch.equal(ours, m.decode(tiny, m.encode_images(tiny, zeros)))
    assert torch.equal(ours, run(tiny, method("sdedit", strength=0.0), zeros, 6))
    # the official script's level keeps the background one step noisy: never the clean source
    assert not torch.equal(run(tiny, method("blended-latent", blend_level="input"), zeros, 6), ours)


def test_blend_keeps_the_source_trajectory_outside_the_mask(tiny, items3):
    """Outside the latent mask every step's latent is the source noised to that step with the sample's noise."""
    from bench import sampling
    from methods.blended_latent import latent_masks

    m = method("blended-latent", strength=0.5)
    seen = []
    original = m.denoise

    def spy(den, trajectory, cond, uncond, blend=None):
        return original(den, trajectory, cond, uncond, blend=lambda k, x: seen.append((k, blend(k, x))) or seen[-1][1])

    m.denoise = spy
    run(tiny, m, items3, 6)
    z0 = m.encode_images(tiny, items3)
    mask = latent_masks(items3, (8, 8))
    gens = sampling.generators([sample_seed(0, i) for i in range(3)])
    scheduler = m.make_scheduler(tiny)
    steps = m.editing_timesteps(scheduler, 6, 0.5)
    sampling.cpu_noise(gens, z0.shape[1:])  # the start noise
    for k, x in seen:
        if k + 1 < len(steps):
            expected = scheduler.add_noise(z0, sampling.cpu_noise(gens, z0.shape[1:]), steps[k + 1 : k + 2])
        else:
            expected = z0
        assert torch.equal(x * (1 - mask), expected * (1 - mask))
    assert len(seen) == len(steps) == 3


def test_latent_mask_is_pils_nearest_resize_binarized():
    from methods.blended_latent import latent_masks

    mask = np.zeros((32, 32), np.float32)
    mask[4:8, 12:16] = 1.0  # one 4x4 block: latent cell (1, 3)
    mask[0, 0] = 1.0  # one pixel off the cell's centre sample: dropped, as PIL's nearest filter drops it
    item = dataclasses.replace(EmbeddedEdits().edits(1)[0], mask=mask)
    small = latent_masks([item], (8, 8))[0, 0]
    expected = torch.zeros(8, 8)
    expected[1, 3] = 1.0
    assert torch.equal(small, expected)


# -- refusals ------------------------------------------------------------------------------------------------------------------
class FakeEdits:
    name = "fake-edits"

    def __init__(self, items):
        self.items = items

    def edits(self, n):
        return self.items[:n]


def test_blended_latent_refuses_missing_or_wrongly_sized_masks_in_one_line(tiny, items3):
    m = method("blended-latent")
    bad_size = [dataclasses.replace(items3[0], mask=np.ones((16, 16), np.float32))]
    no_mask = [dataclasses.replace(items3[0], mask=None)]
    for items, fragment in ((bad_size, "16x16 mask for a 32x32 source"), (no_mask, "has none")):
        for call in (lambda: m.check_dataset(FakeEdits(items)), lambda: run(tiny, m, items, 4)):
            with pytest.raises(BenchError, match=fragment) as info:
                call()
            assert "\n" not in str(info.value)
    m.check_dataset(EmbeddedEdits())  # the embedded edits have masks of the images' size


@pytest.mark.parametrize("name,options,fragment", [
    ("edict", {"mixing": 0.0}, "--mixing must be a finite number > 0.0 and <= 1.0"),
    ("edict", {"mixing": 1.5}, "--mixing"),
    ("edict", {"strength": 1.2}, "--strength"),
    ("edict", {"leapfrog": "yes"}, "--leapfrog must be true or false"),
    ("edict", {"guidance": -1.0}, "--guidance"),
    ("edict-inversion", {"strength": 0.5}, "no option strength"),
    ("blended-latent", {"strength": -0.1}, "--strength"),
    ("blended-latent", {"blend_level": "middle"}, "--blend-level must be one of output, input"),
    ("blended-latent", {"inversion": "ddim"}, "no option inversion"),
])
def test_bad_options_are_one_line(name, options, fragment):
    with pytest.raises(BenchError, match=fragment) as info:
        method(name, **options)
    assert "\n" not in str(info.value)


def test_pixel_models_are_refused(tiny_model):
    for name in ("edict", "edict-inversion", "blended-latent"):
        with pytest.raises(BenchError, match="needs a model of kind text-to-image"):
            method(name).check(tiny_model, 10)
