"""Latent against pixel diffusion (Rombach et al. 2022): the pixel text-to-image model in IFPipeline's layout, the one
text-to-image loop on it against IFPipeline.__call__, the FLOP accounting of equal compute, bad input."""

import pytest
import torch

from bench.denoiser import CountingDenoiser
from bench.errors import BenchError
from bench.interfaces import Batch
from bench.models import EMBEDDED_WEIGHTS, load_model, resolve_folder
from tests.tiny_t2i import TINY_TEXT

PROMPTS = ["a small red circle on a black background", "a large blue square on a white background"]
SEEDS = [5, 6]
TINY_PIXEL_UNET = dict(
    sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
)


def save_tiny_if(folder, seed=0, out_channels=3):
    from bench.embedded.t2i import build_text_encoder
    from bench.recipes.ldm import build_pixel_unet, save_if_pipeline

    torch.manual_seed(seed)
    unet = build_pixel_unet({**TINY_PIXEL_UNET, "out_channels": out_channels})
    with torch.no_grad():  # a random UNet's output is tiny; make guidance visibly matter
        for p in unet.conv_out.parameters():
            p.mul_(50)
    return save_if_pipeline(folder, build_text_encoder(TINY_TEXT), unet)


@pytest.fixture(scope="module")
def tiny_if_dir(tmp_path_factory):
    return save_tiny_if(tmp_path_factory.mktemp("tiny-if"))


@pytest.fixture(scope="module")
def tiny_if(tiny_if_dir):
    return load_model(str(tiny_if_dir))


def method(name, **args):
    from bench.catalog import METHODS

    cls = METHODS.get(name)
    return cls(cls.parse_args(args))


def generate(model, m, steps=4):
    denoiser = CountingDenoiser(model.unet, torch.device("cpu"))
    return m.generate(model, Batch(tuple(SEEDS), steps, prompts=tuple(PROMPTS)), denoiser), denoiser


def test_pixel_model_loads_as_an_if_pipeline(tiny_if_dir, tiny_if):
    from diffusers import IFPipeline

    assert tiny_if.kind == "text-to-image-pixel" and tiny_if.vae is None
    assert tiny_if.unet.config.out_channels == 6  # IF's layout: the noise, then the (here unused) variance half
    assert tiny_if.latent_shape == tiny_if.sample_shape == (3, 8, 8)
    assert isinstance(tiny_if.pipeline, IFPipeline)
    assert tiny_if.modules() == [tiny_if.unet, tiny_if.text_encoder]
    index = (tiny_if_dir / "model_index.json").read_text()
    assert '"IFPipeline"' in index and '"CLIPTextModel"' in index
    assert (tiny_if_dir / "tokenizer" / "vocab.json").exists() and (tiny_if_dir / "tokenizer" / "merges.txt").exists()


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_loop_equals_if_pipeline(tiny_if, guidance):
    """The one text-to-image loop on a pixel model gives IFPipeline.__call__'s images (same DDIM scheduler, noise)."""
    m = method("latent-diffusion", guidance=guidance)
    ours, denoiser = generate(tiny_if, m)
    pipe = tiny_if.pipeline
    pipe.scheduler = m.make_scheduler(tiny_if)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    reference = pipe(PROMPTS, num_inference_steps=4, generator=gens, output_type="pt", clean_caption=False,
                     guidance_scale=guidance).images
    assert ours.shape == (2, 3, 8, 8)
    assert torch.allclose(ours, reference.clamp(-1, 1), atol=1e-4), (ours - reference).abs().max()
    assert denoiser.evaluations == 4 * len(SEEDS) * (2 if guidance != 1.0 else 1)


def test_guidance_changes_pixel_samples(tiny_if):
    guided, _ = generate(tiny_if, method("latent-diffusion", guidance=4.0))
    plain, _ = generate(tiny_if, method("latent-diffusion", guidance=1.0))
    assert not torch.allclose(guided, plain, atol=1e-3)


def test_learned_variance_channels_are_left_out(tmp_path, tiny_if):
    """A UNet that also predicts IF's learned variance (6 channels): the sampler uses the noise, its first half."""
    model = load_model(str(save_tiny_if(tmp_path / "if6", out_channels=6)))
    assert model.sample_shape == (3, 8, 8)
    six, _ = generate(model, method("latent-diffusion", guidance=4.0))
    assert six.shape == (2, 3, 8, 8) and torch.isfinite(six).all()
    # the same noise channels with another variance half: the samples do not change
    with torch.no_grad():
        model.unet.conv_out.weight[3:].mul_(-3.0)
        model.unet.conv_out.bias[3:].add_(1.0)
    again, _ = generate(model, method("latent-diffusion", guidance=4.0))
    assert torch.allclose(six, again, atol=1e-6)


def test_widened_unet_predicts_the_same_noise():
    from bench.recipes.ldm import build_pixel_unet, with_variance_channels

    torch.manual_seed(0)
    unet = build_pixel_unet(TINY_PIXEL_UNET).eval()
    wide = with_variance_channels(unet)
    x, t, h = torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 16)
    with torch.no_grad():
        a, b = unet(x, t, encoder_hidden_states=h).sample, wide(x, t, encoder_hidden_states=h).sample
    assert b.shape == (2, 6, 8, 8) and torch.equal(b[:, :3], a) and not b[:, 3:].any()
    assert with_variance_channels(wide) is wide


# -- equal compute ---------------------------------------------------------------------------------------------------------
def test_latent_step_flops_include_the_vae_encoding():
    from bench.embedded.t2i import build_vae
    from bench.recipes.ldm import latent_step_flops
    from tests.tiny_t2i import TINY_VAE

    vae = build_vae(TINY_VAE)
    one, two = latent_step_flops(1, vae=vae), latent_step_flops(2, vae=vae)
    assert one["vae_encode"] > 0 and one["total"] == one["vae_encode"] + one["text_encoder_and_unet"]
    assert two["vae_encode"] == 2 * one["vae_encode"]  # counted per image of the step's batch
    assert two["text_encoder_and_unet"] == 2 * one["text_encoder_and_unet"]


def test_pixel_steps_match_the_latent_budget():
    from bench.recipes.ldm import PIXEL_UNET_CONFIG, matched_steps, pixel_step_flops

    one = pixel_step_flops(1, {**PIXEL_UNET_CONFIG, "sample_size": 8})
    assert one["total"] > 0
    assert matched_steps(10 * one["total"], one["total"]) == 10
    assert matched_steps(10 * one["total"] + one["total"] - 1, one["total"]) == 10  # never more FLOPs than the latent
    assert matched_steps(1, one["total"]) == 1


def test_committed_budgets_are_equal_in_flops():
    """The committed pair: the pixel model's recorded FLOPs are the latent model's, within one pixel step."""
    import json

    paths = [EMBEDDED_WEIGHTS / name / "unet" / "RECIPE.json" for name in ("t2i-budget", "pixel-t2i")]
    if not all(p.exists() for p in paths):
        pytest.skip("the budget models are not trained here")
    latent, pixel = (json.loads(p.read_text())["training_flops"] for p in paths)
    assert pixel["matched_to_latent_total"] == latent["total"]
    assert 0 <= latent["total"] - pixel["total"] < pixel["per_step"]["total"]
    assert latent["per_step"]["vae_encode"] > 0


# -- bad input ---------------------------------------------------------------------------------------------------------------
def bad_run(args, tmp_path, monkeypatch, capsys):
    from bench.cli.main import main

    monkeypatch.chdir(tmp_path)
    rc = main(["run", *args, "--num-samples", "128", "--steps", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not mlflow_runs(tmp_path)  # bad input is caught before an MLflow run exists
    return err


def mlflow_runs(folder):
    from mlflow.tracking import MlflowClient

    if not (folder / "mlflow.db").exists():
        return []
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_pixel_sampler_refuses_a_pixel_text_to_image_model(tiny_if_dir, tmp_path, monkeypatch, capsys):
    err = bad_run(["--method", "ddim", "--model", str(tiny_if_dir), "--dataset", "shapes16"], tmp_path, monkeypatch,
                  capsys)
    assert "text-to-image-pixel" in err


def test_latent_diffusion_refuses_a_pixel_ddpm(tmp_path, monkeypatch, capsys):
    err = bad_run(["--method", "latent-diffusion", "--model", "embedded-ddpm", "--dataset", "shapes16"], tmp_path,
                  monkeypatch, capsys)
    assert "latent-diffusion" in err and "pixel-diffusion" in err


def test_missing_budget_models_say_how_to_train_them(tmp_path, monkeypatch):
    import bench.models as models

    monkeypatch.setattr(models, "EMBEDDED_WEIGHTS", tmp_path)
    for name in ("pixel-t2i", "t2i-budget"):
        with pytest.raises(BenchError, match=f"bench embedded train {name}"):
            resolve_folder(str(tmp_path / name))


def test_a_stable_diffusion_folder_is_not_an_if_pipeline(tmp_path):
    from bench.models import load_pixel_text_to_image
    from tests.tiny_t2i import save_tiny_t2i

    folder = save_tiny_t2i(tmp_path / "sd")
    with pytest.raises(BenchError, match="not an IFPipeline folder"):
        load_pixel_text_to_image(str(folder))
