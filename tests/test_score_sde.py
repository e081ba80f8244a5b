"""Score-SDE (Song et al. 2021), NCSN (Song and Ermon 2019) and the likelihood through the probability-flow ODE: the
SDEs against diffusers' schedules, the per-sample RK45 against scipy's solve_ivp, nll_bpd against closed-form
Gaussian likelihoods, the samplers against diffusers' ScoreSdeVePipeline, and the bad inputs (one line, exit 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from bench.cli.main import main
from bench.errors import BenchError
from bench.interfaces import DiffusionModel
from bench.sde import (CosineVPSDE, VESDE, VPSDE, bits_per_dim, bpd_offset, dequantize, log_likelihood,
                       network_score, sde_of, solve_rk45)

pytestmark = pytest.mark.usefixtures("one_thread")

LINEAR = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
          "prediction_type": "epsilon"}


# -- the SDEs ---------------------------------------------------------------------------------------------------------


def test_vp_of_a_linear_ddpm_is_score_sde_vp_and_its_marginal_matches_the_ddpm_schedule():
    sde = sde_of(_model(LINEAR))
    assert isinstance(sde, VPSDE) and (sde.beta_min, sde.beta_max) == pytest.approx((0.1, 20.0))
    ac = DDPMScheduler(**LINEAR).alphas_cumprod.double()
    i = torch.tensor([0, 10, 250, 500, 999])
    alpha, sigma = sde.marginal(i.double() / 999)  # the network's input t (N - 1) is the training index
    # the continuous SDE approximates the discrete chain (sum of betas for sum of log(1 - beta)): log alpha-bar
    # within 0.07 at the last step
    torch.testing.assert_close((alpha**2).log(), ac[i].log(), rtol=0, atol=0.08)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(5, dtype=torch.float64))


def test_cosine_vp_is_iddpm_alpha_bar_in_continuous_time_with_beta_its_log_derivative():
    config = {**LINEAR, "beta_schedule": "squaredcos_cap_v2"}
    sde = sde_of(_model(config))
    assert isinstance(sde, CosineVPSDE)
    ac = DDPMScheduler(**config).alphas_cumprod.double()
    i = torch.tensor([0, 1, 100, 500, 900, 990, 998])
    alpha, _ = sde.marginal((i.double() + 1) / 1000)  # training step i has alpha-bar((i + 1) / N)
    torch.testing.assert_close(alpha**2, ac[i], rtol=1e-5, atol=1e-9)  # diffusers' alphas_cumprod: float32
    assert sde.label(torch.tensor([(500 + 1) / 1000], dtype=torch.float64)).item() == pytest.approx(500)
    t = torch.tensor([0.1, 0.5, 0.9, 0.999, 0.99999], dtype=torch.float64)
    h = 1e-7
    dlog = (2 * sde.log_mean_coeff(t + h) - 2 * sde.log_mean_coeff(t - h)) / (2 * h)
    torch.testing.assert_close(sde.beta(t), -dlog, rtol=1e-5, atol=0)
    assert sde.beta(torch.tensor([1.0], dtype=torch.float64)).item() == pytest.approx(-1000 * math.log(0.001))


def test_ve_from_a_score_sde_ve_config():
    sde = sde_of(_model({"sigma_min": 0.01, "sigma_max": 30.0, "num_train_timesteps": 2000, "snr": 0.16},
                        kind="score-ve"))
    assert isinstance(sde, VESDE)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(sde.label(t), torch.tensor([0.01, math.sqrt(0.3), 30.0], dtype=torch.float64))
    # g(t)^2 = d sigma^2 / dt
    h = 1e-6
    torch.testing.assert_close(sde.diffusion(t[1:2]) ** 2,
                               (sde.sigma(t[1:2] + h) ** 2 - sde.sigma(t[1:2] - h) ** 2) / (2 * h), rtol=1e-6, atol=0)


@pytest.mark.parametrize("change, fragment", [
    ({"beta_schedule": "scaled_linear"}, "beta_schedule 'scaled_linear'"),
    ({"rescale_betas_zero_snr": True}, "zero-terminal-SNR"),
])
def test_a_schedule_without_a_score_sde_is_refused(change, fragment):
    with pytest.raises(BenchError, match=fragment):
        sde_of(_model({**LINEAR, **change}))


def test_the_score_of_a_learned_variance_model_is_its_first_channels():
    sde = sde_of(_model(LINEAR))
    x = torch.randn(2, 3, 2, 2)
    out = torch.randn(2, 6, 2, 2)
    t = torch.tensor([0.3, 0.7])
    torch.testing.assert_close(sde.score(out, x, t), sde.score(out[:, :3], x, t))


# -- RK45 with a step size per sample ---------------------------------------------------------------------------------


def _rhs(t, y):  # a non-linear, non-autonomous system that stays bounded both ways in time
    return np.stack([np.sin(3 * t) * y[1] - 0.5 * np.tanh(y[0]), -y[0] + np.cos(y[1]) * t])


def test_the_batched_rk45_gives_each_row_what_solve_ivp_gives_it_alone():
    from scipy.integrate import solve_ivp

    y0 = torch.tensor([[1.0, 0.0], [0.1, 2.0], [-3.0, 0.5], [0.0, 0.0]], dtype=torch.float64)

    def fun(t, y, rows):
        return torch.from_numpy(np.stack([_rhs(ti, yi) for ti, yi in zip(t.numpy(), y.numpy())]))

    for t0, t1 in ((0.0, 2.0), (1.0, 1e-3)):
        sol = solve_rk45(fun, y0, t0, t1, rtol=1e-6, atol=1e-6)
        for i in range(len(y0)):
            ref = solve_ivp(_rhs, (t0, t1), y0[i].numpy(), method="RK45", rtol=1e-6, atol=1e-6)
            assert sol.nfev[i].item() == ref.nfev, (i, sol.nfev, ref.nfev)
            np.testing.assert_allclose(sol.y[i].numpy(), ref.y[:, -1], rtol=1e-10, atol=1e-10)
        assert sol.calls >= int(sol.nfev.max())
        alone = solve_rk45(fun, y0[1:2], t0, t1, rtol=1e-6, atol=1e-6)
        assert torch.equal(alone.y[0], sol.y[1])  # a row's steps do not depend on the batch


# -- likelihood against closed forms ----------------------------------------------------------------------------------

MU, S = 0.3, 0.5  # data N(MU, S^2 I)


def gaussian_vp_eps(sde, mu, s):
    """The exact epsilon of N(mu, s^2 I) data under a VP SDE: sigma_t (x - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2)."""

    def network(x, label):
        t = label.double() / (sde.N - 1)
        alpha, sigma = (v.reshape(-1, 1, 1, 1).to(x.dtype) for v in sde.marginal(t))
        return sigma * (x - alpha * mu) / (alpha**2 * s**2 + sigma**2)

    return network


def gaussian_ve_score(sde, mu, s):
    def network(x, label):
        sigma = label.reshape(-1, 1, 1, 1).to(x.dtype)
        return -(x - mu) / (s**2 + sigma**2)

    return network


def gaussian_logp(x, mu, var):
    d = x[0].numel()
    return -0.5 * d * math.log(2 * math.pi * var) - (x.double() - mu).flatten(1).pow(2).sum(1) / (2 * var)


def exact_ode_log_likelihood(sde, x, mu, s, eps=1e-5):
    """What the probability-flow ODE gives N(mu, s^2 I) data exactly: log p_eps(x) + log prior(x_T) - log p_T(x_T),
    where the ODE is the affine map (x_T - m_T) / sd_T = (x - m_eps) / sd_eps (p_t = N(alpha_t mu, alpha_t^2 s^2 +
    sigma_t^2)); the prior differs from p_T a little (the VP mean coefficient at T is 0.0066, not 0)."""
    def moments(t):
        alpha, sigma = (v.item() for v in sde.marginal(torch.tensor([t], dtype=torch.float64)))
        return alpha * mu, (alpha * s) ** 2 + sigma**2

    m_eps, v_eps = moments(eps)
    m_T, v_T = moments(sde.T)
    x_T = m_T + math.sqrt(v_T / v_eps) * (x.double() - m_eps)
    return gaussian_logp(x, m_eps, v_eps) + sde.prior_logp(x_T) - gaussian_logp(x_T, m_T, v_T)


@pytest.mark.parametrize("trace", ["exact", "rademacher"])
def test_vp_likelihood_of_gaussian_data_is_the_exact_gaussian_likelihood(trace):
    sde = VPSDE(N=1000)
    g = torch.Generator().manual_seed(0)
    x = (MU + S * torch.randn(3, 3, 2, 2, generator=g)).double()
    probe = None if trace == "exact" else torch.randint(0, 2, x.shape, generator=g).double() * 2 - 1
    log_p, sol = log_likelihood(sde, network_score(sde, gaussian_vp_eps(sde, MU, S)), x, probe=probe)
    exact = exact_ode_log_likelihood(sde, x, MU, S)
    d = x[0].numel()
    torch.testing.assert_close(bits_per_dim(log_p, d), bits_per_dim(exact, d), atol=1e-4, rtol=0)  # RK45 at 1e-5
    # and the data's own likelihood, to the prior's mismatch with p_T and the noise at eps (a few 1e-3 bits)
    torch.testing.assert_close(bits_per_dim(log_p, d), bits_per_dim(gaussian_logp(x, MU, S**2), d), atol=1e-2, rtol=0)
    wrong = gaussian_logp(x, MU, 0.6**2)
    # (per image: two Gaussians' densities cross, so the largest of the three differences)
    assert (bits_per_dim(wrong, d) - bits_per_dim(log_p, d)).abs().max() > 0.05
    assert bool((sol.nfev > 10).all())
    # the same data under a model of the wrong variance: another value
    log_q, _ = log_likelihood(sde, network_score(sde, gaussian_vp_eps(sde, MU, 0.6)), x, probe=probe)
    assert (bits_per_dim(log_q, d) - bits_per_dim(log_p, d)).abs().max() > 0.05


def test_ve_likelihood_of_gaussian_data_is_the_exact_gaussian_likelihood():
    sde = VESDE(N=2000, sigma_min=0.01, sigma_max=50.0)
    x = (MU + S * torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(1))).double()
    log_p, _ = log_likelihood(sde, network_score(sde, gaussian_ve_score(sde, MU, S)), x)
    exact = exact_ode_log_likelihood(sde, x, MU, S)
    d = x[0].numel()
    torch.testing.assert_close(bits_per_dim(log_p, d), bits_per_dim(exact, d), atol=1e-4, rtol=0)  # RK45 at 1e-5
    torch.testing.assert_close(bits_per_dim(log_p, d), bits_per_dim(gaussian_logp(x, MU, S**2), d), atol=2e-2, rtol=0)
    log_q, _ = log_likelihood(sde, network_score(sde, gaussian_ve_score(sde, MU, 0.6)), x)
    assert (bits_per_dim(log_q, d) - bits_per_dim(log_p, d)).abs().max() > 0.05


class GaussianUNet(torch.nn.Module):
    """A 'UNet' whose output is the exact epsilon of N(MU, S^2 I) data under the VP SDE of ``sde``."""

    def __init__(self, sde, mu=MU, s=S):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.network = gaussian_vp_eps(sde, mu, s)

    def forward(self, x, t):
        class Out:
            sample = self.network(x, t) + self.w

        return Out()


def _model(config, kind="pixel-diffusion", unet=None, **extra):
    return DiffusionModel("toy", "toy", "0", kind, unet, config, (3, 2, 2), extra=extra)


def test_nll_bpd_of_8_bit_images_adds_the_dequantization_offset():
    """The metric's function: uint8 images dequantized with each image's own noise, bits/dim + 7 on [-1, 1]; the
    isotropic Gaussian's drift has a Jacobian c(t) I, so one Rademacher probe gives its trace exactly."""
    from metrics.likelihood import image_noise, nll_bpd

    sde = VPSDE(N=1000)
    model = _model(LINEAR, unet=GaussianUNet(sde))
    images = torch.randint(100, 230, (3, 3, 2, 2), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    indices = [5, 17, 2]
    bpd, nfe = nll_bpd(model, images, indices, batch=2)
    noise = torch.stack([image_noise(i, (3, 2, 2))[0] for i in indices])
    x = dequantize(images, noise)
    exact = bits_per_dim(exact_ode_log_likelihood(sde, x, MU, S), 12, bpd_offset())
    assert bpd_offset() == 7 and bpd_offset(0, 1) == 8
    torch.testing.assert_close(bpd, exact, atol=1e-4, rtol=0)  # the network in float32
    # batched 2 + 1 or one at a time: an image's value is its own
    alone, _ = nll_bpd(model, images[1:2], indices[1:2], batch=1)
    assert alone.item() == bpd[1].item()


# -- the samplers -----------------------------------------------------------------------------------------------------

VE_CONFIG = {"num_train_timesteps": 2000, "snr": 0.16, "sigma_min": 0.01, "sigma_max": 5.0, "sampling_eps": 1e-5,
             "correct_steps": 1}
FOURIER_UNET = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                    norm_num_groups=4, time_embedding_type="fourier")


@pytest.fixture(scope="module")
def tiny_ve():
    """A tiny random NCSN++-style model: UNet2DModel with Fourier time embedding (its output divided by sigma)."""
    torch.manual_seed(0)
    unet = UNet2DModel(**FOURIER_UNET).eval().requires_grad_(False)
    return DiffusionModel("tiny-ve", "tiny-ve", "0", "score-ve", unet, dict(VE_CONFIG), (3, 8, 8),
                          extra={"data_range": (0.0, 1.0)})


@pytest.fixture(scope="module")
def tiny_vp(tiny_model):
    return tiny_model


def _generate(method_name, model, seeds, steps, **options):
    from bench.catalog import METHODS
    from bench.denoiser import CountingDenoiser
    from bench.interfaces import Batch

    cls = METHODS.get(method_name)
    method = cls(cls.parse_args(options))
    method.check(model, steps)
    denoiser = CountingDenoiser(model.unet, torch.device("cpu"))
    out = method.generate(model, Batch(seeds=tuple(seeds), steps=steps), denoiser)
    return out, denoiser


@pytest.mark.parametrize("corrector", ["langevin", "none"])
def test_score_sde_on_a_ve_model_equals_score_sde_ve_pipeline(tiny_ve, corrector):
    from diffusers import ScoreSdeVePipeline, ScoreSdeVeScheduler

    scheduler = ScoreSdeVeScheduler(**{**VE_CONFIG, "correct_steps": 1 if corrector == "langevin" else 0})
    pipe = ScoreSdeVePipeline(unet=tiny_ve.unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    for seed in (3, 11):
        ref = pipe(batch_size=1, num_inference_steps=6, generator=torch.Generator().manual_seed(seed),
                   output_type="np").images
        ours, den = _generate("score-sde", tiny_ve, [seed], 6, corrector=corrector)
        np.testing.assert_allclose(((ours + 1) / 2).permute(0, 2, 3, 1).numpy(), ref, atol=1e-5, rtol=0)
        assert den.calls == 6 * (2 if corrector == "langevin" else 1)
    both, _ = _generate("score-sde", tiny_ve, [3, 11], 6, corrector=corrector)
    one, _ = _generate("score-sde", tiny_ve, [11], 6, corrector=corrector)
    torch.testing.assert_close(both[1:], one, atol=1e-5, rtol=0)  # a sample does not depend on its batch


@pytest.mark.parametrize("predictor, corrector", [("reverse-diffusion", "langevin"), ("euler-maruyama", "none"),
                                                  ("none", "langevin")])
def test_score_sde_on_a_vp_model_counts_its_evaluations_and_keeps_samples_independent(tiny_vp, predictor, corrector):
    out, den = _generate("score-sde", tiny_vp, [1, 2], 4, predictor=predictor, corrector=corrector)
    per_step = (predictor != "none") + (corrector == "langevin")
    assert den.calls == 4 * per_step and out.shape == (2, 3, 16, 16) and bool(out.isfinite().all())
    alone, _ = _generate("score-sde", tiny_vp, [2], 4, predictor=predictor, corrector=corrector)
    torch.testing.assert_close(out[1:], alone, atol=1e-4, rtol=0)  # 4 coarse steps amplify batched float sums


def test_score_sde_with_euler_maruyama_on_a_ve_model(tiny_ve):
    out, den = _generate("score-sde", tiny_ve, [0], 5, predictor="euler-maruyama", corrector_steps=2)
    assert den.calls == 5 * 3 and bool(out.isfinite().all())


def test_the_vp_reverse_diffusion_step_is_ddpm_ancestral_sampling_to_first_order():
    """Reverse diffusion on the VP SDE with beta_i = beta(t)/N is the DDPM posterior step (Song et al. 2021,
    appendix E): mean (x + beta eps-score) / sqrt(1 - beta) to first order in beta."""
    from methods.score_sde import reverse_diffusion_vp

    sde = VPSDE(N=1000)
    x = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    s = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.5, 0.5])
    _, mean = reverse_diffusion_vp(sde, x, t, s, torch.zeros_like(x), 1000)
    beta = (sde.beta(t[0]) / 1000).item()
    torch.testing.assert_close(mean, (x + beta * s) / math.sqrt(1 - beta), atol=beta**2 * 10, rtol=0)


def test_probability_flow_samples_on_vp_and_ve_models_with_the_nfe_the_solver_spent(tiny_vp, tiny_ve):
    for model in (tiny_vp, tiny_ve):
        out, den = _generate("probability-flow", model, [0, 5], 50, rtol=1e-3, atol=1e-3)
        assert bool(out.isfinite().all()) and den.calls > 6
        first, den_first = _generate("probability-flow", model, [0], 50, rtol=1e-3, atol=1e-3)
        alone, den_alone = _generate("probability-flow", model, [5], 50, rtol=1e-3, atol=1e-3)
        # each sample takes the steps it takes alone: the batch's evaluations are the two solves' own
        assert den.evaluations == den_first.calls + den_alone.calls and den.calls == max(den_first.calls,
                                                                                           den_alone.calls)
        # and lands where it lands alone, to the solver's tolerance (the network's batched float sums differ by 1e-7,
        # which an untrained network's ODE magnifies)
        torch.testing.assert_close(out[1:], alone, atol=1e-2, rtol=0)


def test_ncsn_anneals_over_its_levels_with_l_times_t_evaluations(tiny_ve):
    from bench.catalog import METHODS

    out, den = _generate("ncsn", tiny_ve, [0, 1], 20, levels=4)
    assert den.calls == 20 and bool(out.isfinite().all())
    method = METHODS.get("ncsn")(METHODS.get("ncsn").parse_args({"levels": 4}))
    levels = method.levels(tiny_ve)
    assert levels[0] == pytest.approx(5.0) and levels[-1] == pytest.approx(0.01) and len(levels) == 4
    ratios = [a / b for a, b in zip(levels, levels[1:])]
    assert max(ratios) == pytest.approx(min(ratios))  # geometric
    out, den = _generate("ncsn", tiny_ve, [0], 20, levels=4, single_level=True, denoise=True)
    assert den.calls == 21
    with pytest.raises(BenchError, match="not a multiple of --levels"):
        _generate("ncsn", tiny_ve, [0], 21, levels=4)
    with pytest.raises(BenchError, match="--steps is 20"):
        _generate("ncsn", tiny_ve, [0], 20, levels=4, steps_per_level=4)


def test_the_adapters_refuse_models_they_cannot_sample(tiny_vp):
    with pytest.raises(BenchError, match="noise-conditional score model"):
        _generate("ncsn", tiny_vp, [0], 10)
    with pytest.raises(BenchError, match="--steps means nothing"):
        _generate("probability-flow", tiny_vp, [0], 10)


# -- bad input through the CLI: one line, exit 2 ----------------------------------------------------------------------

Q = ["--num-samples", "2", "--batch-size", "2", "--no-progress", "--metrics", "latency"]


def _refused(argv, capsys, fragment):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and fragment in err[0], err


@pytest.fixture(scope="module")
def scaled_linear_dir(tmp_path_factory):
    import json

    from tests.conftest import save_tiny_ddpm

    folder = save_tiny_ddpm(tmp_path_factory.mktemp("scaled-linear"))
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "beta_schedule": "scaled_linear"}))
    return folder


@pytest.mark.parametrize("argv, fragment", [
    (["--method", "probability-flow", "--rtol", "0"], "--rtol must be"),
    (["--method", "probability-flow", "--steps", "20"], "--steps means nothing"),
    (["--method", "score-sde", "--predictor", "none", "--corrector", "none"], "samples nothing"),
    (["--method", "score-sde", "--corrector", "none", "--snr", "0.1"], "--corrector is none"),
    (["--method", "score-sde", "--snr", "-1"], "--snr must be"),
    (["--method", "ncsn", "--steps", "10"], "noise-conditional score model"),
])
def test_bad_options_are_one_line_and_exit_2(tiny_model_dir, tmp_path, capsys, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    _refused(["run", *argv, "--model", str(tiny_model_dir), "--tracking-uri", f"sqlite:///{tmp_path}/m.db", *Q],
             capsys, fragment)


def test_nll_bpd_on_a_model_without_a_score_sde_is_refused(scaled_linear_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused(["run", "--method", "ddim", "--steps", "2", "--model", str(scaled_linear_dir), "--tracking-uri",
              f"sqlite:///{tmp_path}/m.db", "--num-samples", "2", "--batch-size", "2", "--no-progress",
              "--metrics", "nll-bpd"], capsys, "beta_schedule 'scaled_linear'")


def test_nll_bpd_through_a_run_records_its_value_and_protocol(tiny_model_dir, tmp_path, monkeypatch):
    """The runner hands the metric its model; a few images at a loose tolerance keep it fast."""
    import json

    import metrics.likelihood as likelihood

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(likelihood, "IMAGES", 2)
    monkeypatch.setattr(likelihood, "RTOL", 1e-2)
    monkeypatch.setattr(likelihood, "ATOL", 1e-2)
    out = tmp_path / "run"
    assert main(["run", "--method", "ddim", "--steps", "2", "--model", str(tiny_model_dir), "--tracking-uri",
                 f"sqlite:///{tmp_path}/m.db", "--num-samples", "2", "--batch-size", "2", "--no-progress",
                 "--metrics", "nll-bpd", "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())["values"]
    config = json.loads((out / "config.json").read_text())
    assert math.isfinite(results["nll_bpd"]) and results["nll_nfe"] > 6
    assert config["protocol"]["metrics"]["nll-bpd"]["images"] == 2
    assert config["protocol"]["metrics"]["nll-bpd"]["rtol"] == 1e-2


@pytest.mark.parametrize("name", ["probability-flow", "score-sde", "ncsn"])
def test_card_options_and_catalog(name):
    import dataclasses

    from bench.catalog import METHODS

    cls = METHODS.get(name)
    entry = METHODS.entry(name)
    assert (cls.name, cls.summary, cls.paper) == (entry.name, entry.summary, entry.paper)
    assert cls.card.citation and cls.card.url.startswith("https://") and cls.card.reproduces and cls.claims
    for f in dataclasses.fields(cls.Args):
        assert f.metadata.get("help"), f"{name}: option {f.name} has no help"
    cls.parse_args({})
