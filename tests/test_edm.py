"""The edm sampler (Karras et al. 2022, Algorithm 2) against diffusers' Heun and a transcription of the paper's
algorithm, its discretizations and options; Chen 2023's input scaling as a schedule (and the 32x32 recipes' models).

A tiny random UNet2DModel (8x8) on one thread: a few seconds in all.
"""

from __future__ import annotations

import math

import pytest
import torch

from bench import sampling
from bench.catalog import METHODS
from bench.cli.main import main
from bench.denoiser import CountingDenoiser
from bench.embedded.pixel_ddpm import SCHEDULER_CONFIG, input_scaled_alphas_cumprod, input_scaled_betas
from bench.errors import BenchError
from bench.interfaces import Batch, DiffusionModel

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
SEEDS = (5, 6, 7)
TINY_UNET = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                 norm_num_groups=4)


@pytest.fixture(scope="module")
def model() -> DiffusionModel:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_UNET).eval().requires_grad_(False)
    config = {k: v for k, v in DDPMScheduler(**SCHEDULER_CONFIG).config.items() if not k.startswith("_")}
    return DiffusionModel("tiny", "tests", "0" * 64, "pixel-diffusion", unet, config, (3, 8, 8))


def edm(**options):
    cls = METHODS.get("edm")
    return cls(cls.parse_args(options))


def unclamped(method, model, seeds, steps):
    """edm's samples before the final clamp to [-1, 1] (a random network's outputs are far outside it)."""
    from methods.edm import edm_sample

    denoiser = CountingDenoiser(model.unet, CPU)
    method.check(model, steps)
    den = method.vp_denoiser(model, lambda x, t: denoiser(x, t))
    sigmas = method.sigmas(model, steps)
    gens = sampling.generators(seeds)
    x = sampling.cpu_noise(gens, model.sample_shape) * float(sigmas[0])
    a = method.args
    out = edm_sample(den, x, sigmas, gens, s_churn=a.s_churn, s_tmin=a.s_tmin, s_tmax=a.s_tmax, s_noise=a.s_noise)
    return out, denoiser


def close(a, b, rel=1e-5):
    torch.testing.assert_close(a, b, rtol=0, atol=rel * max(1.0, float(b.abs().max())))


# -- deterministic: diffusers' Heun on Karras sigmas -------------------------------------------------------------------
@pytest.mark.parametrize("steps", [2, 4, 7])  # diffusers' Heun at 1 step starts at sigma_min
def test_deterministic_edm_equals_diffusers_heun_on_karras_sigmas(model, steps):
    from diffusers import HeunDiscreteScheduler

    ours, denoiser = unclamped(edm(), model, SEEDS, steps)
    assert denoiser.calls == 2 * steps - 1 == edm().nfe(steps)

    # the same model through diffusers' own scheduler (no x0 clipping: Algorithm 2 has none)
    scheduler = HeunDiscreteScheduler.from_config(model.scheduler_config, use_karras_sigmas=True, clip_sample=False,
                                                  timestep_spacing="linspace")
    scheduler.set_timesteps(steps)
    heun_sigmas = torch.unique_consecutive(scheduler.sigmas.double())  # Heun lists each inner sigma twice
    torch.testing.assert_close(heun_sigmas, edm().sigmas(model, steps), rtol=1e-5, atol=0)
    x = sampling.initial_noise(sampling.generators(SEEDS), model.sample_shape, scheduler, ours)
    theirs = sampling.denoise(scheduler, x, lambda x, t, k: model.unet(scheduler.scale_model_input(x, t), t).sample).x
    close(ours, theirs)


def test_generate_is_the_clamped_sample_and_depends_on_its_seed_alone(model):
    method = edm(s_churn=5.0)
    ours, _ = unclamped(method, model, SEEDS, 4)
    x = method.generate(model, Batch(SEEDS, 4), CountingDenoiser(model.unet, CPU))
    close(x, ours.clamp(-1, 1))
    alone = method.generate(model, Batch(SEEDS[2:], 4), CountingDenoiser(model.unet, CPU))
    close(alone[0], x[2])


# -- stochastic: Algorithm 2 written out from the paper --------------------------------------------------------------
def algorithm2(D, sigmas, x0_noise, step_noise, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al. 2022, Algorithm 2, line by line; ``step_noise(i)`` draws eps_i ~ N(0, I) for step i."""
    t = [float(s) for s in sigmas]
    N = len(t) - 1
    x = x0_noise * t[0]  # 1: x_0 ~ N(0, t_0^2 I)
    for i in range(N):  # 2
        gamma = min(s_churn / N, 2**0.5 - 1) if s_tmin <= t[i] <= s_tmax else 0.0  # 3
        t_hat = t[i] + gamma * t[i]  # 5
        if gamma > 0:
            eps = step_noise(i) * s_noise  # 4
            x = x + (t_hat**2 - t[i] ** 2) ** 0.5 * eps  # 6
        d = (x - D(x, t_hat)) / t_hat  # 7
        x_next = x + (t[i + 1] - t_hat) * d  # 8
        if t[i + 1] != 0:  # 9
            d_prime = (x_next - D(x_next, t[i + 1])) / t[i + 1]  # 10
            x_next = x + (t[i + 1] - t_hat) * (0.5 * d + 0.5 * d_prime)  # 11
        x = x_next
    return x  # 12


def test_churn_follows_algorithm_2(model):
    options = dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
    method = edm(**options)
    steps = 6
    ours, denoiser = unclamped(method, model, SEEDS, steps)
    assert denoiser.calls == 2 * steps - 1

    sigma_table = ((1 - model_alphas(model)) / model_alphas(model)).sqrt()
    log_sigmas = sigma_table.log()

    def D(x, sigma):  # the VP epsilon model as a denoiser, written here (numpy-free, float64 t)
        ls = math.log(sigma)
        idx = int(torch.searchsorted(log_sigmas, torch.tensor(ls, dtype=torch.float64)).clamp(1, 999))
        t = idx - 1 + (ls - float(log_sigmas[idx - 1])) / float(log_sigmas[idx] - log_sigmas[idx - 1])
        t = min(max(t, 0.0), 999.0)
        eps = model.unet(x / (1 + sigma**2) ** 0.5, torch.tensor([t], dtype=torch.float32)).sample
        return x - sigma * eps

    gens = sampling.generators(SEEDS)
    x0 = sampling.cpu_noise(gens, model.sample_shape)
    reference = algorithm2(D, method.sigmas(model, steps), x0, lambda i: sampling.cpu_noise(gens, model.sample_shape),
                           **options)
    close(ours, reference, rel=1e-4)
    deterministic, _ = unclamped(edm(), model, SEEDS, steps)
    assert not torch.allclose(ours, deterministic)


def model_alphas(model):
    from bench.distillation import Schedule

    return Schedule.from_config(model.scheduler_config).alphas_cumprod


def test_churn_outside_s_tmin_s_tmax_changes_nothing(model):
    """gamma is 0 where sigma is outside [S_tmin, S_tmax]: a window above every noise level is deterministic."""
    ours, _ = unclamped(edm(s_churn=40.0, s_tmin=1000.0, s_tmax=2000.0), model, SEEDS, 4)
    deterministic, _ = unclamped(edm(), model, SEEDS, 4)
    close(ours, deterministic)


# -- the two discretizations ------------------------------------------------------------------------------------------
def test_edm_noise_levels_follow_eq_5(model):
    method = edm(rho=3.0, sigma_min=0.05, sigma_max=40.0)
    s = method.sigmas(model, 5)
    assert s[-1] == 0 and len(s) == 6
    ramp = torch.linspace(0, 1, 5, dtype=torch.float64)
    expected = (40.0 ** (1 / 3) + ramp * (0.05 ** (1 / 3) - 40.0 ** (1 / 3))) ** 3
    torch.testing.assert_close(s[:-1], expected, rtol=1e-6, atol=0)
    low, high = edm()._range(model)
    s = edm().sigmas(model, 5)
    assert math.isclose(float(s[0]), high, rel_tol=1e-6) and math.isclose(float(s[-2]), low, rel_tol=1e-6)


def test_vp_schedule_is_uniform_in_t_from_1_to_1e_3(model):
    method = edm(schedule="vp")
    s = method.sigmas(model, 8)
    den = method.vp_denoiser(model, None)
    t = den.t_of(s[:-1]).double() / 999
    torch.testing.assert_close(t, torch.linspace(1, 1e-3, 8, dtype=torch.float64), rtol=0, atol=1e-4)
    assert s[-1] == 0 and float(s[0]) == pytest.approx(den.sigma_max, rel=1e-6)
    x, denoiser = unclamped(method, model, SEEDS, 8)
    assert denoiser.calls == 15 and torch.isfinite(x).all()
    edm_x, _ = unclamped(edm(), model, SEEDS, 8)
    assert not torch.allclose(x, edm_x)


def test_the_options_are_recorded_and_hashed(model):
    a, b = edm(schedule="vp").protocol(model), edm().protocol(model)
    assert a != b and b["noise_levels"]["rho"] == 7.0
    assert edm(rho=5.0).protocol(model) != b


def test_v_prediction_and_learned_variance_outputs(model):
    """A v model's denoiser is (x_in - sigma v) / sqrt(1 + sigma^2); a 6-channel (learned-range) output's first 3
    channels are epsilon."""
    from bench.distillation import VPDenoiser

    ac = model_alphas(model)
    x, sigma = torch.randn(2, 3, 4, 4), torch.tensor(3.0, dtype=torch.float64)
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x = x0 + 3.0 * eps
    a = 1 / (1 + 9.0)
    v = a**0.5 * eps - (1 - a) ** 0.5 * x0
    close(VPDenoiser(lambda x_in, t: v, ac, "v_prediction")(x, sigma), x0)
    close(VPDenoiser(lambda x_in, t: eps, ac)(x, sigma), x0)
    six = DiffusionModel("six", "tests", "0" * 64, "pixel-diffusion", _six_channel_unet(), model.scheduler_config,
                         (3, 8, 8))
    out = edm().generate(six, Batch(SEEDS, 3), CountingDenoiser(six.unet, CPU))
    assert out.shape == (3, 3, 8, 8)


def _six_channel_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(1)
    return UNet2DModel(**{**TINY_UNET, "out_channels": 6}).eval().requires_grad_(False)


# -- bad input -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,fragment", [
    ({"s_churn": -1.0}, "--s-churn"),
    ({"schedule": "cosine"}, "--schedule"),
    ({"schedule": "vp", "rho": 5.0}, "--schedule vp"),
    ({"sigma_min": 2.0, "sigma_max": 1.0}, "--sigma-min"),
    ({"s_tmin": 5.0, "s_tmax": 1.0}, "--s-tmax"),
])
def test_bad_options_are_one_line(options, fragment):
    with pytest.raises(BenchError, match=fragment):
        edm(**options)


def test_a_sigma_range_outside_the_model_is_refused(model):
    with pytest.raises(BenchError, match="outside tiny's sigma range"):
        edm(sigma_max=1000.0).check(model, 10)


def test_bad_input_on_the_cli_exits_2(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["run", "--method", "edm", "--model", str(tiny_model_dir), "--steps", "4", "--s-noise", "-1",
               "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--num-samples", "8", "--no-progress",
               "--metrics", "latency"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--s-noise" in err[0], err


# -- Chen 2023: input scaling is a schedule ----------------------------------------------------------------------------
@pytest.mark.parametrize("b", [0.5, 0.25, 2.0])
def test_input_scaling_with_variance_normalisation_is_the_trained_betas_schedule(b):
    """x_t = (sqrt(gamma) b x_0 + sqrt(1 - gamma) eps) / sqrt(b^2 gamma + 1 - gamma) (Chen 2023, section 2.2) is
    DDPMScheduler(trained_betas=input_scaled_betas(b)).add_noise(x_0, eps, t), with the same eps; log-SNR moves by
    2 log b."""
    from diffusers import DDPMScheduler

    default = DDPMScheduler(**SCHEDULER_CONFIG)
    shifted = DDPMScheduler(**{**SCHEDULER_CONFIG, "trained_betas": input_scaled_betas(SCHEDULER_CONFIG, b)})
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(6, 3, 4, 4, generator=gen) * 2 - 1, torch.randn(6, 3, 4, 4, generator=gen)
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    g = default.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
    chen = (g.sqrt() * b * x0 + (1 - g).sqrt() * eps) / (b * b * g + 1 - g).sqrt()
    close(shifted.add_noise(x0, eps, t).double(), chen, rel=1e-4)  # float32 cumprod of 1000 trained betas
    snr = lambda a: a / (1 - a)  # noqa: E731
    shift = snr(shifted.alphas_cumprod.double()).log() - snr(default.alphas_cumprod.double()).log()
    # float32 1 - alpha-bar near t = 0 (about 1e-4) limits the log-SNR to a few 1e-3
    torch.testing.assert_close(shift, torch.full_like(shift, 2 * math.log(b)), rtol=0, atol=5e-3)
    torch.testing.assert_close(shifted.alphas_cumprod.double(), input_scaled_alphas_cumprod(default.alphas_cumprod, b),
                               rtol=1e-4, atol=1e-9)


def test_a_shifted_model_is_a_standard_ddpm_folder_every_sampler_reads(tmp_path):
    """The scaled model saved with save_pretrained loads as a DDPMPipeline (public format) and its samplers see the
    shifted schedule."""
    from diffusers import DDPMPipeline

    from bench.models import load_pixel_diffusion
    from bench.recipes.noise_scheduling import SHIFTED_INPUT_SCALE, build_scheduler32

    from diffusers import UNet2DModel

    unet = UNet2DModel(**TINY_UNET)
    DDPMPipeline(unet=unet, scheduler=build_scheduler32(SHIFTED_INPUT_SCALE)).save_pretrained(
        tmp_path, safe_serialization=True)
    pipe = DDPMPipeline.from_pretrained(tmp_path)
    assert pipe.scheduler.config.trained_betas is not None
    model = load_pixel_diffusion(str(tmp_path), name="shifted")
    ddim = METHODS.get("noise-scheduling")
    scheduler = ddim(ddim.parse_args({})).make_scheduler(model)
    from diffusers import DDPMScheduler

    expected = input_scaled_alphas_cumprod(DDPMScheduler(**SCHEDULER_CONFIG).alphas_cumprod, SHIFTED_INPUT_SCALE)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), expected, rtol=1e-4, atol=1e-9)
    # sigma = sqrt((1 - a) / a) becomes sigma / b: the whole sigma range doubles at b = 0.5
    assert edm()._range(model) == pytest.approx(tuple(2 * s for s in edm()._range(_plain(model))), rel=1e-4)


def _plain(model):
    from diffusers import DDPMScheduler

    config = {k: v for k, v in DDPMScheduler(**SCHEDULER_CONFIG).config.items() if not k.startswith("_")}
    return DiffusionModel("plain", "tests", "0" * 64, "pixel-diffusion", model.unet, config, model.sample_shape)


def test_the_32x32_recipes_train_and_save(tmp_path):
    """Two updates of each recipe: a DDPMPipeline folder, RECIPE.json with the budget; the same UNet, another
    schedule."""
    import dataclasses
    import json

    from bench.recipes.noise_scheduling import Recipe32, ShiftedRecipe32, train

    configs = []
    for recipe in (Recipe32(), ShiftedRecipe32()):
        out = tmp_path / recipe.name
        record = train(out, dataclasses.replace(recipe, steps=2, batch_size=2, threads=1), progress=False)
        assert record["model"] == recipe.name and (out / "RECIPE.json").exists()
        assert json.loads((out / "unet" / "config.json").read_text())["sample_size"] == 32
        configs.append(json.loads((out / "scheduler" / "scheduler_config.json").read_text()))
    assert configs[0]["trained_betas"] is None and len(configs[1]["trained_betas"]) == 1000
