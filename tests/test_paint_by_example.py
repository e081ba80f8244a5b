"""Paint-by-Example (Yang et al. 2023): the exemplar data set, the CLIP tower's conversion, the pipeline folder, the
adapter against diffusers' PaintByExamplePipeline on a tiny random folder, and its bad input (one line, exit 2)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.denoiser import CountingDenoiser, sample_seed
from bench.errors import BenchError
from bench.exemplars import EXEMPLAR_SEED, EXEMPLAR_TRAIN_SEED, EmbeddedExemplars, exemplar_edit, training_pairs
from bench.interfaces import Batch
from bench.models import load_model
from tests.tiny_t2i import TINY_UNET, TINY_VAE

TINY_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                   patch_size=8, hidden_act="quick_gelu", projection_dim=16)


def method(**args):
    from bench.catalog import METHODS

    cls = METHODS.get("paint-by-example")
    return cls(cls.parse_args(args))


def save_tiny_paint_by_example(folder: Path, seed: int = 0) -> Path:
    """A tiny random PaintByExamplePipeline folder in the real layout: a 9-channel UNet, a CLIP vision tower."""
    from diffusers import AutoencoderKL, PaintByExamplePipeline, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder
    from transformers import CLIPVisionConfig

    from bench.recipes.paint_by_example import feature_extractor

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**TINY_UNET, "in_channels": 9})
    with torch.no_grad():  # a random UNet's output is tiny; make guidance visibly matter
        for p in unet.conv_out.parameters():
            p.mul_(50)
    encoder = PaintByExampleImageEncoder(CLIPVisionConfig(**TINY_VISION), proj_size=TINY_UNET["cross_attention_dim"])
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    pipe = PaintByExamplePipeline(vae=AutoencoderKL(**TINY_VAE), image_encoder=encoder, unet=unet, scheduler=scheduler,
                                  safety_checker=None, feature_extractor=feature_extractor(32))
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_paint_by_example(tmp_path_factory.mktemp("tiny-pbe") / "pbe")


# -- the data set -------------------------------------------------------------------------------------------------
def test_exemplar_items_replace_the_object_inside_its_box_with_the_exemplars_attributes():
    items = EmbeddedExemplars().edits(12)
    prompts = EmbeddedExemplars().prompts(12)
    for i, (it, prompt) in enumerate(zip(items, prompts)):
        e = exemplar_edit(i)
        old, new = e.source.objects[0], e.target.objects[0]
        assert (new.shape, new.color) == e.exemplar[:2] and new.shape != old.shape and new.color != old.color
        assert (new.cx, new.cy, new.size, e.target.background) == (old.cx, old.cy, old.size, e.source.background)
        differs = (it.source != it.target).any(-1)
        assert differs.any() and (it.mask[differs] == 1).all()  # every changed pixel is in the box
        rows, cols = np.nonzero(it.mask)
        assert it.mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()  # a box
        assert it.exemplar.shape == (32, 32, 3) and it.exemplar.dtype == np.uint8
        assert new.color not in it.target_prompt and new.shape in it.target_prompt  # the class noun, no color
        assert prompt.text == it.target_prompt and prompt.attributes["objects"][0]["color"] == new.color
    assert EXEMPLAR_SEED != EXEMPLAR_TRAIN_SEED
    pairs = training_pairs(6)
    assert pairs["scene"].shape == pairs["exemplar"].shape == (6, 32, 32, 3) and pairs["mask"].shape == (6, 32, 32)
    assert not any(np.array_equal(a, b.source) for a in pairs["scene"] for b in items)


# -- the image tower's conversion ------------------------------------------------------------------------------------
def test_converted_clip_tower_pools_what_clip_anytorch_gives():
    from bench.embedded.eval_clip import build_from_state_dict, load_state_dict_file
    from bench.recipes.paint_by_example import CLIP_WEIGHTS, image_encoder_from_clip

    state = load_state_dict_file(CLIP_WEIGHTS)
    clip = build_from_state_dict(state)
    encoder = image_encoder_from_clip(state, proj_size=64)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    v = clip.visual
    with torch.no_grad():  # clip-anytorch's VisionTransformer.forward up to ln_post(x[:, 0, :]) (before its proj)
        h = v.conv1(x).flatten(2).transpose(1, 2)
        h = torch.cat([v.class_embedding.expand(len(x), 1, -1), h], 1) + v.positional_embedding
        h = v.transformer(v.ln_pre(h).permute(1, 0, 2)).permute(1, 0, 2)
        expected = v.ln_post(h[:, 0])
        assert torch.allclose(expected @ v.proj, clip.encode_image(x).float(), atol=1e-5)  # the same forward as clip's
        pooled = encoder.model(pixel_values=x).pooler_output
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


def test_widened_unet_is_the_base_unet_at_step_0():
    from diffusers import UNet2DConditionModel

    from bench.recipes.paint_by_example import widened_unet

    torch.manual_seed(0)
    base = UNet2DConditionModel(**TINY_UNET)
    wide = widened_unet(base)
    g = torch.Generator().manual_seed(1)
    z, other = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 8, 8, generator=g)
    ctx = torch.randn(2, 1, TINY_UNET["cross_attention_dim"], generator=g)
    with torch.no_grad():
        torch.testing.assert_close(wide(torch.cat([z, other], 1), 10, ctx).sample, base(z, 10, ctx).sample,
                                   atol=1e-6, rtol=0)


# -- the folder and the adapter against diffusers ------------------------------------------------------------------
def test_adapter_equals_paint_by_example_pipeline(tiny_dir):
    model = load_model(str(tiny_dir))
    assert model.kind == "paint-by-example" and model.image_encoder.proj_out.out_features == 16
    items = [dataclasses.replace(it, exemplar=np.ascontiguousarray(it.exemplar[4:28, 2:30])) if i == 1 else it  # a non-square exemplar
             for i, it in enumerate(EmbeddedExemplars().edits(3))]
    seeds = [sample_seed(0, i) for i in range(3)]
    m = method()
    m.check(model, 6)
    out = m.generate(model, Batch(tuple(seeds), 6, edits=tuple(items)), CountingDenoiser(model.unet, torch.device("cpu")))
    ref = model.pipeline(image=[Image.fromarray(it.source) for it in items],
                         mask_image=[Image.fromarray((it.mask * 255).astype(np.uint8)) for it in items],
                         example_image=[Image.fromarray(it.exemplar) for it in items], num_inference_steps=6,
                         generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt").images
    torch.testing.assert_close(out / 2 + 0.5, ref.float(), atol=1e-4, rtol=0)
    # sample i depends on (seed i, item i) alone; guidance matters
    one = m.generate(model, Batch((seeds[2],), 6, edits=(items[2],)), CountingDenoiser(model.unet, torch.device("cpu")))
    torch.testing.assert_close(one[0], out[2], atol=1e-5, rtol=0)
    flat = method(guidance=1.0).generate(model, Batch(tuple(seeds), 6, edits=tuple(items)),
                                         CountingDenoiser(model.unet, torch.device("cpu")))
    assert (flat - out).abs().max() > 1e-3


# -- bad input --------------------------------------------------------------------------------------------------------
def test_bad_exemplars_are_one_line(tmp_path):
    from methods.paint_by_example import check_items

    item = EmbeddedExemplars().edits(1)[0]
    for bad, fragment in [(None, "has none"), (item.exemplar[..., 0], "HxWx3 uint8"),
                          (item.exemplar.astype(np.float32), "HxWx3 uint8"), ("cat.png", "HxWx3 uint8")]:
        with pytest.raises(BenchError, match=fragment) as info:
            check_items([dataclasses.replace(item, exemplar=bad)], "the batch's")
        assert "\n" not in str(info.value)
    (tmp_path / "notes.txt").write_text("not an image\n")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    for path, fragment in [(tmp_path / "notes.txt", "not an image"), (tmp_path / "broken.png", "not an image"),
                           (tmp_path / "missing.png", "does not exist")]:
        with pytest.raises(BenchError, match=fragment) as info:
            method(exemplar=str(path))
        assert "\n" not in str(info.value)
    with pytest.raises(BenchError, match="guidance"):
        method(guidance=0.5)


def test_cli_refuses_bad_exemplars_and_data_sets_without_them_in_one_line(tiny_dir, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from bench.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = ["run", "--model", str(tiny_dir), "--method", "paint-by-example", "--tracking-uri", uri, "--steps", "2",
           "--num-samples", "2", "--no-progress"]
    for argv, fragment in [(run + ["--exemplar", str(tmp_path / "notes.txt")], "is not an image"),
                           (run + ["--dataset", "embedded-edits"], "needs an exemplar image per item")]:
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bench: error: ") and fragment in lines[0], lines
    db = tmp_path / "mlflow.db"
    if db.exists():  # no run was created for bad input
        client = MlflowClient(uri)
        assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_public_checkpoint_offline_is_one_line():  # tests run offline (conftest)
    with pytest.raises(BenchError, match="hf download Fantasy-Studio/Paint-by-Example") as info:
        load_model("Fantasy-Studio/Paint-by-Example")
    assert "\n" not in str(info.value)
