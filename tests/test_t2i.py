"""The text-to-image model path: a StableDiffusionPipeline folder in SD-1.5's layout, loaded as SD-1.5 is."""

import json

import pytest
import torch

from bench.errors import BenchError
from bench.interfaces import TextToImageModel
from bench.models import EMBEDDED_WEIGHTS, load_model, load_text_to_image
from tests.tiny_t2i import save_tiny_t2i


def test_folder_has_sd15_layout(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
                 "scheduler/scheduler_config.json"):
        assert (tiny_dir / part).exists(), part
    scheduler = json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "PNDMScheduler" and scheduler["beta_schedule"] == "scaled_linear"
    assert scheduler["clip_sample"] is False and scheduler["steps_offset"] == 1


def test_loads_as_a_text_to_image_model(tiny_dir):
    model = load_model(str(tiny_dir))
    assert isinstance(model, TextToImageModel) and model.kind == "text-to-image"
    assert model.sample_shape == (3, 32, 32) and model.latent_shape == (4, 8, 8)
    assert model.tokenizer.model_max_length == 77
    assert model.digest == load_text_to_image(str(tiny_dir)).digest
    assert len(model.modules()) == 3


def test_round_trip_through_save_and_from_pretrained(tiny_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    first = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    first.save_pretrained(tmp_path / "again", safe_serialization=True)
    second = StableDiffusionPipeline.from_pretrained(tmp_path / "again", safety_checker=None, requires_safety_checker=False)
    for a, b in ((first.unet, second.unet), (first.vae, second.vae), (first.text_encoder, second.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = first.tokenizer(["a red circle"]).input_ids
    assert ids == second.tokenizer(["a red circle"]).input_ids
    out = [p(["a small red circle on a black background"], num_inference_steps=2, output_type="np",
             generator=torch.Generator().manual_seed(0)).images for p in (first, second)]
    assert (out[0] == out[1]).all()


def test_digest_changes_with_the_weights(tiny_dir, tmp_path):
    other = save_tiny_t2i(tmp_path / "other", seed=1)
    assert load_text_to_image(str(other)).digest != load_text_to_image(str(tiny_dir)).digest


def test_stable_diffusion_offline_is_one_line():
    with pytest.raises(BenchError, match="hf download stable-diffusion-v1-5/stable-diffusion-v1-5") as info:
        load_model("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert "\n" not in str(info.value)


def test_not_a_pipeline_folder(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    with pytest.raises(BenchError, match="not a StableDiffusionPipeline folder"):
        load_text_to_image(str(tmp_path))


@pytest.mark.skipif(not (EMBEDDED_WEIGHTS / "t2i" / "model_index.json").exists(), reason="embedded t2i not trained")
def test_embedded_model_is_committed_and_loads():
    model = load_model("embedded-t2i")
    assert model.embedded and model.sample_shape == (3, 32, 32) and model.latent_shape == (4, 8, 8)
    for part in ("vae", "unet"):
        assert (EMBEDDED_WEIGHTS / "t2i" / part / "RECIPE.json").exists()
    unet_params = sum(p.numel() for p in model.unet.parameters())
    assert 1e6 < unet_params < 4e6
