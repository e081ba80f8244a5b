"""Guidance adapters: CFG, guidance rescale and FreeU against diffusers' own pipeline; classifier guidance's effect."""

import numpy as np
import pytest
import torch

from bench.interfaces import Batch

from bench.denoiser import CountingDenoiser
from bench.errors import BenchError
from bench.models import EMBEDDED_WEIGHTS, load_model
from bench.spec import RunSpec

PROMPTS = ["a small red circle on a black background", "a large blue square and a small green triangle on a white background",
           "a small yellow triangle on a gray background"]
SEEDS = [11, 22, 33]


def method(name, **args):
    from bench.catalog import METHODS

    cls = METHODS.get(name)
    return cls(cls.parse_args(args))


def generate(model, m, seeds=SEEDS, prompts=PROMPTS, steps=4):
    denoiser = CountingDenoiser(model.unet, torch.device("cpu"))
    return m.generate(model, Batch(tuple(seeds), steps, prompts=tuple(prompts)), denoiser), denoiser


def pipeline_images(model, m, steps=4, **call):
    """The same sampling through StableDiffusionPipeline.__call__ (the reference implementation)."""
    from diffusers.utils.torch_utils import randn_tensor

    pipe = model.pipeline
    pipe.scheduler = m.make_scheduler(model)
    latents = randn_tensor((len(SEEDS), *model.latent_shape), generator=[torch.Generator().manual_seed(s) for s in SEEDS])
    out = pipe(PROMPTS, num_inference_steps=steps, latents=latents, output_type="pt", **call).images
    return out * 2 - 1


def test_cfg_equals_stable_diffusion_pipeline(tiny):
    m = method("cfg", guidance=3.0)
    ours, denoiser = generate(tiny, m)
    reference = pipeline_images(tiny, m, guidance_scale=3.0)
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()
    assert denoiser.calls == 4 and denoiser.evaluations == 4 * 2 * len(SEEDS)  # both branches, one forward pass


def test_guidance_rescale_equals_pipeline_and_phi_zero_is_cfg(tiny):
    m = method("cfg-rescale", guidance=5.0, guidance_rescale=0.7)
    ours, _ = generate(tiny, m)
    reference = pipeline_images(tiny, m, guidance_scale=5.0, guidance_rescale=0.7)
    assert torch.allclose(ours, reference, atol=1e-4)
    plain, _ = generate(tiny, method("cfg", guidance=5.0))
    assert not torch.allclose(ours, plain, atol=1e-3)
    zero, _ = generate(tiny, method("cfg-rescale", guidance=5.0, guidance_rescale=0.0))
    assert torch.allclose(zero, plain, atol=1e-6)


def test_guidance_one_skips_the_unconditional_branch(tiny):
    m = method("cfg", guidance=1.0)
    ours, denoiser = generate(tiny, m)
    assert denoiser.evaluations == 4 * len(SEEDS)
    reference = pipeline_images(tiny, m, guidance_scale=1.0)
    assert torch.allclose(ours, reference, atol=1e-4)


def test_freeu_changes_samples_and_restores_the_unet(tiny):
    before, _ = generate(tiny, method("cfg", guidance=3.0))
    freeu, _ = generate(tiny, method("freeu", guidance=3.0, b1=1.5, b2=1.6, s1=0.9, s2=0.2))
    after, _ = generate(tiny, method("cfg", guidance=3.0))
    assert not torch.allclose(freeu, before, atol=1e-3)
    assert torch.equal(before, after)
    neutral, _ = generate(tiny, method("freeu", guidance=3.0, b1=1.0, b2=1.0, s1=1.0, s2=1.0))
    assert torch.allclose(neutral, before, atol=1e-5)  # FreeU with unit factors is the plain UNet


def test_sample_depends_on_its_own_seed_and_prompt_only(tiny):
    m = method("cfg", guidance=3.0)
    batch, _ = generate(tiny, m)
    alone, _ = generate(tiny, m, seeds=SEEDS[1:2], prompts=PROMPTS[1:2])
    assert torch.allclose(batch[1:2], alone, atol=1e-5)


def test_bad_options_are_one_line():
    from bench.catalog import METHODS

    for name, args, match in [("cfg", {"guidance": -1.0}, "--guidance"), ("cfg", {"scheduler": "heun"}, "--scheduler"),
                              ("cfg-rescale", {"guidance_rescale": 2.0}, "--guidance-rescale"),
                              ("freeu", {"b1": -1.0}, "--b1"), ("cfg", {"eta": 1.0}, "no option eta"),
                              ("classifier-guidance", {"target_color": "purple"}, "--target-color")]:
        with pytest.raises(BenchError, match=match):
            METHODS.get(name).parse_args(args)


# -- the runner: prompts per sample index, batching, checks ------------------------------------------------------------
@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS + ["a small cyan circle on a navy background", "a large magenta square on a gray background"]))
    return path


def test_runner_assigns_prompt_i_and_seed_i_whatever_the_batching(tiny_dir, prompt_file, tmp_path):
    from bench.runner import plan_run, sample

    outs = []
    for batch_size in (2, 5):
        spec = RunSpec(method="cfg", method_args={"guidance": 3.0}, model=str(tiny_dir), dataset=str(prompt_file),
                       steps=3, num_samples=5, batch_size=batch_size, metrics=("latency",),
                       output=str(tmp_path / f"run-{batch_size}"))
        plan = plan_run(spec)
        assert [p.text for p in plan.prompts][:3] == PROMPTS
        assert plan.protocol["prompts"]["texts_sha256"]
        outs.append(sample(plan, progress=False)[0])
    assert np.abs(outs[0].astype(int) - outs[1].astype(int)).max() <= 1  # uint8 rounding of float noise at most


def test_text_method_defaults_to_the_prompt_world(tiny_dir, tmp_path):
    from bench.runner import plan_run

    plan = plan_run(RunSpec(method="cfg", model=str(tiny_dir), steps=2, num_samples=4, batch_size=4,
                            metrics=("latency",), output=str(tmp_path / "run")))
    assert plan.spec.dataset == "shapes32" and plan.targets[0]["objects"]
    assert plan.prompts[0].text == plan.reference.prompts(1)[0].text


def test_unset_fields_take_the_data_set_defaults_and_given_ones_are_kept(tiny_dir, tmp_path):
    from bench.runner import plan_run

    plan = plan_run(RunSpec(method="cfg", model=str(tiny_dir), steps=2, output=str(tmp_path / "a")))
    assert (plan.spec.dataset, plan.spec.num_samples) == ("shapes32", 256)
    assert "clip-score" in plan.spec.metrics and "attribute-accuracy" in plan.spec.metrics
    given = plan_run(RunSpec(method="cfg", model=str(tiny_dir), steps=2, dataset="shapes32", num_samples=1000,
                             metrics=("fid", "kid", "latency", "memory"), output=str(tmp_path / "b")))
    assert given.spec.num_samples == 1000 and given.spec.metrics == ("fid", "kid", "latency", "memory")
    assert given.protocol_hash != plan.protocol_hash


def test_mismatches_fail_before_sampling(tiny_dir, tiny_model_dir, prompt_file, tmp_path):
    from bench.runner import plan_run

    with pytest.raises(BenchError, match="needs a model of kind text-to-image"):
        plan_run(RunSpec(method="cfg", model=str(tiny_model_dir), dataset=str(prompt_file), metrics=("latency",),
                         output=str(tmp_path / "a")))
    with pytest.raises(BenchError, match="needs prompts"):
        plan_run(RunSpec(method="ddim", model=str(tiny_model_dir), metrics=("clip-score",), output=str(tmp_path / "b")))
    with pytest.raises(BenchError, match="has only prompts") as info:
        plan_run(RunSpec(method="cfg", model=str(tiny_dir), dataset=str(prompt_file), metrics=("fid",),
                         output=str(tmp_path / "c")))
    assert "\n" not in str(info.value)
    with pytest.raises(BenchError, match="attribute heads"):
        plan_run(RunSpec(method="cfg", model=str(tiny_dir), dataset=str(prompt_file), metrics=("attribute-accuracy",),
                         output=str(tmp_path / "d")))
    with pytest.raises(BenchError, match="needs per-sample targets"):  # unguided pixel sampling asks for nothing
        plan_run(RunSpec(method="ddim", model=str(tiny_model_dir), metrics=("attribute-accuracy",), output=str(tmp_path / "e")))


# -- classifier guidance on the embedded pixel DDPM (a test that can fail) ---------------------------------------------
NEEDED = [EMBEDDED_WEIGHTS / "pixel-ddpm" / "unet", EMBEDDED_WEIGHTS / "noisy-classifier" / "model.safetensors",
          EMBEDDED_WEIGHTS / "feature-net" / "model.safetensors"]


@pytest.mark.skipif(not all(p.exists() for p in NEEDED), reason="embedded pixel DDPM or noisy classifier not trained")
def test_classifier_guidance_moves_attribute_accuracy_towards_the_requested_color():
    from bench.datasets import Shapes16
    from bench.images import to_uint8
    from metrics.attribute_accuracy import predict, score
    from bench.embedded.feature_extractor import load_network

    model = load_model("embedded-ddpm")
    net = load_network()
    seeds = list(range(100, 148))
    shares = {}
    for scale in (0.0, 4.0):
        m = method("classifier-guidance", target_color="red", classifier_scale=scale)
        m.check(model, 20)
        images = m.generate(model, Batch(tuple(seeds), 20), CountingDenoiser(model.unet, torch.device("cpu")))
        uint8 = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2)
        shares[scale] = score(predict(net, uint8), m.targets(len(seeds)))["attr_acc_color"]
    assert shares[0.0] < 0.4, shares  # about 1/6 of unguided samples are red
    assert shares[4.0] > shares[0.0] + 0.3 and shares[4.0] > 0.6, shares
    assert Shapes16.feature_extractor == "shapes-cnn16"


def test_sweep_method_option_comma_list_spans_the_grid():
    from bench.cli.main import build_parser
    from bench.cli.sweep import build

    argv = ["sweep", "--method", "cfg", "--guidance", "1,2,4,8", "--scheduler", "ddim"]
    args = build_parser(argv).parse_args(argv)
    _, base, cells, _ = build(args, {"cfg": ["scheduler", "guidance"]})
    assert [c.method_args["guidance"] for c in cells] == [1.0, 2.0, 4.0, 8.0]
    assert {c.steps for c in cells} == {base.steps} and all(c.method_args["scheduler"] == "ddim" for c in cells)
