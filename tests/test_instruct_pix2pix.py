"""InstructPix2Pix (issue 18): the adapter against diffusers' pipeline, the recipe's pieces, the loader, bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from bench.denoiser import CountingDenoiser
from bench.editing import EDIT_SEED, EmbeddedEdits, embedded_edit
from bench.errors import BenchError
from bench.interfaces import Batch
from bench.models import load_model
from tests.tiny_t2i import TINY_TEXT, TINY_UNET, TINY_VAE

pytestmark = pytest.mark.usefixtures("one_thread")
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def save_tiny_ip2p(folder: Path, seed: int = 0) -> Path:
    """A tiny random StableDiffusionInstructPix2PixPipeline folder in the real layout (timbrooks/instruct-pix2pix's)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from bench.embedded.t2i import build_text_encoder, build_unet, build_vae
    from bench.embedded.tokenizer import load, write_tokenizer_files
    from bench.recipes.instruct_pix2pix import build_scheduler, widen_conv_in

    torch.manual_seed(seed)
    vae, text, unet = build_vae(TINY_VAE), build_text_encoder(TINY_TEXT), widen_conv_in(build_unet(TINY_UNET))
    with torch.no_grad():  # the source's channels matter (not the recipe's zeros), and guidance visibly matters
        unet.conv_in.weight.normal_(0.0, 0.3)
        for p in unet.conv_out.parameters():
            p.mul_(50)
    tok = folder.parent / f"{folder.name}-tokenizer"
    write_tokenizer_files(tok)
    StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text, tokenizer=load(tok), unet=unet, scheduler=build_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_ip2p(tmp_path_factory.mktemp("ip2p") / "tiny-ip2p")


def method(**args):
    from bench.catalog import METHODS

    cls = METHODS.get("instruct-pix2pix")
    return cls(cls.parse_args(args))


@pytest.mark.parametrize("s_t,s_i", [(5.0, 1.7), (1.0, 1.0)])
def test_output_equals_diffusers_instruct_pix2pix_pipeline(tiny_dir, s_t, s_i):
    model = load_model(str(tiny_dir))  # a folder: through the loader its model_index.json names
    assert model.kind == "instruct-pix2pix" and model.latent_shape == (4, 8, 8) and model.sample_shape == (3, 32, 32)
    items, seeds, steps = EmbeddedEdits().edits(4), [5, 6, 7, 8], 6
    denoiser = CountingDenoiser(model.unet, torch.device("cpu"))
    ours = method(guidance=s_t, image_guidance=s_i).generate(model, Batch(tuple(seeds), steps, edits=tuple(items)),
                                                             denoiser)
    pipe = model.pipeline
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"  # ancestral: the noise must match too
    ref = pipe([it.instruction for it in items], image=[Image.fromarray(it.source) for it in items],
               num_inference_steps=steps, guidance_scale=s_t, image_guidance_scale=s_i,
               generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt").images * 2 - 1
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    assert denoiser.calls == steps  # eq. 3's three branches in one batched call per step
    other = method(guidance=s_t + 3.0, image_guidance=s_i).generate(model, Batch(tuple(seeds), steps, edits=tuple(items)),
                                                                    CountingDenoiser(model.unet, torch.device("cpu")))
    assert (other - ours).abs().max() > 1e-3  # the text guidance reaches the output


def test_widened_unet_is_the_text_to_image_unet_at_step_0():
    from bench.embedded.t2i import build_unet
    from bench.recipes.instruct_pix2pix import widen_conv_in

    torch.manual_seed(0)
    base = build_unet(TINY_UNET)
    wide = widen_conv_in(base)
    assert wide.config.in_channels == 8 and not wide.conv_in.weight[:, 4:].any()
    g = torch.Generator().manual_seed(1)
    x, source, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 16, generator=g)
    with torch.no_grad():
        a = wide(torch.cat([x, source], 1), 500, encoder_hidden_states=ctx).sample
        b = base(x, 500, encoder_hidden_states=ctx).sample
    assert torch.allclose(a, b, atol=1e-5)


def test_training_edits_are_their_own_and_embedded_edits_ask_in_a_trained_phrasing():
    from bench.recipes.instruct_pix2pix import IP2P_SEED, TEMPLATES, WORLD, instruction, training_edits

    assert IP2P_SEED != EDIT_SEED
    sources, targets, texts = training_edits(8)
    assert sources.shape == targets.shape == (8, 32, 32, 3) and len(set(texts)) > 4
    for i, text in enumerate(texts):
        _, _, edit_type, (old, new) = embedded_edit(i, IP2P_SEED, WORLD)
        assert new in text and not np.array_equal(sources[i], targets[i])
    for i, item in enumerate(EmbeddedEdits().edits(8)):
        source, target, edit_type, words = embedded_edit(i)
        assert item.instruction == instruction(source, target, edit_type, words, len(TEMPLATES[edit_type]) - 1)


def test_hub_id_offline_says_what_to_download():
    with pytest.raises(BenchError, match=r"hf download timbrooks/instruct-pix2pix") as info:
        load_model("timbrooks/instruct-pix2pix")
    assert "\n" not in str(info.value)


def test_embedded_model_is_committed_and_loads_in_diffusers():
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from bench.models import EMBEDDED_WEIGHTS

    model = load_model("embedded-instruct-pix2pix")
    assert model.kind == "instruct-pix2pix" and model.unet.config.in_channels == 8 and model.embedded
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(EMBEDDED_WEIGHTS / "instruct-pix2pix",
                                                                  safety_checker=None, requires_safety_checker=False)
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert json.loads((EMBEDDED_WEIGHTS / "instruct-pix2pix" / "unet" / "RECIPE.json").read_text())["wall_time_s"] > 0


# -- through the CLI: bad input is one line, exit 2, no MLflow run; a good run writes its images -----------------------
def cli(argv, capsys, uri):
    from bench.cli.main import main

    rc = main(argv)
    _, err = capsys.readouterr()
    runs = []
    db = Path(uri[len("sqlite:///"):])
    if db.exists():
        client = MlflowClient(uri)
        runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return rc, err.strip().splitlines(), runs


def test_a_data_set_without_instructions_is_refused_in_one_line(tiny_dir, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(FIXTURES / "pie-bench", data / "pie-bench")
    mapping = data / "pie-bench" / "mapping_file.json"
    entries = json.loads(mapping.read_text())
    for entry in entries.values():
        entry["editing_instruction"] = ""
    mapping.write_text(json.dumps(entries))
    monkeypatch.setenv("DIFFBENCH_DATA", str(data))
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc, lines, runs = cli(["run", "--method", "instruct-pix2pix", "--model", str(tiny_dir), "--dataset", "pie-bench",
                           "--metrics", "latency", "--num-samples", "2", "--steps", "2", "--tracking-uri", uri, "--no-progress"], capsys, uri)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("bench: error: "), lines
    assert "have none" in lines[0] and "editing_instruction" in lines[0] and not runs


def test_a_text_to_image_model_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc, lines, runs = cli(["run", "--method", "instruct-pix2pix", "--model", "embedded-t2i", "--dataset",
                           "embedded-edits", "--num-samples", "2", "--steps", "2", "--tracking-uri", uri,
                           "--no-progress"], capsys, uri)
    assert rc == 2 and len(lines) == 1 and "--model embedded-instruct-pix2pix" in lines[0] and not runs


def test_a_run_on_the_embedded_editor_writes_its_edits(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc, lines, runs = cli(["run", "--method", "instruct-pix2pix", "--model", "embedded-instruct-pix2pix",
                           "--dataset", "embedded-edits", "--num-samples", "4", "--steps", "4", "--metrics",
                           "edit-ground-truth", "--output", str(tmp_path / "out"), "--tracking-uri", uri,
                           "--no-progress"], capsys, uri)
    assert rc == 0, lines[-5:]
    assert [r.info.status for r in runs] == ["FINISHED"] and "gt_psnr" in runs[0].data.metrics
    assert list((tmp_path / "out").rglob("*.png"))
