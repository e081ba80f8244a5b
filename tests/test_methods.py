"""DDPM and DDIM adapters on a tiny model: NFE counted, per-sample seeding, options and checks."""

import pytest
import torch

from bench.interfaces import Batch

from bench.denoiser import CountingDenoiser, sample_seed
from bench.errors import BenchError
from methods.ddim import DDIM
from methods.ddpm import DDPM


def generate(method, model, seeds, steps):
    denoiser = CountingDenoiser(model.unet, torch.device("cpu"))
    out = method.generate(model, Batch(tuple(seeds), steps), denoiser)
    return out, denoiser


@pytest.mark.parametrize("cls, args, steps", [(DDIM, {}, 7), (DDIM, {"eta": 1.0}, 7), (DDPM, {}, 7),
                                               (DDPM, {"variance_type": "fixed_small"}, 4)])
def test_generate_counts_nfe_and_seeds_per_sample(tiny_model, cls, args, steps):
    method = cls(cls.parse_args(args))
    seeds = [sample_seed(0, i) for i in range(3)]
    out, denoiser = generate(method, tiny_model, seeds, steps)
    assert out.shape == (3, 3, 16, 16) and torch.isfinite(out).all()
    assert denoiser.calls == steps and denoiser.evaluations == 3 * steps
    assert len(denoiser.call_seconds()) == steps
    alone, _ = generate(method, tiny_model, seeds[2:], steps)
    # sample i depends on its own seed only, also for the stochastic samplers; CPU kernels differ by
    # batch size in the last float bits, which a few steps grow to about 1e-4
    torch.testing.assert_close(alone[0], out[2], atol=1e-3, rtol=0)
    again, _ = generate(method, tiny_model, seeds, steps)
    assert torch.equal(again, out)


def test_eta_changes_samples_and_is_recorded(tiny_model):
    a = DDIM(DDIM.parse_args({"eta": 0.0}))
    b = DDIM(DDIM.parse_args({"eta": 1.0}))
    seeds = [sample_seed(0, 0)]
    assert not torch.equal(generate(a, tiny_model, seeds, 5)[0], generate(b, tiny_model, seeds, 5)[0])
    assert a.resolved_config(tiny_model)["_class_name"] == "DDIMScheduler"


def test_ddpm_variance_override_reaches_the_scheduler(tiny_model):
    small = DDPM(DDPM.parse_args({"variance_type": "fixed_small"}))
    assert small.resolved_config(tiny_model)["variance_type"] == "fixed_small"
    default = DDPM(DDPM.parse_args({}))
    assert default.resolved_config(tiny_model)["variance_type"] == tiny_model.scheduler_config["variance_type"]


@pytest.mark.parametrize("cls, values, message", [
    (DDIM, {"eta": 1.5}, r"eta must be a finite number in \[0.0, 1.0\]"),
    (DDIM, {"timestep_spacing": "sideways"}, "timestep-spacing"),
    (DDIM, {"etta": 0.1}, "has no option etta"),
    (DDPM, {"variance_type": "learned"}, "variance-type"),
])
def test_bad_method_options(cls, values, message):
    with pytest.raises(BenchError, match=message):
        cls.parse_args(values)


def test_more_steps_than_training_timesteps_is_bad_input(tiny_model):
    with pytest.raises(BenchError, match="exceeds the model's 1000 training timesteps"):
        DDIM(DDIM.parse_args({})).check(tiny_model, 1001)


def test_sample_seed_is_stable():
    assert sample_seed(0, 0) == sample_seed(0, 0)
    assert len({sample_seed(s, i) for s in range(3) for i in range(100)}) == 300
