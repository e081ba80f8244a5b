"""The real loading path, exercised on small checkpoints saved in the real formats."""

import pytest
import torch

from bench.errors import BenchError
from bench.models import load_model, load_pixel_diffusion
from tests.conftest import save_tiny_ddpm


def test_pipeline_layout_round_trip(tiny_model_dir):
    model = load_pixel_diffusion(str(tiny_model_dir))
    assert model.kind == "pixel-diffusion" and model.sample_shape == (3, 16, 16)
    assert model.scheduler_config["num_train_timesteps"] == 1000
    assert model.digest == load_pixel_diffusion(str(tiny_model_dir)).digest


def test_flat_layout_of_ddpm_cifar10_with_legacy_scheduler_keys(tmp_path):
    folder = save_tiny_ddpm(tmp_path / "flat", flat=True)
    model = load_model(str(folder))
    assert model.scheduler_config["num_train_timesteps"] == 1000
    assert model.scheduler_config["variance_type"] == "fixed_large"


def test_digest_changes_with_the_weights(tmp_path, tiny_model_dir):
    other = save_tiny_ddpm(tmp_path / "other", seed=1)
    assert load_pixel_diffusion(str(other)).digest != load_pixel_diffusion(str(tiny_model_dir)).digest


def test_corrupt_weights_file_is_one_line(tmp_path):
    folder = save_tiny_ddpm(tmp_path / "corrupt")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(BenchError, match="cannot load model") as info:
        load_pixel_diffusion(str(folder))
    assert "\n" not in str(info.value)


def test_missing_pieces_are_named(tmp_path):
    with pytest.raises(BenchError, match="does not exist"):
        load_model(str(tmp_path / "nowhere" / "deeper"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchError, match="not a diffusers UNet2DModel folder"):
        load_model(str(tmp_path / "empty"))


def test_hub_id_offline_says_what_to_download():
    with pytest.raises(BenchError, match=r"hf download google/ddpm-cifar10-32") as info:
        load_model("google/ddpm-cifar10-32")
    assert "\n" not in str(info.value)


def test_unknown_registered_name_suggests():
    with pytest.raises(BenchError, match="did you mean 'embedded-ddpm'"):
        load_model("embedded-ddp")


def test_embedded_model_is_committed_and_loads():
    model = load_model("embedded-ddpm")
    assert model.embedded and model.sample_shape == (3, 16, 16)
    assert sum(p.numel() for p in model.unet.parameters()) > 1_000_000
    assert not any(p.requires_grad for p in model.unet.parameters())
