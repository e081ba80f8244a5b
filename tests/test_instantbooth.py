"""InstantBooth: the encoders' shapes, the adapter's zero scale, saved subjects, the recipe, and bad input.

A tiny recipe run (a few renders per subject, 2 steps) writes an encoder folder once per module; the embedded
text-to-image model is the base (InstantBooth's encoders exist only for it).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from bench.errors import BenchError
from bench.interfaces import Batch
from bench.spec import RunSpec
from tests.tiny_t2i import save_tiny_t2i


def method(**args):
    from bench.catalog import METHODS

    cls = METHODS.get("instantbooth")
    return cls(cls.parse_args(args))


def generate(m, model, prompts, seeds, steps=3):
    from bench.denoiser import CountingDenoiser

    return m.generate(model, Batch(tuple(seeds), steps, prompts=tuple(prompts)),
                      CountingDenoiser(model.unet, torch.device("cpu")))


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from bench.recipes.instantbooth import Recipe, train

    out = tmp_path_factory.mktemp("instantbooth")
    train(out, dataclasses.replace(Recipe(), steps=2, batch_size=4, images_per_subject=6, validation_images=1),
          progress=False)
    return out


def model():
    from bench.models import embedded_t2i

    return embedded_t2i()


def fresh_net(m, gate: float = 0.5):
    from bench.embedded.instantbooth import InstantBooth, config_for

    torch.manual_seed(0)
    net = InstantBooth(config_for(m)).eval()
    with torch.no_grad():  # an opened gate, so that the adapters change the UNet's output when they act
        for adapter in net.adapters.values():
            adapter.alpha_attn.fill_(gate)
    return net


def subject_images():
    from bench.personalization import EMBEDDED_CONCEPTS, embedded_subject

    return embedded_subject(EMBEDDED_CONCEPTS[0]).images_tensor()


def test_encoder_outputs_have_the_papers_shapes():
    """Concept encoder: one word embedding from K images (their mean); patch encoder: K x 16 tokens."""
    m = model()
    net = fresh_net(m)
    images = subject_images()  # [5, 3, 32, 32]
    g, p = net.features(images)
    assert g.shape == (5, 64) and p.shape == (5, 16, 128)
    out = net.encode(images)
    assert out["concept"].shape == (1, m.text_encoder.get_input_embeddings().weight.shape[1])
    assert out["patches"].shape == (1, 5 * 16, net.config.patch_dim)
    assert torch.allclose(net.encode(images[:2])["patches"][0, :16], out["patches"][0, :16])
    mean_of_images = net.concept(g.mean(0, keepdim=True))  # averaged over the input images, then mapped
    assert torch.allclose(out["concept"], mean_of_images, atol=1e-6)
    assert len(net.adapters) == 4  # one per transformer block of the embedded UNet
    with pytest.raises(BenchError, match="32x32"):
        net.features(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_adapter_at_scale_zero_leaves_the_unet_output_unchanged():
    from bench.embedded.instantbooth import Injection, transformer_blocks

    m = model()
    net = fresh_net(m)
    features = net.encode(subject_images())
    injection = Injection(net, m)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 20])
    with torch.no_grad():
        base = m.unet(x, t, encoder_hidden_states=hidden).sample
        injection.set(features["concept"], features["patches"])
        with injection.installed():
            net.set_scale(0.0)
            zero = m.unet(x, t, encoder_hidden_states=hidden).sample
            net.set_scale(1.0)
            one = m.unet(x, t, encoder_hidden_states=hidden).sample
        after = m.unet(x, t, encoder_hidden_states=hidden).sample
    assert torch.equal(zero, base)
    assert not torch.allclose(one, base, atol=1e-4)
    assert torch.equal(after, base)  # uninstalled: no fuser, no hooks left on the model
    assert not any(hasattr(b, "fuser") for _, b in transformer_blocks(m.unet))


def test_concept_embedding_replaces_the_identifier_word_only():
    from bench.embedded.instantbooth import Injection
    from bench.finetune import encode_prompts

    m = model()
    net = fresh_net(m)
    injection = Injection(net, m)
    prompts = ["a large sks on a gray background", "a large red circle on a gray background"]
    base = encode_prompts(m, prompts)
    injection.set(net.encode(subject_images())["concept"], None)
    with injection.installed():
        ours = encode_prompts(m, prompts)
    assert torch.equal(ours[1], base[1])  # no identifier: untouched
    assert not torch.allclose(ours[0], base[0])


def test_prepare_saves_subjects_that_load_back_and_records_both_budgets(encoder_dir, tmp_path):
    from methods.instantbooth import FEATURES_FILE, load_features

    m = model()
    spec = RunSpec(method="instantbooth", dataset="embedded-concepts", steps=3, num_samples=4)
    ib = method(encoder=str(encoder_dir))
    ib.check(m, 3)
    values = ib.prepare(m, spec, tmp_path / "a")
    assert values["train_steps"] == 0 and values["train_params"] == 0 and values["train_seconds"] > 0
    recipe = json.loads((encoder_dir / "RECIPE.json").read_text())
    assert values["pretrain_steps"] == 2 and values["pretrain_params"] == recipe["parameters"] > 0
    assert values["pretrain_seconds"] > 0 and values["pretrain_peak_memory_bytes"] > 0
    for name in ("diamond", "orange"):
        saved = load_features(tmp_path / "a" / name)
        assert saved["patches"].shape == (1, 5 * 16, 64) and saved["concept"].shape == (1, 64)
    assert values["train_saved_bytes"] == sum((tmp_path / "a" / n / FEATURES_FILE).stat().st_size
                                              for n in ("diamond", "orange"))

    prompts = ["a large <diamond> on a black background", "a small <diamond> on a white background"]
    ours = generate(ib, m, prompts, [1, 2])
    # a second method that reads only the saved file generates the same images
    again = method(encoder=str(encoder_dir))
    again.prepare(model(), spec, tmp_path / "b")
    again.features["diamond"] = load_features(tmp_path / "a" / "diamond")
    assert torch.equal(generate(again, m, prompts, [1, 2]), ours)
    # the subject's prompts are changed by the encoders; prompts without a subject are not
    class_prompt = ["a small red square on a gray background"]
    from methods.cfg import CFG

    assert torch.equal(generate(ib, m, class_prompt, [5]), generate(CFG(CFG.parse_args({})), m, class_prompt, [5]))
    zero = method(encoder=str(encoder_dir), adapter_scale=0.0, num_reference_images=2)
    zero.prepare(model(), spec, tmp_path / "c")
    assert load_features(tmp_path / "c" / "diamond")["patches"].shape == (1, 2 * 16, 64)
    assert not torch.equal(generate(zero, m, prompts, [1, 2]), ours)


def test_missing_or_foreign_weights_and_real_models_are_one_line(encoder_dir, tmp_path):
    m = model()
    method().check(m, 3)  # the committed weights: trained for this embedded model
    with pytest.raises(BenchError, match="make them with `bench embedded train instantbooth`"):
        method(encoder=str(tmp_path / "nothing")).check(m, 3)
    with pytest.raises(BenchError, match="no public weights"):
        from bench.models import load_model

        method(encoder=str(encoder_dir)).check(load_model(str(save_tiny_t2i(tmp_path / "tiny"))), 3)
    foreign = tmp_path / "foreign"
    shutil.copytree(encoder_dir, foreign)
    record = json.loads((foreign / "config.json").read_text())
    record["base_model"]["digest"] = "0" * 64
    (foreign / "config.json").write_text(json.dumps(record))
    with pytest.raises(BenchError, match="trained for another model"):
        method(encoder=str(foreign)).check(m, 3)


@pytest.mark.parametrize("args, message", [
    ({"train_steps": 5}, "no test-time fine-tuning"),
    ({"adapter_scale": -1.0}, "--adapter-scale"),
    ({"num_reference_images": -1}, "--num-reference-images"),
])
def test_bad_options_are_one_line(args, message):
    with pytest.raises(BenchError, match=message):
        method(**args)


def test_too_many_reference_images_is_refused_before_encoding(encoder_dir, tmp_path):
    spec = RunSpec(method="instantbooth", dataset="embedded-concepts", steps=3, num_samples=4)
    with pytest.raises(BenchError, match="has 5 images"):
        method(encoder=str(encoder_dir), num_reference_images=6).prepare(model(), spec, tmp_path / "a")
