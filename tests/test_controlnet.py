"""ControlNet (issue 18): the adapter against StableDiffusionControlNetPipeline, zero convolutions keep the base, the
embedded-controls data set, the control-iou metric, and the bad inputs (one line, exit 2, no run)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from bench.cli.main import main
from bench.controls import CONTROL_SEED, EmbeddedControls, control_image
from bench.denoiser import CountingDenoiser
from bench.embedded.shapes import make_scenes, render
from bench.errors import BenchError
from bench.interfaces import Batch, EditItem
from metrics.control import iou, segment, condition_masks

pytestmark = pytest.mark.usefixtures("one_thread")
SEEDS = (11, 22)


@pytest.fixture(scope="module")
def tiny_controlnet(tiny, tmp_path_factory):
    """A ControlNetModel of the tiny UNet in the real folder format, its zero convolutions made non-zero (a trained
    one's are): the condition then changes the images."""
    from methods.controlnet import init_controlnet

    net = init_controlnet(tiny.unet, 4)
    torch.manual_seed(1)
    with torch.no_grad():
        for block in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            for p in block.parameters():
                p.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("controlnet")
    net.save_pretrained(folder, safe_serialization=True)
    return folder


def method(**args):
    from bench.catalog import METHODS

    cls = METHODS.get("controlnet")
    return cls(cls.parse_args(args))


def items(n=2):
    return EmbeddedControls().edits(n)


def generate(model, m, its, steps=3):
    batch = Batch(SEEDS[: len(its)], steps, prompts=tuple(it.target_prompt for it in its), edits=tuple(its))
    return m.generate(model, batch, CountingDenoiser(model.unet, torch.device("cpu")))


def test_equals_stable_diffusion_controlnet_pipeline(tiny, tiny_controlnet):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from diffusers.utils.torch_utils import randn_tensor

    its = items()
    m = method(controlnet=str(tiny_controlnet), conditioning_scale=0.7)
    m.check(tiny, 3)
    ours = generate(tiny, m, its)
    p = tiny.pipeline
    pipe = StableDiffusionControlNetPipeline(
        vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=p.unet,
        controlnet=ControlNetModel.from_pretrained(tiny_controlnet, use_safetensors=True),
        scheduler=m.make_scheduler(tiny), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = randn_tensor((len(its), *tiny.latent_shape), generator=[torch.Generator().manual_seed(s) for s in SEEDS])
    control = torch.from_numpy(np.stack([it.control for it in its])).permute(0, 3, 1, 2).float() / 255
    reference = pipe([it.target_prompt for it in its], image=control, height=32, width=32, num_inference_steps=3,
                     guidance_scale=7.5, latents=latents, controlnet_conditioning_scale=0.7,
                     output_type="pt").images * 2 - 1
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()
    base = generate(tiny, method(conditioning_scale=0.0), its)
    assert (ours - base).abs().max() > 1e-2  # the condition matters: the comparison above can fail


def test_untrained_controlnet_and_scale_zero_are_the_base_model_exactly(tiny):
    its = items()
    init = method(controlnet="init")
    init.check(tiny, 3)
    base = generate(tiny, method(conditioning_scale=0.0), its)
    assert torch.equal(generate(tiny, init, its), base)  # zero convolutions: every residual is 0
    from bench.catalog import METHODS

    cfg = METHODS.get("cfg")
    plain = cfg(cfg.parse_args({})).generate(
        tiny, Batch(SEEDS, 3, prompts=tuple(it.target_prompt for it in its)), CountingDenoiser(tiny.unet, torch.device("cpu")))
    assert torch.equal(base, plain)  # scale 0 is the text-to-image loop itself


def test_embedded_controls_items_carry_condition_prompt_and_ground_truth():
    its = items(4)
    scenes = make_scenes(CONTROL_SEED, range(4), EmbeddedControls().world())
    for it, scene in zip(its, scenes):
        image, cover = render(scene, 32)
        assert it.control.shape == (32, 32, 3) and it.control.dtype == np.uint8
        assert np.array_equal(it.target, image) and np.array_equal(it.source, image)
        assert it.target_prompt == it.source_prompt == scene.caption
        assert it.mask.sum() > 0 and set(np.unique(it.mask)) <= {0.0, 1.0}
        assert np.array_equal(it.control, control_image(cover))
    assert CONTROL_SEED not in (1, 2, 3, 5, 6, 7, 8, 9, 11, 12, 13, 14, 21, 22, 23, 97, 98)


def test_control_iou_is_near_one_on_renders_and_lower_when_shifted():
    its = items(16)
    renders = torch.from_numpy(np.stack([it.target for it in its])).permute(0, 3, 1, 2)
    controls = torch.from_numpy(np.stack([it.control for it in its])).permute(0, 3, 1, 2)
    own = iou(segment(renders), condition_masks(controls))
    assert float(own.min()) > 0.8 and float(own.mean()) > 0.9, own
    shifted = iou(segment(torch.roll(renders, shifts=6, dims=3)), condition_masks(controls))
    assert float(shifted.mean()) < float(own.mean()) - 0.2, (shifted.mean(), own.mean())


def test_items_without_or_with_a_bad_control_are_one_line(tiny):
    m = method(controlnet="init")
    m.check(tiny, 3)
    good = items(1)[0]
    m.check_items([good])
    for control, fragment in ((None, "has no control image"), (np.zeros((16, 16, 3), np.uint8), "16x16"),
                              (np.zeros((32, 32, 4), np.uint8), "4 channel"), (np.zeros((32, 32), np.uint8), "1 channel")):
        bad = EditItem(**{**good.__dict__, "control": control})
        with pytest.raises(BenchError, match=fragment) as info:
            m.check_items([bad])
        assert "\n" not in str(info.value)


def test_a_controlnet_for_another_unet_is_one_line(tiny):
    from bench.models import load_controlnet  # noqa: F401  (the loader the adapter uses)
    from methods.controlnet import init_controlnet

    other = init_controlnet(tiny.unet, 8)  # SD's factor: a /8 condition on a /4 model
    m = method(controlnet="init")
    with pytest.raises(BenchError, match="does not fit"):
        m.check_pair(other, tiny)


def test_offline_public_and_missing_embedded_controlnets_are_one_line(monkeypatch, tmp_path):
    import bench.models as models

    with pytest.raises(BenchError, match="hf download lllyasviel/sd-controlnet-seg") as info:
        models.load_controlnet("lllyasviel/sd-controlnet-seg")
    assert "\n" not in str(info.value)
    monkeypatch.setattr(models, "EMBEDDED_WEIGHTS", tmp_path)
    with pytest.raises(BenchError, match="bench embedded train controlnet-mask"):
        models.load_controlnet("embedded-controlnet-mask")
    with pytest.raises(BenchError, match="not a ControlNetModel folder"):
        models.load_controlnet(str(tmp_path))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-controls")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(d / "small.png")
    Image.fromarray(np.zeros((32, 32, 4), np.uint8)).save(d / "rgba.png")
    (d / "text.png").write_text("not an image")
    return d


@pytest.mark.parametrize("extra,fragment", [
    (["--control-image", "{d}/small.png"], "16x16"),
    (["--control-image", "{d}/rgba.png"], "4 channel"),
    (["--control-image", "{d}/text.png"], "is not an image"),
    (["--controlnet", "lllyasviel/sd-controlnet-seg"], "hf download lllyasviel/sd-controlnet-seg"),
    (["--dataset", "embedded-edits"], "has no control image"),
], ids=["wrong-size", "wrong-channels", "not-an-image", "public-offline", "no-controls"])
def test_bad_input_through_the_cli(extra, fragment, tiny_dir, bad_files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["run", "--method", "controlnet", "--model", str(tiny_dir), "--tracking-uri", uri, "--steps", "2",
            "--num-samples", "4", "--no-progress", "--controlnet", "init", "--metrics", "latency",
            *[a.format(d=bad_files) for a in extra]]
    rc = main(argv)
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("bench: error: "), err[-2000:]
    assert fragment in lines[0], lines[0]
    if Path(f"{tmp_path}/mlflow.db").exists():
        client = MlflowClient(uri)
        assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_cli_run_writes_the_outputs_the_grid_reads(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    rc = main(["run", "--method", "controlnet", "--model", str(tiny_dir), "--tracking-uri",
               f"sqlite:///{tmp_path}/mlflow.db", "--steps", "2", "--num-samples", "4", "--no-progress",
               "--controlnet", "init", "--metrics", "control-iou", "--output", str(out)])
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert any(out.rglob("*.png")), sorted(p.name for p in out.rglob("*"))
