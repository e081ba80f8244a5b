"""CLD and gDDIM: the closed-form kernel against matrix exponentials, K_t = R_t, gDDIM's exactness on a Dirac data
distribution where Euler is not exact, the adapter on a tiny random CLD folder, bad input."""

import json

import numpy as np
import pytest
import torch

from bench import cld as cld_lib
from bench.cld import CLD
from bench.errors import BenchError
from bench.interfaces import Batch
from bench.models import load_cld

SDE = CLD()
TIMES = [1e-3, 0.01, 0.1, 0.37, 1.0]


def van_loan(cld, t):
    """Sigma_t by Van Loan's block matrix exponential (an independent check of the closed form)."""
    F, Q = torch.tensor(cld.F()), torch.tensor(cld.GGT())
    block = torch.zeros(4, 4, dtype=torch.float64)
    block[:2, :2], block[:2, 2:], block[2:, 2:] = -F, Q, F.T
    e = torch.linalg.matrix_exp(block * t)
    psi = e[2:, 2:].T
    noise = psi @ e[:2, 2:]
    return (psi @ torch.tensor(cld.sigma0()) @ psi.T + noise).numpy(), psi.numpy()


@pytest.mark.parametrize("t", TIMES)
def test_closed_form_kernel_equals_matrix_exponentials(t):
    cov, psi = van_loan(SDE, t)
    assert np.allclose(SDE.psi(0.0, t), psi, rtol=1e-10, atol=1e-12)
    assert np.allclose(SDE.cov(t), cov, rtol=1e-8, atol=1e-12)
    assert np.allclose(SDE.psi(0.3, 0.3 + t) @ SDE.psi(0.3 + t, 0.3), np.eye(2), atol=1e-10)


def test_kernel_reaches_the_prior_and_starts_at_sigma0():
    assert np.allclose(SDE.cov(0.0), SDE.sigma0(), atol=1e-15)
    assert np.allclose(SDE.cov(1.0), np.diag([1.0, SDE.mass]), atol=2e-3)  # N(0, 1) x N(0, M) at T
    assert abs(SDE.Gamma ** 2 - 4 * SDE.mass) < 1e-12  # critical damping


@pytest.mark.parametrize("t", TIMES)
def test_r_is_a_square_root_of_sigma(t):
    r = SDE.R(t)
    assert np.allclose(r @ r.T, SDE.cov(t), rtol=1e-5, atol=1e-9)


def test_r_is_not_the_cholesky_factor():
    """gDDIM's point: R_t is not CLD's lower-triangular L_t (K = L is not exact for a Dirac)."""
    assert abs(SDE.R(0.5)[0, 1]) > 1e-3


def dirac_start(seed=0, shape=(2, 3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn((shape[0], 2 * shape[1], *shape[2:]), generator=g, dtype=torch.float64)
    return x0, eps


def exact(cld, x0, eps, t):
    return cld_lib.data_mean(cld, x0, t) + cld_lib.apply(cld.R(t), eps)


@pytest.mark.parametrize("steps", [1, 3])
def test_gddim_is_exact_for_a_dirac_where_euler_is_not(steps):
    x0, eps = dirac_start()
    ts = cld_lib.time_grid(SDE, steps)
    u_T = exact(SDE, x0, eps, ts[0])
    target = exact(SDE, x0, eps, ts[-1])
    fn = cld_lib.dirac_eps(SDE, x0)
    gddim = cld_lib.solve(fn, u_T, ts, cld_lib.gddim_coefficients(SDE, ts))
    euler = cld_lib.solve(fn, u_T, ts, cld_lib.euler_coefficients(SDE, ts))
    assert (gddim - target).abs().max() < 1e-4
    assert (euler - target).abs().max() > 0.1
    assert (gddim[:, :3] - x0).abs().max() < 0.05  # at t_min the sample is the data point


def test_gddim_step_agrees_with_a_fine_ode_solution():
    """Independent of R's identity: Euler with many small steps on the probability-flow ODE converges to gDDIM's one
    step (both from the same u_T)."""
    x0, eps = dirac_start(1, (1, 3, 2, 2))
    fn = cld_lib.dirac_eps(SDE, x0)
    one = cld_lib.time_grid(SDE, 1)
    u_T = exact(SDE, x0, eps, one[0])
    gddim = cld_lib.solve(fn, u_T, one, cld_lib.gddim_coefficients(SDE, one))
    errors = []
    for n in (500, 2000):
        ts = cld_lib.time_grid(SDE, n)
        errors.append(float((cld_lib.solve(fn, u_T, ts, cld_lib.euler_coefficients(SDE, ts)) - gddim).abs().max()))
    assert errors[1] < 0.02 and errors[1] < errors[0] / 2  # first order: 4x the steps, about a quarter the error


def test_training_perturbation_matches_the_sampler_parameterization():
    """u_t = mean + R_t eps (the recipe's perturb) and the Dirac eps of the sampler invert each other."""
    from bench.recipes.cld import perturb

    x0, eps = dirac_start(2)
    x0, eps = x0.float(), eps.float()
    t = torch.tensor([0.002, 0.6], dtype=torch.float64)
    u = perturb(SDE, x0, t, eps)
    for i in range(2):
        back = cld_lib.dirac_eps(SDE, x0[i : i + 1])(u[i : i + 1].double(), float(t[i]), 0)
        assert torch.allclose(back.float(), eps[i : i + 1], atol=1e-3)


def test_euler_maruyama_noise_acts_on_v_only():
    ts = cld_lib.time_grid(SDE, 4)
    mean, eps_m = cld_lib.euler_maruyama_coefficients(SDE, ts)
    _, eps_half = cld_lib.euler_coefficients(SDE, ts)
    assert np.allclose(eps_m, 2 * eps_half) and np.allclose(eps_m[:, 0], 0.0)  # G G^T acts on v
    assert (cld_lib.noise_scales(SDE, ts) > 0).all()


def test_config_round_trip_and_bad_constants(tmp_path):
    SDE.save(tmp_path)
    assert CLD.from_dict(json.loads((tmp_path / "cld.json").read_text())) == SDE
    with pytest.raises(ValueError, match="unknown CLD constants"):
        CLD.from_dict({"m_inv": 4.0, "mass_inverse": 2.0})
    with pytest.raises(ValueError, match="out of range"):
        CLD.from_dict({"beta": -1.0})


# -- the adapter on a tiny random CLD folder ------------------------------------------------------------------------------
TINY = dict(sample_size=8, in_channels=6, out_channels=6, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8, norm_num_groups=4)


def save_tiny_cld(folder, **config):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(**{**TINY, **config}).save_pretrained(folder / "unet", safe_serialization=True)
    SDE.save(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_cld(tmp_path_factory):
    return load_cld(str(save_tiny_cld(tmp_path_factory.mktemp("tiny-cld"))))


def method(**args):
    from bench.catalog import METHODS

    cls = METHODS.get("gddim")
    return cls(cls.parse_args(args))


class DiracDenoiser:
    """A stand-in network: the exact eps of a Dirac data distribution at x0 (timestep input 999 t)."""

    def __init__(self, x0):
        self.fn, self.calls = cld_lib.dirac_eps(SDE, x0), 0

    def __call__(self, u, timestep):
        self.calls += 1
        return self.fn(u.double(), float(timestep[0]) / 999.0, 0).float()


def test_adapter_recovers_a_dirac_in_one_step(tiny_cld):
    x0 = torch.rand(1, 3, 8, 8) * 1.6 - 0.8
    m = method()
    denoiser = DiracDenoiser(x0.double())
    out = m.generate(tiny_cld, Batch((3, 4), 1), denoiser)
    assert denoiser.calls == 1 and out.shape == (2, 3, 8, 8)
    assert (out - x0).abs().max() < 0.05
    euler = method(solver="euler").generate(tiny_cld, Batch((3, 4), 1), DiracDenoiser(x0.double()))
    assert (euler - x0).abs().max() > 0.2


def test_adapter_on_a_random_network(tiny_cld):
    from bench.denoiser import CountingDenoiser

    def run(**args):
        d = CountingDenoiser(tiny_cld.unet, torch.device("cpu"))
        return method(**args).generate(tiny_cld, Batch((1, 2, 3), 5), d), d

    a, d = run()
    assert a.shape == (3, 3, 8, 8) and torch.isfinite(a).all() and d.calls == 5 and d.evaluations == 15
    assert torch.equal(a, run()[0])  # deterministic
    assert torch.equal(a[1:2], method().generate(tiny_cld, Batch((2,), 5),
                                                 CountingDenoiser(tiny_cld.unet, torch.device("cpu"))))
    assert not torch.allclose(a, run(solver="euler-maruyama")[0])
    assert method().protocol(tiny_cld)["sde"]["m_inv"] == 4.0


def test_cld_folder_errors(tmp_path):
    with pytest.raises(BenchError, match="not a CLD model folder"):
        (tmp_path / "empty").mkdir()
        load_cld(str(tmp_path / "empty"))
    folder = save_tiny_cld(tmp_path / "three", out_channels=3)
    with pytest.raises(BenchError, match="in_channels = out_channels"):
        load_cld(str(folder))
    bad = save_tiny_cld(tmp_path / "bad")
    (bad / "cld.json").write_text('{"beta": "fast"}')
    with pytest.raises(BenchError, match="not a valid CLD config"):
        load_cld(str(bad))


def test_bad_input_exit_2(tmp_path, monkeypatch, capsys, tiny_cld):
    from bench.cli.main import main

    monkeypatch.chdir(tmp_path)
    for args, message in ((["--model", "embedded-ddpm"], "critically-damped"),
                          (["--model", tiny_cld.source, "--solver", "heun"], "--solver must be one of")):
        rc = main(["run", "--method", "gddim", "--dataset", "shapes16", "--num-samples", "128", "--steps", "3",
                   "--no-progress", *args])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("\n") == 1, err
    from tests.test_latent_diffusion import mlflow_runs

    assert not mlflow_runs(tmp_path)  # bad input is caught before an MLflow run exists


def test_missing_embedded_cld_says_how_to_train_it(tmp_path, monkeypatch):
    import bench.models as models

    monkeypatch.setattr(models, "EMBEDDED_WEIGHTS", tmp_path)
    with pytest.raises(BenchError, match="bench embedded train cld"):
        models.resolve_folder(str(tmp_path / "cld"))
