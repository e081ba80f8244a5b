"""The peft adapters (LoRA, VeRA, LoHa, LoKr): parameter counts from each paper's factorization, VeRA's eq. 1 on
SD-1.5's layout, and peft's saved format loaded back. The per-subject contract (train, save, reload, restore) is
tests/test_personalization.py's, run for every adapter; bad options are rows of tests/test_bad_input.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench.errors import BenchError

PEFT_FORMAT = ("vera", "loha", "lokr")
# SD-1.5's UNet layout (three cross-attention stages and a plain one, a context wider than the first stage) at toy
# widths: every kind of attention projection SD-1.5 has, with in != out in the cross-attention keys and values
SD15_LAYOUT = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16, 32, 32),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24, attention_head_dim=2, norm_num_groups=4,
)


def method(name: str, **args):
    from bench.catalog import METHODS

    cls = METHODS.get(name)
    return cls(cls.parse_args(args))


def near_square(n: int, factor: int) -> tuple[int, int]:
    """LoKr's split of a dimension: ``factor`` x n/factor when it divides n, else the divisor pair nearest sqrt(n)."""
    if factor > 0 and n % factor == 0:
        return factor, n // factor
    m = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return m, n // m


def adapter_params(name: str, shapes: list[tuple[int, int]], **options) -> int:
    """What each paper trains on layers of (in, out) features, at the method's options (defaults unless given)."""
    from bench.catalog import METHODS

    args = METHODS.get(name).parse_args(options)
    r = args.rank
    total = 0
    for i, o in shapes:
        if name == "lora":  # B A: (out x r)(r x in)
            total += r * (i + o)
        elif name == "vera":  # b (out) and d (r); A and B are frozen
            total += o + r
        elif name == "loha":  # (B1 A1) * (B2 A2)
            total += 2 * r * (i + o)
        elif name == "lokr":  # W1 (a x c) (x) W2 (b x d), W2 = B A when r < max(b, d) / 2
            (a, b), (c, d) = near_square(o, args.decompose_factor), near_square(i, args.decompose_factor)
            w1 = r * (a + c) if args.decompose_both and r < max(a, c) / 2 else a * c
            w2 = r * (b + d) if r < max(b, d) / 2 else b * d
            total += w1 + w2
        else:
            raise ValueError(name)
    return total


def projections(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The adapted layers (to_q, to_k, to_v, to_out.0), by name, as peft left them."""
    return [(n, m) for n, m in unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]


def shapes(unet: torch.nn.Module) -> list[tuple[int, int]]:
    def base(m):
        return m.get_base_layer() if hasattr(m, "get_base_layer") else m

    return [(base(m).in_features, base(m).out_features) for _, m in projections(unet)]


def sd15_unet(seed: int = 0):
    from bench.embedded.t2i import build_unet

    torch.manual_seed(seed)
    return build_unet(SD15_LAYOUT)


def unet_inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]),
            torch.randn(2, 7, SD15_LAYOUT["cross_attention_dim"], generator=g))


def perturb(params: list[torch.nn.Parameter], seed: int = 3) -> None:
    """Trained-looking values (the zero-initialized factors would make every adapter the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", ("lora",) + PEFT_FORMAT)
def test_trained_parameters_are_the_papers_count_on_sd15_layout(name):
    unet = sd15_unet()
    layers = shapes(unet)
    assert {i for i, o in layers} == {8, 16, 32, 24}  # the context width enters the cross-attention keys/values
    m = method(name)
    params = m.inject(SimpleNamespace(unet=unet, pipeline=None), "subject_x")
    assert sum(p.numel() for p in params) == adapter_params(name, layers) > 0
    x, t, h = unet_inputs()
    assert unet(x, t, h).sample.shape == x.shape


def test_vera_is_eq1_with_shared_seeded_projections_sized_to_the_largest_layer():
    """h = W0 x + Lambda_b B Lambda_d A x (eq. 1), A and B Kaiming-uniform from the seed, one pair for all layers."""
    unet = sd15_unet()
    layers = shapes(unet)
    r, key = 6, 11
    m = method("vera", rank=r, projection_prng_key=key)
    params = m.inject(SimpleNamespace(unet=unet), "subject_x")
    adapted = projections(unet)
    # b starts at zero (the model unchanged) and d at d_initial
    assert all(torch.all(lin.vera_lambda_b["subject_x"] == 0) for _, lin in adapted)
    assert all(torch.all(lin.vera_lambda_d["subject_x"] == 0.1) for _, lin in adapted)
    perturb(params)

    # the shared pair, drawn independently: A (r x largest in), then B (largest out x r), bound sqrt(6 / fan_in)
    max_in, max_out = max(i for i, _ in layers), max(o for _, o in layers)
    g = torch.Generator().manual_seed(key)
    a = torch.empty(r, max_in).uniform_(-math.sqrt(6 / max_in), math.sqrt(6 / max_in), generator=g)
    b = torch.empty(max_out, r).uniform_(-math.sqrt(6 / r), math.sqrt(6 / r), generator=g)
    assert len({id(lin.vera_A["subject_x"]) for _, lin in adapted}) == 1  # one A for every layer
    x = torch.randn(3, max_in)
    with torch.no_grad():
        for _, lin in adapted:
            base, bd = lin.get_base_layer(), (lin.vera_lambda_b["subject_x"], lin.vera_lambda_d["subject_x"])
            xi = x[:, : base.in_features]
            expected = base(xi) + bd[0] * ((bd[1] * (xi @ a[:, : base.in_features].T)) @ b[: base.out_features].T)
            assert torch.allclose(lin(xi), expected, atol=1e-5)


@pytest.mark.parametrize("name,options", [("vera", {}), ("vera", {"save_projection": True}), ("loha", {}),
                                          ("lokr", {}), ("lokr", {"rank": 2, "decompose_both": True})])
def test_peft_format_round_trip(name, options, tmp_path):
    """Saved in peft's format, loaded by PeftModel.from_pretrained into a fresh UNet: the same output."""
    import json

    from safetensors import safe_open

    from methods.peft_adapters import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, load_peft_adapter

    unet = sd15_unet()
    model = SimpleNamespace(unet=unet)
    m = method(name, **options)
    params = m.inject(model, "subject_x")
    m.inject(model, "subject_y")  # a second subject on the same UNet (VeRA: the same shared A and B)
    perturb(params)
    m.adapters.select(model, "subject_x")
    x, t, h = unet_inputs()
    with torch.no_grad():
        tuned = unet(x, t, h).sample
    folder = tmp_path / "x"
    m.adapters.save(model, "subject_x", folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE])
    config = json.loads((folder / PEFT_CONFIG_FILE).read_text())
    assert config["peft_type"] == name.upper() and config["r"] == m.args.rank and config["inference_mode"]
    with safe_open(str(folder / PEFT_WEIGHTS_FILE), "pt") as f:
        keys = list(f.keys())
        saved = sum(f.get_tensor(k).numel() for k in keys if "vera_A" not in k and "vera_B" not in k)
    assert saved == adapter_params(name, shapes(unet), **options)  # only the trained adapter, not subject_y
    assert all(k.startswith("base_model.") for k in keys)  # PeftModel.save_pretrained's keys
    assert any("vera_A" in k for k in keys) == bool(options.get("save_projection"))

    fresh = sd15_unet()
    with torch.no_grad():
        base = fresh(x, t, h).sample
        load_peft_adapter(SimpleNamespace(unet=fresh), folder)
        loaded = fresh(x, t, h).sample
    assert not torch.allclose(loaded, base, atol=1e-4)
    assert torch.allclose(loaded, tuned, atol=1e-6), (loaded - tuned).abs().max()

    # in the run: the saved file replaces the trained values (set_peft_model_state_dict), the other subject untouched
    with torch.no_grad():
        for p in params:
            p.zero_()
    m.adapters.reload(model, "subject_x", folder)
    m.adapters.select(model, "subject_x")
    with torch.no_grad():
        assert torch.allclose(unet(x, t, h).sample, tuned, atol=1e-6)
        m.adapters.select(model, None)
        assert torch.equal(unet(x, t, h).sample, base)


def test_a_file_that_does_not_match_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from methods.peft_adapters import PEFT_WEIGHTS_FILE

    model = SimpleNamespace(unet=sd15_unet())
    m = method("loha")
    m.inject(model, "subject_x")
    m.adapters.save(model, "subject_x", tmp_path)
    state = load_file(str(tmp_path / PEFT_WEIGHTS_FILE))
    save_file({k: v for k, v in list(state.items())[1:]}, str(tmp_path / PEFT_WEIGHTS_FILE))
    with pytest.raises(BenchError, match="1 missing"):
        m.adapters.reload(model, "subject_x", tmp_path)


def test_embedded_budget_counts_and_file_sizes(tmp_path):
    """On the embedded model (counts and sizes do not depend on the trained values): each adapter trains its paper's
    count, and VeRA's file (vectors only) is the smallest."""
    from bench.models import load_model
    from bench.spec import RunSpec

    budget = {}
    for name in ("lora",) + PEFT_FORMAT:
        model = load_model("embedded-t2i")
        m = method(name, train_steps=0, drift_samples=0)
        budget[name] = m.prepare(model, RunSpec(method=name, dataset="embedded-concepts", steps=4), tmp_path / name)
        assert budget[name]["train_params"] == adapter_params(name, shapes(model.unet))
    assert budget["loha"]["train_params"] == budget["lora"]["train_params"]  # rank 2 against LoRA's 4
    assert budget["lokr"]["train_params"] < budget["lora"]["train_params"]
    assert budget["vera"]["train_saved_bytes"] == min(b["train_saved_bytes"] for b in budget.values())
    widths = {i for i, _ in shapes(model.unet)}
    assert method("vera").args.rank == min(widths)  # the card's choice: the smallest input width


def test_claims_share_lora_arm():
    """VeRA's and LyCORIS' comparisons run against the same LoRA run as LoRA's own claims (one run, reused)."""
    from bench.catalog import METHODS

    lora_arms = [arm for c in METHODS.get("lora").claims for label, arm in c.arms if arm.method == "lora"]
    for name in PEFT_FORMAT:
        claims = METHODS.get(name).claims
        against = [arm for c in claims for label, arm in c.arms if arm.method == "lora" and c.metric != "prior_drift"]
        assert against and all(arm in lora_arms for arm in against), name
        assert {c.metric for c in claims} >= {"clip_i", "train_params"}
