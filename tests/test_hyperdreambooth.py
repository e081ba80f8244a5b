"""HyperDreamBooth (methods/hyperdreambooth.py, bench/embedded/hyperdreambooth.py, bench/recipes/hyperdreambooth.py):
LiDB's bases and weight count, the per-sample LiDB hooks against merged weights, the HyperNetwork's shapes, the
saved LoRA's round trip through diffusers' loader, and the one-line refusals. Tiny budgets: seconds each."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.embedded import hyperdreambooth as hdb
from bench.errors import BenchError
from bench.spec import RunSpec
from tests.test_personalization import generate, method, tiny, tiny_dir  # noqa: F401 (tiny_dir is a fixture)

TINY_LIDB = hdb.LiDBConfig(rank=1, aux_down=4, aux_up=4)  # the tiny UNet's layers are 16-32 wide


def save_random_hypernetwork(folder: Path, model, digest: str | None = None, scale: float = 0.05) -> hdb.LiDBBasis:
    """A random HyperNetwork for ``model`` (its head scaled up so that its prediction visibly changes the model)."""
    torch.manual_seed(0)
    basis = hdb.LiDBBasis.create(model.unet, TINY_LIDB)
    net = hdb.HyperNetwork(hdb.HyperConfig(width=16, depth=1, heads=2, iterations=2), len(basis.layers),
                           TINY_LIDB.per_layer)
    with torch.no_grad():
        net.head.weight.normal_(0, scale)
    meta = {"base_model": {"name": model.name, "digest": digest or model.digest}, "identifier": "sks"}
    hdb.save_hypernetwork(folder, net, basis, meta)
    return basis


@pytest.fixture
def hyper_folder(tmp_path, monkeypatch):
    folder = tmp_path / "hyper"
    monkeypatch.setattr(hdb, "hypernetwork_folder", lambda: folder)
    monkeypatch.setattr("methods.hyperdreambooth.hypernetwork_folder", lambda: folder)
    return folder


def test_lidb_bases_are_orthonormal_and_the_weight_count_is_the_papers_formula():
    from bench.models import embedded_t2i

    unet = embedded_t2i().unet
    config = hdb.LiDBConfig()
    basis = hdb.LiDBBasis.create(unet, config)
    attention = [m for m in unet.modules() if type(m).__name__ == "Attention"]
    assert len(basis.layers) == 4 * len(attention) == 32  # to_q, to_k, to_v, to_out.0 of every attention
    for name in basis.layers:
        a, b = basis.a_aux[name], basis.b_aux[name]
        out_features, in_features = unet.get_submodule(name).weight.shape
        assert a.shape == (config.aux_down, in_features) and b.shape == (out_features, config.aux_up)
        assert torch.allclose(a @ a.T, torch.eye(config.aux_down), atol=1e-5)  # orthonormal rows
        assert torch.allclose(b.T @ b, torch.eye(config.aux_up), atol=1e-5)  # orthonormal columns
    theta = basis.init_weights(3, torch.Generator().manual_seed(0))
    assert theta.shape == (3, 32, (config.aux_down + config.aux_up) * config.rank)
    assert theta[0].numel() == 32 * (32 + 16) * 1 == 1536  # L (a + b) r personalized numbers per subject
    assert torch.equal(theta[0], theta[2])  # one shared initialization
    factors = basis.lora_factors(theta[0])
    a_l, b_l = factors[basis.layers[0]]
    assert a_l.shape == (1, unet.get_submodule(basis.layers[0]).in_features) and not b_l.any()  # B starts at zero
    with pytest.raises(BenchError, match="orthonormal rows"):
        hdb.LiDBBasis.create(unet, hdb.LiDBConfig(aux_down=200))


def test_per_sample_lidb_equals_each_samples_merged_weights(tiny_dir):
    """lidb_forward (one UNet pass, sample i with its own weights) against the UNet with W + B_i A_i merged."""
    from bench.finetune import encode_prompts

    model = tiny(tiny_dir)
    basis = hdb.LiDBBasis.create(model.unet, TINY_LIDB)
    theta = torch.randn(2, len(basis.layers), TINY_LIDB.per_layer, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    hidden = encode_prompts(model, ["a large sks square on a black background", "a small red circle"])
    t = torch.tensor([10, 500])
    with torch.no_grad():
        with hdb.lidb_forward(model.unet, basis, theta):
            together = model.unet(x, t, encoder_hidden_states=hidden).sample
        plain = model.unet(x, t, encoder_hidden_states=hidden).sample
        for i in range(2):
            saved = {n: model.unet.get_submodule(n).weight.clone() for n in basis.layers}
            for name, (a, b) in basis.lora_factors(theta[i]).items():
                model.unet.get_submodule(name).weight += b @ a
            alone = model.unet(x[i : i + 1], t[i : i + 1], encoder_hidden_states=hidden[i : i + 1]).sample
            for name, w in saved.items():
                model.unet.get_submodule(name).weight.copy_(w)
            tol = 1e-5 * float(alone.abs().max())  # float32 rounding of a different summation order
            assert torch.allclose(together[i : i + 1], alone, atol=tol), (together[i] - alone[0]).abs().max()
    assert not torch.allclose(together, plain, atol=1e-4)  # the hooks are gone after the block, and they did act
    assert torch.equal(plain, model.unet(x, t, encoder_hidden_states=hidden).sample.detach())


def test_hypernetwork_shapes_and_iterative_refinement():
    encoder = hdb.ImageEncoder()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    tokens = encoder(images)
    assert tokens.shape == (3, 16, encoder.channels) and not tokens.requires_grad
    config = hdb.HyperConfig(width=32, depth=1, heads=2, iterations=3)
    net = hdb.HyperNetwork(config, layers=32, per_layer=48, feature_channels=encoder.channels)
    theta = net(tokens)
    assert theta.shape == (3, 32, 48)
    one = hdb.HyperNetwork(hdb.HyperConfig(width=32, depth=1, heads=2, iterations=1), 32, 48,
                           feature_channels=encoder.channels)
    one.load_state_dict(net.state_dict())
    assert not torch.allclose(one(tokens), theta)  # later iterations refine the first prediction
    assert not torch.allclose(theta[0], theta[1])  # the prediction depends on the image


def test_training_subjects_never_hold_the_held_out_concepts():
    from bench.embedded.shapes import HELDOUT_COLORS, HELDOUT_SHAPES

    subjects = hdb.training_subjects()
    assert len(subjects) == 54 and len({s.name for s in subjects}) == 54
    assert not {s.shape for s in subjects} & set(HELDOUT_SHAPES)
    assert not {s.color for s in subjects} & set(HELDOUT_COLORS)
    scenes = hdb.subject_scenes(5, 3)
    assert [o.shape for s in scenes for o in s.objects] == [subjects[5].shape] * 3
    assert scenes == hdb.subject_scenes(5, 3)  # seeded


def test_adapter_predicts_fine_tunes_saves_and_reloads_as_lora(tiny_dir, tmp_path, hyper_folder):
    """The saved rank-(1 + r) LoRA is the prediction plus the relaxed LoRA; load_lora_weights reproduces generation;
    the UNet's own weights are back as they were."""
    from methods.cfg import CFG
    from methods.hyperdreambooth import LORA_FILE, load

    model = tiny(tiny_dir)
    basis = save_random_hypernetwork(hyper_folder, model)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    spec = RunSpec(method="hyperdreambooth", dataset="embedded-concepts", steps=4, num_samples=4)
    m = method("hyperdreambooth", train_steps=2, drift_samples=0, reference_image=2)
    m.check(model, 4)
    values = m.prepare(model, spec, tmp_path / "a")
    assert values["train_steps"] == 2 * 2 and values["train_seconds"] > 0
    assert values["train_params"] == sum(4 * (lin.in_features + lin.out_features)
                                         for lin in (model.unet.get_submodule(n) for n in basis.layers))
    after = {k.replace(".base_layer", ""): v for k, v in model.unet.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys()
    for k, v in before.items():  # the prediction merged for the fine-tune is taken out again
        assert torch.equal(after[k], v), k

    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "a" / "diamond" / LORA_FILE))
    down = [v for k, v in state.items() if "lora_A" in k or "lora.down" in k]
    assert down and all(v.shape[0] == 4 + 1 for v in down)  # relaxed rank 4 + LiDB's rank 1

    prompts = ["a large <diamond> on a black background", "a large <diamond> on a white background"]
    ours = generate(m, model, prompts, [1, 2])
    fresh = tiny(tiny_dir)
    diamond = m.subjects["diamond"]
    load(fresh.pipeline, tmp_path / "a" / "diamond")
    texts = [p.replace(diamond.token, m.phrase(diamond)) for p in prompts]
    assert torch.allclose(ours, generate(CFG(CFG.parse_args({})), fresh, texts, [1, 2]), atol=1e-5)


def test_prediction_alone_is_saved_exactly(tiny_dir, tmp_path, hyper_folder):
    """With 0 fine-tune steps the saved LoRA's update B A is the HyperNetwork's LiDB prediction, multiplied out."""
    from safetensors.torch import load_file

    from methods.hyperdreambooth import LORA_FILE

    model = tiny(tiny_dir)
    save_random_hypernetwork(hyper_folder, model)
    spec = RunSpec(method="hyperdreambooth", dataset="embedded-concepts", steps=4, num_samples=4)
    m = method("hyperdreambooth", train_steps=0, drift_samples=0)
    m.prepare(model, spec, tmp_path / "a")
    hyper = hdb.load_hypernetwork(hyper_folder)
    image = m.subjects["orange"].images_tensor()[:1]
    expected = hyper.basis.lora_factors(hyper.predict(image)[0])
    state = load_file(str(tmp_path / "a" / "orange" / LORA_FILE))
    for layer, (a, b) in expected.items():
        (down,) = [v for k, v in state.items() if layer in k and ("lora_A" in k or "lora.down" in k)]
        (up,) = [v for k, v in state.items() if layer in k and ("lora_B" in k or "lora.up" in k)]
        assert (b @ a).abs().max() > 0
        assert torch.allclose(up @ down, b @ a, atol=1e-6)


def test_missing_hypernetwork_names_its_recipe(tmp_path, hyper_folder, tiny_dir):
    m = method("hyperdreambooth")
    with pytest.raises(BenchError, match="bench embedded train hyperdreambooth") as info:
        m.check(tiny(tiny_dir), 4)
    assert "\n" not in str(info.value)


def test_refuses_a_model_without_a_hypernetwork(tmp_path, hyper_folder, tiny_dir):
    model = tiny(tiny_dir)
    save_random_hypernetwork(hyper_folder, model, digest="0" * 64)
    with pytest.raises(BenchError, match="no public HyperDreamBooth hypernetwork for"):
        method("hyperdreambooth").check(model, 4)


def test_bad_options_are_one_line(tiny_dir, hyper_folder):
    from bench.personalization import load_personalization_set

    with pytest.raises(BenchError, match="--reference-image must be an integer >= 0"):
        method("hyperdreambooth", reference_image=-1)
    with pytest.raises(BenchError, match="subject diamond has 5 images"):
        method("hyperdreambooth", reference_image=5).check_dataset(load_personalization_set("embedded-concepts"))
    model = tiny(tiny_dir)
    save_random_hypernetwork(hyper_folder, model)
    with pytest.raises(BenchError, match="trained with 'sks'"):
        method("hyperdreambooth", identifier="xyz").check(model, 4)


def test_recipe_runs_on_a_tiny_budget(tmp_path):
    """The recipe end to end with one step of each phase: weights, config and RECIPE.json with the budget."""
    import json

    from bench.recipes.hyperdreambooth import Recipe, train

    record = train(tmp_path, Recipe(images_per_subject=1, pre_steps=1, steps=1, batch_size=2, validation_images=1),
                   progress=False)
    assert record["budget"]["pretrain_steps"] == 2 and record["budget"]["pretrain_seconds"] > 0
    assert record["lidb"]["weights_per_subject"] == 1536
    assert json.loads((tmp_path / "RECIPE.json").read_text())["budget"] == record["budget"]
    loaded = hdb.load_hypernetwork(tmp_path)
    assert loaded.meta["identifier"] == "sks" and len(loaded.basis.layers) == 32
    assert loaded.predict(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 32, 48)
