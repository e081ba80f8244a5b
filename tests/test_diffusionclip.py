"""DiffusionCLIP (methods/diffusionclip.py), its recipe and embedded-recolor32: checks that can fail.

The DDIM step is diffusers' DDIMScheduler step where diffusers can express the schedule; the official uniform skip over
[0, t0] inverts and regenerates exactly with an oracle noise; the adapter with the original UNet is the inversion and
regeneration written out by hand, through the model's own VAE and empty-prompt embedding; a pipeline folder passed as
--finetuned takes its unet/ (the same UNet: the same images) and a changed UNet changes them; the fine-tuning loop
moves the UNet deterministically from its seed; the domain set's sources are red and its targets blue, the rest kept.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench.attribute_edits import EmbeddedRecolor16, EmbeddedRecolor32
from bench.denoiser import CountingDenoiser, sample_seed
from bench.errors import BenchError
from bench.interfaces import Batch
from methods.diffusionclip import (DiffusionCLIP, FinetuneOptions, alphas, ddim_step, finetune, generate_from, invert,
                                   uniform_skip)
from tests.tiny_t2i import save_tiny_t2i

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_t2i(tmp_path_factory.mktemp("tiny-t2i-dclip"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from bench.models import load_text_to_image

    return load_text_to_image(str(tiny_dir), name="tiny-t2i")


@pytest.fixture(scope="module")
def items():
    return EmbeddedRecolor32().edits(3)


def make(**args) -> DiffusionCLIP:
    return DiffusionCLIP(DiffusionCLIP.parse_args(args))


def run(model, m, items, steps=4):
    den = CountingDenoiser(model.unet, torch.device("cpu"))
    seeds = tuple(sample_seed(0, i) for i in range(len(items)))
    return m.generate(model, Batch(seeds, steps, edits=tuple(items)), den), den


# -- the data set ---------------------------------------------------------------------------------------------------
def test_recolor32_sources_are_red_targets_blue_and_the_rest_is_kept():
    ref = EmbeddedRecolor32()
    edits = ref.edits(32)
    two = 0
    for i, it in enumerate(edits):
        source, target = ref.edit_scenes(i, ref.seed)
        assert it.source_prompt == source.caption and it.target_prompt == target.caption
        assert any(o.color == "red" for o in source.objects) and all(o.color != "red" for o in target.objects)
        for a, b in zip(source.objects, target.objects):
            assert b == (a if a.color != "red" else type(a)(a.shape, "blue", a.size, a.cx, a.cy))
        assert source.background == target.background and it.mask.sum() > 0
        assert it.instruction == "change the color from red to blue" and it.blend_words == ("red", "blue")
        two += len(source.objects) == 2
    assert 0 < two < 32  # one- and two-object scenes
    train = ref.training_edits(8)
    assert not any(np.array_equal(a.source, b.source) for a in train for b in edits[:8])
    prompts = ref.prompts(4)
    assert [p.attributes["objects"] for p in prompts] == [ref.edit_scenes(i, ref.seed)[1].attributes()["objects"]
                                                          for i in range(4)]
    assert ref.identity() != EmbeddedRecolor16().identity() and ref.identity()["seed"] != EmbeddedRecolor16.seed


# -- the paper's DDIM --------------------------------------------------------------------------------------------------
def test_ddim_step_is_diffusers_ddim_where_diffusers_can_follow():
    from diffusers import DDIMScheduler

    from bench.embedded.t2i import SD15_SCHEDULER_CONFIG

    sched = DDIMScheduler.from_config({k: v for k, v in SD15_SCHEDULER_CONFIG.items() if not k.startswith("_")})
    sched.set_timesteps(10)
    abar = sched.alphas_cumprod
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    for t in sched.timesteps:
        eps = torch.randn(x.shape, generator=gen)
        prev = int(t) - 1000 // 10
        alpha_prev = abar[prev] if prev >= 0 else sched.final_alpha_cumprod
        ours = ddim_step(eps, x, abar[int(t)], alpha_prev)
        assert torch.allclose(ours, sched.step(eps, t, x).prev_sample, atol=1e-5)
        x = ours


def test_uniform_skip_inverts_and_regenerates_exactly_with_the_true_noise():
    assert uniform_skip(40, 500)[:3] == [0, 12, 25] and uniform_skip(40, 500)[-1] == 500
    assert uniform_skip(6, 500) == [0, 100, 200, 300, 400, 500]
    abar = torch.linspace(0.9999, 0.01, 1000).double()
    gen = torch.Generator().manual_seed(1)
    y, e = torch.randn(3, 4, 8, 8, generator=gen).double(), torch.randn(3, 4, 8, 8, generator=gen).double()
    calls = []
    oracle = lambda x, t: (calls.append(t), e)[1]  # noqa: E731
    # the official inversion reads its input as x at t = 0 (alpha-bar_0 < 1): with the noise e of that x, every step
    # stays on x_t = sqrt(a_t) y + sqrt(1 - a_t) e, and the generation's last step (to alpha 1) returns y
    x_t0 = invert(oracle, abar[0].sqrt() * y + (1 - abar[0]).sqrt() * e, abar, 40, 500)
    assert len(calls) == 39 and calls[0] == 0 and calls[-1] == uniform_skip(40, 500)[-2]
    assert torch.allclose(x_t0, abar[500].sqrt() * y + (1 - abar[500]).sqrt() * e, atol=1e-10)
    calls.clear()
    assert torch.allclose(generate_from(oracle, x_t0, abar, 6, 500), y, atol=1e-10)
    assert calls == [500, 400, 300, 200, 100, 0]  # S_gen calls, the last from t = 0 to alpha 1


# -- the adapter ------------------------------------------------------------------------------------------------------
def test_original_unet_is_the_inversion_and_regeneration_written_out(tiny, items):
    got, den = run(tiny, make(finetuned="original", t0=300, inversion_steps=5), items, steps=4)
    assert den.calls == 4 + 4  # S_for - 1 inversion calls, S_gen generation calls
    abar = alphas(tiny)
    x = torch.from_numpy(np.stack([it.source for it in items])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        ids = tiny.tokenizer([""] * 3, padding="max_length", max_length=tiny.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        context = tiny.text_encoder(ids)[0]
        z = tiny.vae.encode(x).latent_dist.mean * tiny.vae.config.scaling_factor
        up = [int(s) for s in np.linspace(0, 300, 5)]
        for t, t_next in zip(up[:-1], up[1:]):
            eps = tiny.unet(z, t, encoder_hidden_states=context).sample
            z = abar[t_next].sqrt() * (z - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt() + (1 - abar[t_next]).sqrt() * eps
        down = [int(s) for s in np.linspace(0, 300, 4)]
        for t, t_prev in zip(down[::-1], ([-1] + down[:-1])[::-1]):
            eps = tiny.unet(z, t, encoder_hidden_states=context).sample
            a_prev = abar[t_prev] if t_prev >= 0 else torch.tensor(1.0)
            z = a_prev.sqrt() * (z - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt() + (1 - a_prev).sqrt() * eps
        want = tiny.vae.decode(z / tiny.vae.config.scaling_factor).sample.clamp(-1, 1)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_finetuned_folder_generates_and_a_pipeline_folder_gives_its_unet(tiny, tiny_dir, items, tmp_path):
    original, _ = run(tiny, make(finetuned="original"), items)
    same, _ = run(tiny, make(finetuned=str(tiny_dir)), items)  # the pipeline's unet/: the model's own UNet
    assert torch.equal(same, original)
    changed = tiny.unet.__class__.from_config(tiny.unet.config)
    changed.load_state_dict(tiny.unet.state_dict())
    with torch.no_grad():
        changed.conv_out.bias.add_(0.5)
    changed.save_pretrained(tmp_path / "ft", safe_serialization=True)
    m = make(finetuned=str(tmp_path / "ft"))
    m.check(tiny, 4)
    edited, den = run(tiny, m, items)
    assert (edited - original).abs().max() > 1e-2 and den.model is tiny.unet  # the run's denoiser is handed back
    assert m.protocol(tiny)["finetuned_digest"] != make(finetuned="original").protocol(tiny)["finetuned_digest"]
    both, _ = run(tiny, m, items)
    alone, _ = run(tiny, m, items[2:])
    assert torch.allclose(both[2:], alone, atol=1e-5)  # sample i depends on item i alone


def test_finetuning_moves_the_unet_deterministically(tiny):
    train = EmbeddedRecolor32().training_edits(2)
    options = FinetuneOptions(t0=300, inversion_steps=4, train_steps=3, lr=1e-3, passes=1, batch_size=1)
    unet, losses, updates = finetune(tiny, train, options, seed=0)
    assert updates == 2 and len(losses) == 2 and all(np.isfinite(losses))
    assert any(not torch.equal(p, q) for p, q in zip(unet.parameters(), tiny.unet.parameters()))
    assert all(not p.requires_grad for p in tiny.unet.parameters())  # the model itself is untouched
    again, losses_again, _ = finetune(tiny, train, options, seed=0)
    assert losses_again == losses
    assert all(torch.equal(p, q) for p, q in zip(unet.parameters(), again.parameters()))
    capped = finetune(tiny, train, FinetuneOptions(**{**options.__dict__, "max_updates": 3}), seed=0)
    assert capped[2] == 3


def test_committed_weights_fit_embedded_t2i_and_record_their_budget():
    from bench.models import EMBEDDED_WEIGHTS

    folder = EMBEDDED_WEIGHTS / "diffusionclip-blue"
    record = json.loads((folder / "RECIPE.json").read_text())
    assert record["command"] == "bench embedded train diffusionclip-blue" and record["wall_time_s"] > 0
    assert record["updates"] == record["budget"]["steps"] > 0
    config = json.loads((folder / "config.json").read_text())
    t2i = json.loads((EMBEDDED_WEIGHTS / "t2i" / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel"
    assert {k: config[k] for k in t2i if not k.startswith("_")} == {k: v for k, v in t2i.items() if not k.startswith("_")}


# -- bad input --------------------------------------------------------------------------------------------------------
def test_bad_options_folders_and_data_sets_are_refused_in_one_line(tiny, tmp_path, monkeypatch):
    from bench.editing import EmbeddedEdits
    import methods.diffusionclip as dc

    for args, match in [({"t0": 1000}, "--t0"), ({"inversion_steps": 1}, "--inversion-steps"),
                        ({"t0": 10, "inversion_steps": 40}, "t0 \\+ 1"), ({"finetuned": " "}, "--finetuned"),
                        ({"strength": 0.5}, "no option")]:
        with pytest.raises(BenchError, match=match) as info:
            DiffusionCLIP.parse_args(args)
        assert "\n" not in str(info.value)
    for reference in (EmbeddedEdits(), EmbeddedRecolor16()):
        with pytest.raises(BenchError, match="no source domain") as info:
            make().check_dataset(reference)
        assert "\n" not in str(info.value)
    make().check_dataset(EmbeddedRecolor32())
    with pytest.raises(BenchError, match="between 2 and"):
        make(finetuned="original", t0=100).check(tiny, 200)
    other = tiny.unet.__class__(**{**{k: v for k, v in tiny.unet.config.items() if not k.startswith("_")},
                                   "in_channels": 8})
    other.save_pretrained(tmp_path / "other", safe_serialization=True)
    with pytest.raises(BenchError, match="in_channels 8 vs 4") as info:
        make(finetuned=str(tmp_path / "other")).check(tiny, 4)
    assert "\n" not in str(info.value)
    (tmp_path / "nounet").mkdir()
    (tmp_path / "nounet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(BenchError, match="lacks diffusion_pytorch_model.safetensors"):
        make(finetuned=str(tmp_path / "nounet")).check(tiny, 4)
    monkeypatch.setattr(dc, "EMBEDDED_FOLDER", "diffusionclip-untrained")
    with pytest.raises(BenchError, match="bench embedded train diffusionclip-untrained"):
        make().check(tiny, 4)
