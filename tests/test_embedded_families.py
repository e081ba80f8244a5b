"""The embedded SDXL model (micro-conditioning) and the embedded SD3-layout rectified flow and its reflow (issue 16).

The committed folders load through the pipelines' own ``from_pretrained``; the recipes' text encoding is the
pipelines' ``encode_prompt``; each recipe runs a few steps into a temporary folder that loads again; the runs
the acceptance names work end to end; the path straightness is 0 for straight paths and positive for curved ones.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from bench.cli.main import main
from bench.models import EMBEDDED_WEIGHTS, load_model

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle on a black background", "a large blue square and a small green triangle on a gray background"]


# -- the committed folders -------------------------------------------------------------------------------------------
def test_embedded_sdxl_is_an_sdxl_pipeline_folder_and_encodes_as_trained():
    from diffusers import StableDiffusionXLPipeline

    from bench.embedded.sdxl import encode
    from bench.embedded.tokenizer import tokenize

    folder = EMBEDDED_WEIGHTS / "sdxl"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    record = json.loads((folder / "unet" / "RECIPE.json").read_text())
    assert record["command"] == "bench embedded train sdxl" and record["wall_time_s"] > 0
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, use_safetensors=True)
    assert pipe.unet.config.addition_embed_type == "text_time"
    ids = tokenize(pipe.tokenizer, PROMPTS)
    ours, pooled = encode(pipe.text_encoder, pipe.text_encoder_2, ids)
    theirs, _, theirs_pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    assert torch.allclose(ours, theirs, atol=1e-5) and torch.allclose(pooled, theirs_pooled, atol=1e-5)
    model = load_model("embedded-sdxl")
    assert model.kind == "text-to-image-xl" and model.embedded and model.sample_shape == (3, 32, 32)


@pytest.mark.parametrize("name", ["flow", "flow-reflow"])
def test_embedded_flows_are_sd3_pipeline_folders_and_encode_as_trained(name):
    from diffusers import StableDiffusion3Pipeline

    from bench.embedded.flow import encode
    from bench.embedded.tokenizer import tokenize

    folder = EMBEDDED_WEIGHTS / name
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]
    record = json.loads((folder / "transformer" / "RECIPE.json").read_text())
    assert record["command"] == f"bench embedded train {name}" and record["wall_time_s"] > 0
    # diffusers' SD3 docs load SD3 without T5 so; the model was trained with no T5 tokens (max_sequence_length 0)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, use_safetensors=True, text_encoder_3=None, tokenizer_3=None)
    ids = tokenize(pipe.tokenizer, PROMPTS)
    ours, pooled = encode(pipe.text_encoder, pipe.text_encoder_2, ids)
    theirs, _, theirs_pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                     max_sequence_length=record["max_sequence_length"])
    assert torch.allclose(ours, theirs, atol=1e-5) and torch.allclose(pooled, theirs_pooled, atol=1e-5)
    assert pipe.vae.config.shift_factor is not None  # SD3's latent normalization, measured by the recipe
    model = load_model(f"embedded-{name}")
    assert model.kind == "flow-matching" and model.family == "sd3" and model.latent_shape == (4, 8, 8)
    assert model.max_sequence_length == 0
    # the pipeline's own call (max_sequence_length=0) and the project's loop agree
    from bench.catalog import METHODS
    from bench.denoiser import CountingDenoiser
    from bench.interfaces import Batch

    cls = METHODS.get("flow-euler")
    method = cls(cls.parse_args({"guidance": 3.0}))
    ours = method.generate(model, Batch((3, 5), 3, prompts=tuple(PROMPTS)), CountingDenoiser(model.unet, torch.device("cpu")))
    from diffusers.utils.torch_utils import randn_tensor

    latents = randn_tensor((2, *model.latent_shape), generator=[torch.Generator().manual_seed(s) for s in (3, 5)])
    reference = pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, latents=latents, output_type="pt",
                     max_sequence_length=0, height=32, width=32).images * 2 - 1
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()


# -- the recipes -----------------------------------------------------------------------------------------------------
def test_micro_pool_carries_the_conditioning_it_says():
    from bench.recipes.sdxl import Recipe, micro_pool

    data = micro_pool(Recipe(pool_size=200))
    ids, kind = data["time_ids"], data["kind"]
    assert ids.shape == (200, 6) and set(np.unique(kind)) == {0, 1, 2}
    assert (ids[kind == 0] == [32, 32, 0, 0, 32, 32]).all()
    assert set(ids[kind == 1, 0]) <= {8, 12, 16, 24} and (ids[kind == 1, 2:4] == 0).all()
    assert (ids[kind == 2, :2] == 48).all() and ids[kind == 2, 2:4].max() <= 16 and ids[kind == 2, 2:4].max() > 0
    assert (ids[:, 4:] == 32).all()
    # a small original is blurrier than the plain render of the same scene: smaller second differences (blur spreads
    # an edge without changing its total variation, so first differences hardly fall)
    from bench.embedded.pool import scene_pool
    from bench.embedded.t2i import T2I_SEED, WORLD

    plain, _ = scene_pool(T2I_SEED, 200, WORLD)
    small = np.flatnonzero((kind == 1) & (ids[:, 0] == 8))
    grad = lambda x: np.abs(np.diff(x.astype(np.float64), n=2, axis=2)).mean()  # noqa: E731
    assert grad(data["images"][small]) < 0.8 * grad(plain[small])


def test_recipes_run_and_save_folders_the_pipelines_load(tmp_path):
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    from bench.recipes import flow, sdxl

    record = sdxl.train(tmp_path / "sdxl", dataclasses.replace(sdxl.Recipe(), steps=2, batch_size=4, pool_size=64,
                                                                   warmup_steps=1, threads=1), progress=False)
    assert record["recipe"]["steps"] == 2 and record["pool"]["random_crop"] > 0
    StableDiffusionXLPipeline.from_pretrained(tmp_path / "sdxl", use_safetensors=True)
    flow.train(tmp_path / "flow", dataclasses.replace(flow.Recipe(), steps=2, batch_size=4, pool_size=64,
                                                      warmup_steps=1, threads=1), progress=False)
    record = flow.train(tmp_path / "reflow", dataclasses.replace(
        flow.ReflowRecipe(), steps=2, batch_size=4, pairs=8, ode_steps=2, warmup_steps=1, threads=1,
        base=str(tmp_path / "flow")), progress=False)
    assert record["recipe"]["pairs"] == 8
    no_t5 = dict(use_safetensors=True, text_encoder_3=None, tokenizer_3=None)
    first = StableDiffusion3Pipeline.from_pretrained(tmp_path / "flow", **no_t5)
    second = StableDiffusion3Pipeline.from_pretrained(tmp_path / "reflow", **no_t5)
    a, b = first.transformer.state_dict(), second.transformer.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # reflow trained the transformer ...
    assert all(torch.equal(x, y) for x, y in zip(first.text_encoder.parameters(), second.text_encoder.parameters()))


def test_timestep_sampling_is_the_recipes():
    from bench.recipes.flow import Recipe, sample_t

    gen = torch.Generator().manual_seed(0)
    t = sample_t(Recipe(), 20000, gen)
    assert 0 < t.min() and t.max() < 1 and abs(float(t.mean()) - 0.5) < 0.01
    assert float(((t > 0.25) & (t < 0.75)).float().mean()) > 0.6  # logit-normal(0, 1) piles up in the middle
    u = sample_t(dataclasses.replace(Recipe(), timestep_sampling="uniform"), 20000, gen)
    assert abs(float(((u > 0.25) & (u < 0.75)).float().mean()) - 0.5) < 0.02
    with pytest.raises(ValueError, match="logit-normal or uniform"):
        sample_t(dataclasses.replace(Recipe(), timestep_sampling="cosine"), 4, gen)


# -- path straightness -------------------------------------------------------------------------------------------------
def test_path_straightness_is_zero_for_straight_paths_and_positive_for_curved():
    from methods.flow_euler import path_straightness

    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    v = torch.randn(3, 4, 2, 2)
    assert torch.allclose(path_straightness([v] * 4, sigmas), torch.zeros(3), atol=1e-6)
    curved = [v * (1 + k) for k in range(4)]  # the same direction, changing speed: still off the chord
    bent = [v, -v, v, -v]
    s_curved, s_bent = path_straightness(curved, sigmas), path_straightness(bent, sigmas)
    assert (s_curved > 0).all() and (s_bent > s_curved).all()
    # one step is always straight
    assert torch.allclose(path_straightness([v], torch.tensor([1.0, 0.0])), torch.zeros(3))


# -- the acceptance runs -----------------------------------------------------------------------------------------------
def _results(out):
    return json.loads((out / "results.json").read_text())["values"]


def test_flow_euler_on_embedded_flow_runs_end_to_end_with_straightness(tmp_path):
    out = tmp_path / "flow"
    assert main(["run", "--method", "flow-euler", "--model", "embedded-flow", "--steps", "4", "--num-samples", "8",
                 "--batch-size", "8", "--metrics", "attribute-accuracy,clip-score", "--straightness-probe", "4",
                 "--guidance", "1", "--output", str(out), "--no-progress"]) == 0
    values = _results(out)
    assert values["path_straightness"] > 0 and "clip_score" in values and "attr_acc_mean" in values
    assert values["nfe"] == 4
    config = json.loads((out / "config.json").read_text())
    assert config["spec"]["method_args"]["straightness_probe"] == 4 and "straightness" in config["protocol"]["method"]


def test_cfg_on_embedded_sdxl_runs_end_to_end_with_micro_conditioning(tmp_path):
    out = tmp_path / "sdxl"
    assert main(["run", "--method", "cfg", "--model", "embedded-sdxl", "--steps", "4", "--num-samples", "8",
                 "--batch-size", "8", "--metrics", "attribute-accuracy,clip-score", "--crop-top", "16",
                 "--output", str(out), "--no-progress"]) == 0
    values = _results(out)
    assert "clip_score" in values and "attr_acc_mean" in values
    protocol = json.loads((out / "config.json").read_text())["protocol"]["method"]
    assert protocol["micro_conditioning"]["crops_coords_top_left"] == [16, 0]


def test_uniform_sigmas_are_liu_et_al_euler_steps_and_leave_default_runs_alone(tmp_path):
    """SD3's pipeline schedule at 2 steps is sigma 1, 0.001, 0 (one step in effect); --uniform-sigmas gives 1, 0.5, 0.
    The option at its default is not recorded, so runs made before it keep their protocol hashes."""
    from bench.catalog import METHODS
    from bench.interfaces import Batch
    from bench.runner import plan_run
    from bench.spec import RunSpec

    model = load_model("embedded-flow")
    cls = METHODS.get("flow-euler")
    plain = lambda x, timestep, **kw: model.unet(hidden_states=x, timestep=timestep, **kw).sample  # noqa: E731
    sigmas = {}
    for uniform in (False, True):
        trace: dict = {}
        cls(cls.parse_args({"guidance": 1, "uniform_sigmas": uniform})).sample(
            model, Batch((0,), 2, prompts=(PROMPTS[0],)), plain, trace)
        sigmas[uniform] = trace["sigmas"]
    assert torch.allclose(sigmas[False], torch.tensor([1.0, 0.001, 0.0]), atol=1e-6)
    assert torch.allclose(sigmas[True], torch.tensor([1.0, 0.5, 0.0]), atol=1e-6)

    def plan(**args):
        return plan_run(RunSpec(method="flow-euler", method_args=args, model="embedded-flow", steps=2, num_samples=4,
                                batch_size=4, metrics=("latency",), output=str(tmp_path / f"r{len(args)}")))

    default, uniform = plan(), plan(uniform_sigmas=True)
    assert "uniform_sigmas" not in default.spec.method_args and "straightness_probe" not in default.spec.method_args
    assert uniform.protocol_hash != default.protocol_hash and "uniform" in uniform.protocol["method"]["schedule"]
