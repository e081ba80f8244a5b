"""The flow-matching samplers (issue 16): flow-euler, flow-heun and flow-dpmsolver++ on tiny random SD3 and FLUX folders.

The correctness test: through the project's method/denoiser path they give the images of the diffusers pipeline's
own ``__call__`` for the same latents, prompts, steps, guidance and scheduler. Beside it: NFE as counted, the
refusals in one line, the protocol (shift, guidance, mu), and a `bench run` end to end."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from bench.catalog import METHODS
from bench.cli.main import main
from bench.denoiser import CountingDenoiser, timestep_is_keyword
from bench.errors import BenchError
from bench.interfaces import Batch
from bench.models import load_flow_matching
from bench.spec import RunSpec
from tests.tiny_t2i import save_tiny_t2i

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle on a black background", "a large blue square on a white background"]
SEEDS = (3, 11)
FLUX_LATENT = 8  # FluxPipeline's default size is 128 latents a side; the tests sample 8 (the pipeline's height/width)





def method(name, **args):
    cls = METHODS.get(name)
    return cls(cls.parse_args(args))


def small_flux(folder):
    """A FLUX model sampling 8x8 latents (the pipeline's default is 128x128: minutes on a CPU, even tiny)."""
    model = load_flow_matching(str(folder))
    factor = model.pipeline.vae_scale_factor
    return dataclasses.replace(model, latent_shape=(model.latent_shape[0], FLUX_LATENT, FLUX_LATENT),
                               sample_shape=(3, FLUX_LATENT * factor, FLUX_LATENT * factor))


def generate(model, m, steps=2):
    denoiser = CountingDenoiser(model.unet, torch.device("cpu"))
    m.check(model, steps)
    return m.generate(model, Batch(SEEDS, steps, prompts=tuple(PROMPTS)), denoiser), denoiser


def latents(model):
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor((len(SEEDS), *model.latent_shape), generator=[torch.Generator().manual_seed(s) for s in SEEDS])


def sd3_reference(model, m, steps, guidance):
    pipe = model.pipeline
    pipe.scheduler = m.make_scheduler(model)
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=latents(model),
                output_type="pt").images * 2 - 1


def flux_reference(model, m, steps, guidance):
    pipe = model.pipeline
    pipe.scheduler = m.make_scheduler(model)
    c, h, w = model.latent_shape
    packed = pipe._pack_latents(latents(model), len(SEEDS), c, h, w)
    _, height, width = model.sample_shape
    return pipe(PROMPTS, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                latents=packed, output_type="pt").images * 2 - 1


# -- the correctness test: the pipelines' own images --------------------------------------------------------------------
@pytest.mark.parametrize("name, steps, nfe", [("flow-euler", 3, 3), ("flow-heun", 3, 5), ("flow-dpmsolver++", 3, 3),
                                            ("flow-unipc", 3, 3)])
def test_flow_samplers_on_sd3_equal_the_sd3_pipeline(name, steps, nfe, sd3_dir):
    """With CFG (both branches in one batched call) each sampler gives StableDiffusion3Pipeline's images with the same
    scheduler; NFE as counted: steps (Euler, DPM-Solver++ 2M), 2 steps - 1 (Heun's corrector but on the last step)."""
    model = load_flow_matching(str(sd3_dir))
    m = method(name, guidance=3.0)
    ours, denoiser = generate(model, m, steps)
    assert denoiser.calls == nfe and denoiser.evaluations == nfe * 2 * len(SEEDS)
    reference = sd3_reference(model, m, steps, 3.0)
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()
    unguided, _ = generate(model, method(name, guidance=1.0), steps)  # the test can tell guidance apart
    assert (ours - unguided).abs().max() > 1e-2


def test_flow_euler_on_flux_schnell_equals_the_flux_pipeline(flux_dir):
    """FLUX without a guidance input (schnell's layout): packed latents, FluxPipeline's sigmas, one call per step."""
    model = small_flux(flux_dir)
    m = method("flow-euler")
    ours, denoiser = generate(model, m, 2)
    assert denoiser.calls == 2 and denoiser.evaluations == 2 * len(SEEDS)
    reference = flux_reference(model, m, 2, 3.5)  # the pipeline ignores guidance_scale without guidance_embeds
    assert ours.shape == (len(SEEDS), *model.sample_shape)
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()


def test_flow_euler_on_flux_dev_equals_the_flux_pipeline(flux_dev_dir):
    """FLUX.1-dev's layout: the embedded guidance as the transformer's input, the dynamic shift's mu from the image's
    sequence length (calculate_shift), both as FluxPipeline sets them."""
    model = small_flux(flux_dev_dir)
    m = method("flow-euler", guidance=5.0)
    ours, denoiser = generate(model, m, 2)
    assert denoiser.calls == 2
    assert torch.allclose(ours, flux_reference(model, m, 2, 5.0), atol=1e-4)
    other, _ = generate(model, method("flow-euler", guidance=1.0), 2)
    assert (ours - other).abs().max() > 1e-3  # the guidance input reaches the transformer
    protocol = m.protocol(model)
    assert protocol["guidance"] == 5.0 and protocol["guidance_kind"] == "embedded"
    assert protocol["mu"] is not None and protocol["scheduler"]["use_dynamic_shifting"] is True


@pytest.mark.parametrize("name, nfe", [("flow-heun", 3), ("flow-dpmsolver++", 2), ("flow-unipc", 2)])
def test_the_other_samplers_run_on_flux_dev(name, nfe, flux_dev_dir):
    """FluxPipeline cannot run these schedulers as configured here (it passes sigmas, which Heun does not take, and
    always a mu, which the flow-sigma schedulers take only with dynamic shifting): the run, its NFE and the dynamic
    shift as their static one are checked instead; Euler's agreement with FluxPipeline is the test above."""
    model = small_flux(flux_dev_dir)
    images, denoiser = generate(model, method(name, guidance=5.0), 2)
    assert images.shape == (len(SEEDS), *model.sample_shape) and torch.isfinite(images).all()
    assert denoiser.calls == nfe


def test_transformers_take_the_timestep_by_keyword(sd3_dir, flux_dir):
    assert timestep_is_keyword(load_flow_matching(str(sd3_dir)).unet)
    assert timestep_is_keyword(load_flow_matching(str(flux_dir)).unet)
    from diffusers import UNet2DModel

    assert not timestep_is_keyword(UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                                               down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2))


# -- refusals, in one line, before sampling -----------------------------------------------------------------------------
def test_flow_samplers_refuse_other_models_in_one_line(tmp_path):
    from bench.runner import plan_run

    sd = save_tiny_t2i(tmp_path / "sd")
    for name in ("flow-euler", "flow-heun", "flow-dpmsolver++", "flow-unipc"):
        with pytest.raises(BenchError, match=rf"method '{re.escape(name)}' samples flow-matching models .* is text-to-image") as e:
            plan_run(RunSpec(method=name, model=str(sd), steps=2, num_samples=2, batch_size=2, metrics=("latency",),
                             output=str(tmp_path / "run")))
        assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_guidance_on_flux_schnell_is_refused(flux_dir):
    model = load_flow_matching(str(flux_dir))
    with pytest.raises(BenchError, match="takes no guidance") as info:
        method("flow-euler", guidance=3.5).check(model, 2)
    assert "\n" not in str(info.value)
    assert method("flow-euler").protocol(model)["guidance_kind"] == "none"


@pytest.mark.parametrize("args, match", [({"shift": 0.0}, "--shift"), ({"guidance": -1.0}, "--guidance"),
                                         ({"solver_order": 4}, "--solver-order")])
def test_bad_options_are_one_line(args, match):
    with pytest.raises(BenchError, match=match):
        METHODS.get("flow-dpmsolver++").parse_args(args)


def test_schedules_a_scheduler_cannot_represent_are_refused(flux_dev_dir):
    """A linear dynamic time shift has no static equivalent (Heun and DPM-Solver++ take no mu); a shift_terminal
    stretch is Euler's alone: both refused in one line, not silently dropped."""
    model = small_flux(flux_dev_dir)
    linear = dataclasses.replace(model, scheduler_config={**model.scheduler_config, "time_shift_type": "linear"})
    method("flow-euler").check(linear, 2)
    for name in ("flow-heun", "flow-dpmsolver++", "flow-unipc"):
        with pytest.raises(BenchError, match="linear time shift"):
            method(name).check(linear, 2)
        method(name, shift=3.0).check(linear, 2)  # a static shift replaces it
    stretched = dataclasses.replace(model, scheduler_config={**model.scheduler_config, "shift_terminal": 0.1})
    with pytest.raises(BenchError, match=r"shift_terminal=0\.1, which FlowMatchHeunDiscreteScheduler cannot") as e:
        method("flow-heun").check(stretched, 2)
    assert "\n" not in str(e.value)


# -- the protocol ------------------------------------------------------------------------------------------------------
def test_shift_option_is_recorded_and_hashed(sd3_dir, tmp_path):
    from bench.runner import plan_run

    def plan(name, **args):
        return plan_run(RunSpec(method=name, method_args=args, model=str(sd3_dir), steps=2, num_samples=2,
                                batch_size=2, metrics=("latency",), output=str(tmp_path / f"{name}-{len(args)}")))

    for name, key in (("flow-euler", "shift"), ("flow-heun", "shift"), ("flow-dpmsolver++", "flow_shift"),
                      ("flow-unipc", "flow_shift")):
        default, shifted = plan(name), plan(name, shift=3.0)
        assert default.protocol["method"]["scheduler"][key] == 1.0  # the tiny folder's config (the default shift)
        assert shifted.protocol["method"]["scheduler"][key] == 3.0 and shifted.spec.method_args["shift"] == 3.0
        assert default.protocol_hash != shifted.protocol_hash
    assert plan("flow-euler").protocol["method"]["guidance"] == 7.0  # StableDiffusion3Pipeline's default
    dpm = plan("flow-dpmsolver++").protocol["method"]["scheduler"]
    assert dpm["use_flow_sigmas"] is True and dpm["prediction_type"] == "flow_prediction"


def test_shift_changes_the_samples(sd3_dir):
    model = load_flow_matching(str(sd3_dir))
    base, _ = generate(model, method("flow-euler", guidance=3.0))
    shifted, _ = generate(model, method("flow-euler", guidance=3.0, shift=3.0))
    assert (base - shifted).abs().max() > 1e-3


def test_dynamic_shift_becomes_the_static_shift_of_schedulers_without_mu(flux_dev_dir):
    """Heun and DPM-Solver++ take no mu: they get exp(mu) as their static shift, the same sigma map as Euler's."""
    import math

    model = small_flux(flux_dev_dir)
    mu = method("flow-euler").mu(model)
    assert method("flow-heun").resolved_config(model)["shift"] == pytest.approx(math.exp(mu))
    assert method("flow-dpmsolver++").resolved_config(model)["flow_shift"] == pytest.approx(math.exp(mu))
    assert method("flow-unipc").resolved_config(model)["flow_shift"] == pytest.approx(math.exp(mu))
    assert method("flow-heun", shift=2.0).mu(model) is None  # --shift replaces the dynamic shift


# -- end to end --------------------------------------------------------------------------------------------------------
def test_bench_run_flow_euler_on_a_tiny_sd3_folder(sd3_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    rc = main(["run", "--method", "flow-euler", "--model", str(sd3_dir), "--steps", "2", "--dataset", str(prompts),
               "--num-samples", "2", "--batch-size", "2", "--metrics", "latency", "--no-progress",
               "--output", str(tmp_path / "run"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "NFE" in out.out and (tmp_path / "run" / "config.json").exists()
