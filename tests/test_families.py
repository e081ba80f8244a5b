"""Today's families (issue 16, first part): SDXL, SD3 and FLUX folders load through their pipelines'
``from_pretrained``; SDXL samples through the project's loop and CFG with its micro-conditioning recorded; flow-matching
models are refused by the DDPM-family samplers; the hub ids are catalogued with the offline message; and the
full-size architectures' latency configs match the published parameter counts on the meta device."""

from __future__ import annotations

import re

import pytest
import torch

from bench.catalog import METHODS, MODELS
from bench.cli.main import main
from bench.denoiser import CountingDenoiser
from bench.errors import BenchError
from bench.interfaces import Batch, FlowMatchingModel, SDXLModel
from bench.models import load_flow_matching, load_model, load_sdxl
from bench.spec import RunSpec
from tests.tiny_t2i import save_tiny_t2i

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle on a black background", "a large blue square on a white background"]
SEEDS = (3, 11)





def cfg(**args):
    cls = METHODS.get("cfg")
    return cls(cls.parse_args(args))


def generate(model, method, steps=2):
    denoiser = CountingDenoiser(model.unet, torch.device("cpu"))
    return method.generate(model, Batch(SEEDS, steps, prompts=tuple(PROMPTS)), denoiser), denoiser


# -- SDXL --------------------------------------------------------------------------------------------------------------
def test_sdxl_folder_loads_as_sdxl(sdxl_dir):
    model = load_model(str(sdxl_dir))
    assert isinstance(model, SDXLModel) and model.kind == "text-to-image-xl"
    assert type(model.pipeline).__name__ == "StableDiffusionXLPipeline"
    assert type(model.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert model.unet.config.addition_embed_type == "text_time"
    assert model.latent_shape == (4, 8, 8) and model.sample_shape == (3, 32, 32)
    assert model.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    assert len(model.modules()) == 4 and model.digest == load_sdxl(str(sdxl_dir)).digest


def test_cfg_on_sdxl_equals_the_sdxl_pipeline(sdxl_dir):
    """Two DDIM steps with guidance through the project's loop give StableDiffusionXLPipeline's images for the same
    latents, scheduler and micro-conditioning; every UNet call is counted."""
    from diffusers.utils.torch_utils import randn_tensor

    model = load_sdxl(str(sdxl_dir))
    method = cfg(guidance=3.0, crop_top=8, original_height=64, original_width=64)
    ours, denoiser = generate(model, method)
    assert denoiser.calls == 2 and denoiser.evaluations == 2 * 2 * len(SEEDS)  # both CFG branches in one batch
    pipe = model.pipeline
    pipe.scheduler = method.make_scheduler(model)
    latents = randn_tensor((len(SEEDS), *model.latent_shape), generator=[torch.Generator().manual_seed(s) for s in SEEDS])
    reference = pipe(PROMPTS, num_inference_steps=2, guidance_scale=3.0, latents=latents, output_type="pt",
                     original_size=(64, 64), crops_coords_top_left=(8, 0), target_size=(32, 32)).images * 2 - 1
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()


def test_micro_conditioning_changes_samples(sdxl_dir):
    model = load_sdxl(str(sdxl_dir))
    base, _ = generate(model, cfg(guidance=3.0))
    cropped, _ = generate(model, cfg(guidance=3.0, crop_top=16, crop_left=16))
    assert (base - cropped).abs().max() > 1e-3


def test_micro_conditioning_is_recorded_and_hashed(sdxl_dir, tmp_path):
    from bench.runner import plan_run, sample

    def plan(model, **args):
        return plan_run(RunSpec(method="cfg", method_args=args, model=str(model), steps=2, num_samples=4, batch_size=4,
                                metrics=("latency",), output=str(tmp_path / f"run-{len(args)}")))

    default, cropped = plan(sdxl_dir), plan(sdxl_dir, crop_top=4)
    assert default.protocol["method"]["micro_conditioning"] == {
        "original_size": [32, 32], "crops_coords_top_left": [0, 0], "target_size": [32, 32]}
    assert cropped.protocol["method"]["micro_conditioning"]["crops_coords_top_left"] == [4, 0]
    assert cropped.spec.method_args["crop_top"] == 4 and default.protocol_hash != cropped.protocol_hash
    assert default.prompts is not None  # a text-conditioned run: prompt i for sample i
    images, timings = sample(default, progress=False)  # the runner's whole sampling phase
    assert images.shape == (4, 32, 32, 3)
    # on an SD-1.x model the options at their defaults leave the recorded options (and so old hashes) as they were
    sd = save_tiny_t2i(tmp_path / "sd")
    assert set(plan(sd).spec.method_args) == {"scheduler", "guidance"}
    assert "micro_conditioning" not in plan(sd).protocol["method"]
    with pytest.raises(BenchError, match="micro-conditioning options .* are SDXL's") as info:
        plan(sd, crop_top=4)
    assert "\n" not in str(info.value)


def test_other_methods_refuse_sdxl_in_one_line(sdxl_dir):
    model = load_sdxl(str(sdxl_dir))
    for name, args in (("ddim", {}), ("freeu", {})):
        cls = METHODS.get(name)
        with pytest.raises(BenchError, match="text-to-image-xl") as info:
            cls(cls.parse_args(args)).check(model, 10)
        assert "\n" not in str(info.value)


# -- SD3 and FLUX: flow matching ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_flow_folders_load_as_flow_matching_models(which, request):
    folder = request.getfixturevalue(f"{which}_dir")
    model = load_model(str(folder))
    assert isinstance(model, FlowMatchingModel) and model.kind == "flow-matching" and model.family == which
    assert model.prediction_type == "flow"
    assert model.scheduler_config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert "shift" in model.scheduler_config  # read from the folder's scheduler/, not assumed
    expected = {"sd3": ("SD3Transformer2DModel", 3, "StableDiffusion3Pipeline"),
                "flux": ("FluxTransformer2DModel", 2, "FluxPipeline")}[which]
    assert (type(model.unet).__name__, len(model.text_encoders), type(model.pipeline).__name__) == expected
    assert len(model.tokenizers) == expected[1] and model.digest == load_flow_matching(str(folder)).digest


@pytest.mark.parametrize("method", ["ddim", "dpmsolver++", "cfg"])
def test_ddpm_family_methods_refuse_flow_models_before_sampling(method, flux_dir, tmp_path):
    from bench.runner import plan_run

    with pytest.raises(BenchError, match=rf"method '{re.escape(method)}' samples DDPM-family models; .* is a "
                                         r"flow-matching model.*flow-euler") as info:
        plan_run(RunSpec(method=method, model=str(flux_dir), steps=2, num_samples=4, batch_size=4,
                         metrics=("latency",), output=str(tmp_path / "run")))
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()


def test_flow_folder_without_safetensors_is_one_line(sd3_dir, tmp_path):
    import shutil

    broken = tmp_path / "sd3"
    shutil.copytree(sd3_dir, broken)
    for f in (broken / "text_encoder_3").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(BenchError, match=r"lacks text_encoder_3/\*\.safetensors") as info:
        load_model(str(broken))
    assert "\n" not in str(info.value)


# -- the catalog: hub ids, offline -------------------------------------------------------------------------------------
HUB_IDS = {"stabilityai/stable-diffusion-xl-base-1.0": False, "stabilityai/stable-diffusion-3-medium-diffusers": True,
           "black-forest-labs/FLUX.1-schnell": False, "black-forest-labs/FLUX.1-dev": True}


def test_hub_ids_are_listed_and_offline_is_one_line(capsys):
    assert main(["ls", "models"]) == 0
    listed = capsys.readouterr().out
    for hub_id, gated in HUB_IDS.items():
        assert hub_id in listed and hub_id in MODELS
        with pytest.raises(BenchError, match=rf"hf download {hub_id}") as info:
            load_model(hub_id)
        assert "\n" not in str(info.value) and ("gated repository" in str(info.value)) == gated


# -- latency architectures: published sizes, call signatures, memory ---------------------------------------------------
# published parameter counts, with the tolerance their rounding allows (half a unit of the last digit given):
PUBLISHED = {
    "sdxl-unet": (2.6e9, 0.05e9),  # Podell et al. 2023 (arXiv 2307.01952), Table 1: UNet 2.6B
    "sd3-medium-transformer": (2e9, 0.5e9),  # stabilityai/stable-diffusion-3-medium model card: a 2 billion parameter MMDiT
    "flux1-transformer": (12e9, 0.5e9),  # black-forest-labs/FLUX.1-dev model card: 12 billion parameter rectified flow transformer
}


# and the exact counts of the configs in bench/archs (printed by bench.profile.parameter_count on the meta device)
EXACT = {"sdxl-unet": 2_567_463_684, "sd3-medium-transformer": 2_028_328_000, "flux1-transformer": 11_901_408_320}


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_new_architectures_are_the_published_sizes(arch):
    from bench.profile import parameter_count

    published, tolerance = PUBLISHED[arch]
    count = parameter_count(arch)
    assert abs(count - published) <= tolerance and count == EXACT[arch], count


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_latency_call_signature_runs_on_the_meta_device(arch):
    """The full-size module on the meta device (no memory) takes the inputs the profile's call gives it and returns
    a prediction of the latent's shape."""
    import diffusers

    from bench.profile import LatencyProfile, _config, forward_call

    class_name, config = _config(arch)
    with torch.device("meta"):
        module = getattr(diffusers, class_name).from_config(config)
    profile = LatencyProfile(arch=arch, resolution=256, batch_size=2)
    out = forward_call(profile, module, config, lambda *shape: torch.empty(*shape, device="meta"),
                       torch.device("meta"))()
    expected = {"sdxl-unet": (2, 4, 32, 32), "sd3-medium-transformer": (2, 16, 32, 32),
                "flux1-transformer": (2, 16 * 16, 64)}[arch]
    assert tuple(out.shape) == expected


def test_arch_too_large_for_memory_is_refused_before_allocating(monkeypatch, capsys):
    import bench.profile as profile

    monkeypatch.setattr(profile, "available_bytes", lambda device: 2**30)  # 1 GiB free
    assert main(["profile", "latency", "--arch", "flux1-transformer", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "flux1-transformer needs" in err and "GiB" in err and err.count("\n") == 1
