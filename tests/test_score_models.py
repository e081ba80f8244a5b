"""The score-based pixel variants (issue 15): Improved DDPM's hybrid loss and learned-variance sampling, the VE
score model's folder and denoising score matching, and how the other samplers treat both kinds of model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, ScoreSdeVePipeline, ScoreSdeVeScheduler, UNet2DModel

from bench.catalog import METHODS
from bench.denoiser import CountingDenoiser
from bench.errors import BenchError
from bench.interfaces import Batch
from bench.models import load_pixel_diffusion
from bench.recipes import score_models as sm

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(sample_size=8, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4)
CPU = torch.device("cpu")


def make(name, **options):
    cls = METHODS.get(name)
    return cls(cls.parse_args(options))


@pytest.fixture(scope="module")
def iddpm_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("iddpm")
    DDPMPipeline(unet=UNet2DModel(**TINY), scheduler=sm.iddpm_scheduler("squaredcos_cap_v2")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ve_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ve")
    unet = UNet2DModel(**{**TINY, "out_channels": 3, "time_embedding_type": "fourier"})
    ScoreSdeVePipeline(unet=unet, scheduler=ScoreSdeVeScheduler(**sm.NCSN_SCHEDULER_CONFIG)).save_pretrained(folder)
    return folder


# -- Improved DDPM's variational terms (section 3.1) ---------------------------------------------------------------


def test_the_bound_vanishes_where_the_model_is_the_posterior():
    """With the true noise and v = -1 (Sigma = beta-tilde) the model's p(x_{t-1} | x_t) is q(x_{t-1} | x_t, x_0):
    every KL term is 0; a wrong variance (v = +1: beta_t) or a wrong mean makes it positive."""
    scheduler = sm.iddpm_scheduler("squaredcos_cap_v2")
    terms = sm.VariationalTerms(scheduler)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([1, 2, 10, 999])
    xt = scheduler.add_noise(x0, noise, t)
    v = -torch.ones_like(x0)
    assert terms.bits(x0, xt, t, noise, v).abs().max() < 1e-4
    assert (terms.bits(x0, xt, t, noise, -v)[:3] > 1e-4).all()  # late, beta_t and beta-tilde_t nearly agree
    assert (terms.bits(x0, xt, t, noise + 0.1, v) > 1e-4).all()


def test_kl_is_the_gaussian_kl():
    g = torch.Generator().manual_seed(1)
    m1, m2, l1, l2 = (torch.randn(10, generator=g) for _ in range(4))
    ours = sm._normal_kl(m1, l1, m2, l2)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * l1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * l2).exp()))
    torch.testing.assert_close(ours, ref)


def test_decoder_bins_sum_to_one():
    """The discretized Gaussian decoder is a distribution over the 256 values of a pixel."""
    values = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, log_scale in ((0.3, -3.0), (-0.99, -5.0), (1.2, -1.0)):
        logp = sm.discretized_gaussian_log_likelihood(values, torch.tensor(mean, dtype=torch.float64),
                                                      torch.tensor(log_scale, dtype=torch.float64))
        assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-6)


def test_hybrid_loss_is_simple_plus_the_weighted_bound():
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY)
    scheduler = sm.iddpm_scheduler("linear")
    terms = sm.VariationalTerms(scheduler)
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    noise, t = torch.randn_like(x0), torch.tensor([0, 400])
    loss = sm.hybrid_loss(unet, terms, scheduler, x0, t, noise, 0.001)
    eps, v = unet(scheduler.add_noise(x0, noise, t), t).sample.chunk(2, dim=1)
    simple = torch.nn.functional.mse_loss(eps, noise)
    bound = terms.bits(x0, scheduler.add_noise(x0, noise, t), t, eps, v).mean()
    torch.testing.assert_close(loss, simple + bound)  # lambda T = 0.001 * 1000
    loss.backward()  # the bound's gradient reaches the variance channels only
    assert unet.conv_out.weight.grad[3:].abs().sum() > 0


def test_dsm_loss_is_zero_for_the_exact_score_of_a_point():
    """For data at a single point the score of x0 + sigma z is -z / sigma: denoising score matching's minimum, 0."""
    class ExactScore(torch.nn.Module):
        def forward(self, x, sigma):
            return type("Out", (), {"sample": -x / sigma.view(-1, 1, 1, 1) ** 2})()

    x0 = torch.zeros(3, 3, 4, 4)
    sigma = torch.tensor([0.01, 1.0, 50.0])
    z = torch.randn(x0.shape)
    assert float(sm.dsm_loss(ExactScore(), x0, sigma, z)) == pytest.approx(0.0, abs=1e-10)
    assert float(sm.dsm_loss(ExactScore(), x0 + 0.5, sigma, z)) > 0.01


# -- the folders and the samplers ------------------------------------------------------------------------------------


def test_learned_variance_model_loads_with_its_image_shape(iddpm_folder):
    model = load_pixel_diffusion(str(iddpm_folder), name="tiny-iddpm")
    assert model.kind == "pixel-diffusion" and model.sample_shape == (3, 8, 8)
    assert model.scheduler_config["variance_type"] == "learned_range"


def test_improved_ddpm_equals_the_ddpm_pipeline(iddpm_folder):
    """Learned variances over 10 linspace-respaced steps: the adapter's samples are DDPMPipeline's, drawn from the
    same generator (one sample, so the pipeline's single generator draws what the adapter's per-sample one does)."""
    model = load_pixel_diffusion(str(iddpm_folder), name="tiny-iddpm")
    method = make("improved-ddpm")
    method.check(model, 10)
    ours = method.generate(model, Batch((5,), 10), CountingDenoiser(model.unet, CPU))
    pipe = DDPMPipeline.from_pretrained(iddpm_folder)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    ref = pipe(batch_size=1, generator=torch.Generator().manual_seed(5), num_inference_steps=10,
               output_type="np").images
    ref = torch.from_numpy(ref).permute(0, 3, 1, 2) * 2 - 1
    torch.testing.assert_close(ours.clamp(-1, 1), ref, atol=1e-4, rtol=0)


def test_variances_change_the_samples(iddpm_folder):
    model = load_pixel_diffusion(str(iddpm_folder), name="tiny-iddpm")
    out = {}
    for variance in ("learned", "fixed-small", "fixed-large"):
        method = make("improved-ddpm", variance=variance)
        assert method.protocol(model)["scheduler"]["variance_type"] == sm_variance(variance)
        out[variance] = method.generate(model, Batch((1, 2), 10), CountingDenoiser(model.unet, CPU))
    assert not torch.allclose(out["learned"], out["fixed-small"])
    assert not torch.allclose(out["fixed-small"], out["fixed-large"])


def sm_variance(variance: str) -> str:
    return {"learned": "learned_range", "fixed-small": "fixed_small", "fixed-large": "fixed_large"}[variance]


@pytest.mark.parametrize("name", ["ddim", "dpmsolver++", "euler", "ddpm"])
def test_other_samplers_read_the_prediction_of_a_learned_variance_model(iddpm_folder, name):
    """A solver takes the first three channels (DiTPipeline's split); ddpm keeps the model's learned variances."""
    model = load_pixel_diffusion(str(iddpm_folder), name="tiny-iddpm")
    method = make(name)
    method.check(model, 4)
    out = method.generate(model, Batch((1, 2), 4), CountingDenoiser(model.unet, CPU))
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


def test_learned_variance_needs_a_model_that_learns_them(tmp_path):
    torch.manual_seed(0)
    DDPMPipeline(unet=UNet2DModel(**{**TINY, "out_channels": 3}), scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    model = load_pixel_diffusion(str(tmp_path), name="tiny")
    with pytest.raises(BenchError, match="--variance learned needs a model that predicts its variances"):
        make("improved-ddpm").check(model, 10)
    make("improved-ddpm", variance="fixed-large").check(model, 10)


def test_bad_variance_is_refused():
    with pytest.raises(ValueError, match="variance"):
        METHODS.get("improved-ddpm").parse_args({"variance": "learnt"})


def test_ve_folder_loads_as_a_score_model_that_ddpm_samplers_refuse(ve_folder):
    model = load_pixel_diffusion(str(ve_folder), name="tiny-ve")
    assert model.kind == "score-ve" and model.scheduler_config["sigma_max"] == 50.0
    for name in ("ddim", "improved-ddpm"):
        with pytest.raises(BenchError, match="variance-exploding score model"):
            make(name).check(model, 10)


@pytest.mark.parametrize("recipe", [sm.NcsnRecipe(steps=2, batch_size=4, warmup_steps=1),
                                    sm.IddpmRecipe(steps=2, batch_size=4, warmup_steps=1)])
def test_recipes_save_loadable_folders(tmp_path, recipe):
    recipe = dataclasses.replace(recipe, threads=1)
    record = sm.train(tmp_path, recipe, progress=False)
    model = load_pixel_diffusion(str(tmp_path), name="trained")
    assert model.kind == ("score-ve" if recipe.name == "ncsn" else "pixel-diffusion")
    assert record["recipe"]["steps"] == 2 and (tmp_path / "RECIPE.json").exists()
