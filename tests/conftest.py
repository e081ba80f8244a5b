"""Shared fixtures: a tiny pixel DDPM saved in the real diffusers layout, and an isolated environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TINY_UNET = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
    norm_num_groups=4,
)


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory):
    """No network, a private cache, and single-threaded-friendly torch for every test."""
    cache = tmp_path_factory.mktemp("cache")
    old = dict(os.environ)
    os.environ["DIFFBENCH_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["MLFLOW_LOGGING_LEVEL"] = "WARNING"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.clear()
    os.environ.update(old)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors: faster than two threads fighting over a shared CPU, above
    all beside another job (restored after the module). Use: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny_ddpm(folder: Path, seed: int = 0, flat: bool = False) -> Path:
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from bench.embedded.pixel_ddpm import SCHEDULER_CONFIG

    torch.manual_seed(seed)
    unet = UNet2DModel(**TINY_UNET)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    if flat:  # the layout of google/ddpm-cifar10-32: everything at the root, legacy scheduler keys
        import json

        unet.save_pretrained(folder, safe_serialization=True)
        config = {"_class_name": "GaussianDDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
                  "beta_start": 0.0001, "timesteps": 1000, "variance_type": "fixed_large"}
        (folder / "scheduler_config.json").write_text(json.dumps(config))
    else:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_ddpm(tmp_path_factory.mktemp("tiny-ddpm"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from bench.models import load_pixel_diffusion

    return load_pixel_diffusion(str(tiny_model_dir), name="tiny")


# tiny SDXL, SD3 and FLUX folders in their pipelines' own layouts (tests/tiny_families.py), built once per session
@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    from tests.tiny_families import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory):
    from tests.tiny_families import save_tiny_sd3

    return save_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory):
    from tests.tiny_families import save_tiny_flux

    return save_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def flux_dev_dir(tmp_path_factory):
    from tests.tiny_families import save_tiny_flux

    return save_tiny_flux(tmp_path_factory.mktemp("tiny-flux-dev"), dev=True)


# the tiny random StableDiffusionPipeline (tests/tiny_t2i.py) in SD's folder format, once per test module; a module
# that needs another tiny text-to-image model defines its own tiny_dir / tiny
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.tiny_t2i import save_tiny_t2i

    return save_tiny_t2i(tmp_path_factory.mktemp("tiny-t2i"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from bench.models import load_model

    return load_model(str(tiny_dir))
