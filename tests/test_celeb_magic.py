"""Celeb Basis and MagiCapture (issue 19): the basis, the two losses, the composition set, the adapters' contracts.

Contract tests train one or two steps on the tiny random pipeline (tests/tiny_t2i.py); the losses are checked on
constructed inputs against their formulas.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.cli.main import main
from bench.errors import BenchError
from bench.interfaces import Batch
from bench.spec import RunSpec
from tests.test_personalization import file_digests, generate, method, tiny

COMPOSED = ("a large <orange> <diamond> on a black background", "a small <orange> <diamond> on a white background")


# -- Celeb Basis: the basis -------------------------------------------------------------------------------------------------
def test_basis_excludes_the_held_out_words_and_spans_its_embeddings(tiny_dir):
    from methods.celeb_basis import HELDOUT_WORDS, WORLD_WORDS, basis_token_ids, build_basis

    model = tiny(tiny_dir)
    tok = model.tokenizer
    ids = basis_token_ids(tok, WORLD_WORDS, HELDOUT_WORDS)
    one = lambda w: tok(w, add_special_tokens=False).input_ids  # noqa: E731
    assert not set(ids) & {*one("diamond"), *one("orange")}
    assert {*one("square"), *one("green"), *one("navy"), *one("small"), *one("cyan")} <= set(ids)
    assert len(ids) == len(set(ids)) == 16  # 6 colors (cyan is two tokens), 3 shapes, 2 sizes, 4 backgrounds
    assert basis_token_ids(tok, ["red", "orange", "diamond"], HELDOUT_WORDS) == one("red")

    weight = model.text_encoder.get_input_embeddings().weight
    basis = build_basis(weight, ids)
    rows = weight[ids].detach()
    assert basis.directions.shape == (15, weight.shape[1])  # 16 centred rows: rank 15 (16-wide tiny embedding)
    assert torch.allclose(basis.mean, rows.mean(0), atol=1e-6)
    for row in rows:  # every basis word is reproduced exactly: mean + its coefficients
        assert torch.allclose(basis.embedding(basis.project(row)), row, atol=1e-5)
    c = torch.randn(15, generator=torch.Generator().manual_seed(0))
    v = basis.embedding(c)
    assert torch.allclose(basis.project(v), c, atol=1e-4)
    # v - mean lies in the span of the centred basis rows: least squares on them leaves no residual
    sol = torch.linalg.lstsq((rows - rows.mean(0)).T.double(), (v - basis.mean).double().unsqueeze(1)).solution
    assert torch.allclose(((rows - rows.mean(0)).T.double() @ sol).squeeze(1), (v - basis.mean).double(), atol=1e-6)
    # each direction's length is its standard deviation: the coefficients of the rows have unit variance
    coefficients = torch.stack([basis.project(r) for r in rows])
    assert torch.allclose(coefficients.var(0), torch.ones(15), atol=1e-3)
    assert build_basis(weight, ids, num_components=4).directions.shape == (4, weight.shape[1])
    with pytest.raises(BenchError, match="rank 15"):
        build_basis(weight, ids, num_components=16)


@pytest.mark.parametrize("encoder", ["none", "mlp"])
def test_celeb_basis_trains_saves_reloads(encoder, tiny_dir, tmp_path):
    from safetensors.torch import load_file

    from methods import celeb_basis
    from methods.cfg import CFG

    spec = RunSpec(method="celeb-basis", dataset="embedded-concepts", steps=4, num_samples=4)
    args = {"train_steps": 2, "drift_samples": 0, "learning_rate": 0.5, "encoder": encoder, "mlp_hidden": 8}
    model = tiny(tiny_dir)
    m = method("celeb-basis", **args)
    values = m.prepare(model, spec, tmp_path / "a")
    k, width = m.basis.directions.shape
    expected = k if encoder == "none" else 64 * 8 + 8 + 8 * k + k  # shapes-cnn32's 64-d feature -> 8 -> k
    assert values["train_params"] == expected and values["train_steps"] == 4
    assert (k, width) == (15, model.text_encoder.config.hidden_size)

    saved = load_file(str(tmp_path / "a" / "diamond" / celeb_basis.BASIS_FILE))
    assert ("mlp.net.0.weight" in saved) == (encoder == "mlp")
    learned = load_file(str(tmp_path / "a" / "diamond" / "learned_embeds.safetensors"))["<diamond>"][0]
    assert torch.allclose(learned, saved["mean"] + saved["coefficients"][0] @ saved["directions"], atol=1e-6)
    start = m.basis.project(model.text_encoder.get_input_embeddings().weight[
        model.tokenizer("square", add_special_tokens=False).input_ids[0]].detach())
    assert not torch.allclose(saved["coefficients"][0], start)  # trained away from the class noun

    prompts = ["a large <diamond> on a black background", "a large <diamond> on a white background"]
    ours = generate(m, model, prompts, [1, 2])
    fresh = tiny(tiny_dir)
    celeb_basis.load(fresh.pipeline, tmp_path / "a" / "diamond")
    assert torch.allclose(ours, generate(CFG(CFG.parse_args({})), fresh, prompts, [1, 2]), atol=1e-5)

    m2 = method("celeb-basis", **args)
    m2.prepare(tiny(tiny_dir), spec, tmp_path / "b")
    assert file_digests(tmp_path / "a") == file_digests(tmp_path / "b")


# -- MagiCapture: the losses ------------------------------------------------------------------------------------------------
class _FakeUNet:
    """Predicts what the test asks: ``fn(noisy)``."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, noisy, t, encoder_hidden_states=None):
        return type("Out", (), {"sample": self.fn(noisy)})()


def test_masked_loss_ignores_everything_outside_the_mask():
    from diffusers import DDPMScheduler

    from bench.finetune import diffusion_loss

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 1:5] = 1
    outside = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * (1 - mask)

    def loss(fn, **kw):
        return diffusion_loss(_FakeUNet(fn), scheduler, latents, None, torch.Generator().manual_seed(3), **kw)

    base = loss(lambda x: 0.5 * x, mask=mask)
    assert torch.allclose(loss(lambda x: 0.5 * x + 100 * outside, mask=mask), base)  # outside: no effect
    assert not torch.allclose(loss(lambda x: 0.5 * x + 100 * outside), loss(lambda x: 0.5 * x))
    inside = torch.zeros_like(latents)
    inside[:, :, 3, 2] = 1.0
    assert loss(lambda x: 0.5 * x + inside, mask=mask) != base
    # the value: the mean squared error over the region (every channel), per sample, then the mean
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    err = (0.5 * scheduler.add_noise(latents, noise, t) - noise) ** 2
    expected = ((err * mask).flatten(1).sum(1) / (4 * mask.flatten(1).sum(1))).mean()
    assert torch.allclose(base, expected, atol=1e-6)
    assert torch.allclose(loss(lambda x: 0.5 * x, mask=torch.ones(2, 1, 8, 8)), loss(lambda x: 0.5 * x), atol=1e-6)


def test_refocusing_loss_penalizes_attention_outside_the_region():
    from methods.magicapture import refocus_loss

    heads, cells, tokens = 2, 16, 77
    masks = torch.zeros(1, 32, 32)
    masks[:, :, :16] = 1  # the left half of the image; on the 4x4 map: columns 0 and 1
    positions = torch.zeros(1, tokens, dtype=torch.bool)
    positions[0, 3] = True
    left = torch.zeros(4, 4)
    left[:, :2] = 1

    def maps(token_map):
        probs = torch.full((heads, cells, tokens), 0.0)
        probs[:, :, 0] = 1 - token_map.flatten()  # the rest of each cell's attention on the start token
        probs[:, :, 3] = token_map.flatten()
        return [(probs, heads)]

    assert float(refocus_loss(maps(left), positions, masks)) == 0.0  # all inside its region
    assert float(refocus_loss(maps(1 - left), positions, masks)) == pytest.approx(0.5)  # 8 of 16 cells, A = 1
    assert float(refocus_loss(maps(0.5 * (1 - left)), positions, masks)) == pytest.approx(0.125)
    # another token's attention outside the region is not this token's business
    other = torch.zeros(1, tokens, dtype=torch.bool)
    other[0, 5] = True
    assert float(refocus_loss(maps(1 - left), other, masks)) == 0.0


def test_composition_set_asks_for_both_concepts_with_exact_masks():
    from bench.datasets import load_dataset
    from bench.embedded.shapes import ALL_COLORS

    reference = load_dataset("embedded-composition")
    diamond, orange = reference.subjects()
    assert diamond.captions[0] == "a large green {} on a black background"
    assert orange.captions[0] == "a large {} circle on a black background"
    for s, color in ((diamond, "green"), (orange, "orange")):
        inside = s.masks > 0.999
        assert inside.sum() > 50 and (s.images[inside] == np.array(ALL_COLORS[color], np.uint8)).all()
        assert (s.masks < 0.001).sum() > 50
    prompts = reference.prompts(12)
    assert prompts[0].text == "a large <orange> <diamond> on a black background"
    assert prompts[0].attributes["objects"] == [{"shape": "diamond", "color": "orange", "size": "large"}]
    assert len({p.text for p in prompts}) == 6
    concepts = load_dataset("embedded-concepts").subjects()  # unchanged by the masks: same captions, same digest
    assert concepts[0].captions[0] == "a large {} on a black background" and concepts[0].masks is not None


@pytest.mark.parametrize("joint", [True, False])
def test_magicapture_trains_saves_reloads(joint, tiny_dir, tmp_path):
    from methods import magicapture
    from methods.cfg import CFG

    spec = RunSpec(method="magicapture", dataset="embedded-composition", steps=4, num_samples=4)
    args = {"train_steps": 1, "embedding_steps": 1, "train_batch_size": 2, "joint": joint}
    if not joint:
        args.update(masked_loss=False, refocus_weight=0.0)
    model = tiny(tiny_dir)
    plain = ["a small red square on a gray background"] * 2
    base = generate(CFG(CFG.parse_args({})), model, plain, [5, 6])
    m = method("magicapture", **args)
    values = m.prepare(model, spec, tmp_path / "a")

    attention = [x for x in model.unet.modules() if type(x).__name__ == "Attention"]
    lora = sum(4 * (lin.in_features + lin.out_features) for a in attention
               for lin in (a.to_q, a.to_k, a.to_v, a.to_out[0]))
    hidden = model.text_encoder.config.hidden_size
    assert values["train_params"] == (2 * hidden + lora if joint else 2 * (hidden + lora))
    assert values["train_steps"] == (2 if joint else 4)
    files = {str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("*.safetensors")}
    loras = {"joint/pytorch_lora_weights.safetensors"} if joint else \
        {"diamond/pytorch_lora_weights.safetensors", "orange/pytorch_lora_weights.safetensors"}
    assert files == {"diamond/learned_embeds.safetensors", "orange/learned_embeds.safetensors"} | loras
    assert json.loads((tmp_path / "a" / "budget.json").read_text())["args"]["joint"] is joint

    assert torch.equal(generate(m, model, plain, [5, 6]), base)  # prompts without a concept: the untouched model
    ours = generate(m, model, list(COMPOSED), [1, 2])
    fresh = tiny(tiny_dir)
    magicapture.load(fresh.pipeline, tmp_path / "a")
    assert torch.allclose(ours, generate(CFG(CFG.parse_args({})), fresh, list(COMPOSED), [1, 2]), atol=1e-5)
    # a batch mixing composed and plain prompts: each sample as in its own batch (up to CPU kernels' batch rounding)
    mixed = generate(m, model, [COMPOSED[0], plain[0]], [1, 5])
    assert torch.allclose(mixed[0], ours[0], atol=1e-5) and torch.allclose(mixed[1], base[0], atol=1e-5)


# -- bad input: one line, exit 2 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,fragment", [
    (["--method", "celeb-basis", "--dataset", "embedded-concepts", "--encoder", "clip"], "encoder"),
    (["--method", "celeb-basis", "--dataset", "embedded-concepts", "--num-components", "-1"], "num-components"),
    (["--method", "magicapture", "--dataset", "embedded-concepts"], "composition data set"),
    (["--method", "magicapture", "--dataset", "embedded-composition", "--drift-samples", "8"], "drift"),
    (["--method", "magicapture", "--dataset", "embedded-composition", "--refocus-weight", "-1"], "refocus"),
])
def test_bad_options_are_one_line(argv, fragment, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    rc = main(["run", "--model", "embedded-t2i", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "-n", "4",
               "--no-progress", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("bench: error: ") and fragment in err[0], err
