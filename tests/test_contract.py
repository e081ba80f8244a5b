"""The method contract: one generate signature, one guidance combination, one validator."""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import pytest
import torch

from bench.catalog import METHODS
from bench.interfaces import CONDITIONINGS, Batch, Method
from bench.sampling import guide
from bench.validate import check_bool, check_choice, check_option

ROOT = Path(__file__).resolve().parents[1]
# ``a + s * (b - a)`` with any names: the classifier-free guidance combination written out (a blend by a mask,
# P2P's local blend, is the same algebra and not guidance)
CFG = re.compile(r"(\w+)\s*\+\s*([\w.()]+)\s*\*\s*\(\s*([A-Za-z_]\w*)\s*-\s*\1\s*\)")


def test_cfg_combination_is_written_once():
    hits = []
    for folder in ("bench", "methods", "metrics"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                m = CFG.search(code)
                if m and "mask" not in m.group(2) and not code.strip().startswith(('"', "'", "summary", "``")):
                    hits.append(str(path.relative_to(ROOT)))
    assert hits == ["bench/sampling.py"], hits


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_takes_model_batch_denoiser(name):
    cls = METHODS.get(name)
    assert issubclass(cls, Method)
    assert cls.conditioning in CONDITIONINGS
    assert not hasattr(cls, "text_conditioned")
    params = list(inspect.signature(cls.generate).parameters)
    assert params == ["self", "model", "batch", "denoiser"], params
    for hook in ("check", "check_dataset", "prepare", "protocol"):
        assert callable(getattr(cls, hook))


def test_batch_checks_lengths_and_defaults_indices():
    b = Batch(seeds=[1, 2], steps=3, prompts=["a", "b"])
    assert b.indices == (0, 1) and b.prompts == ("a", "b") and len(b) == 2
    with pytest.raises(ValueError):
        Batch(seeds=(1, 2), steps=3, prompts=("a",))


def test_guide_is_cfg_and_rescale():
    u, c = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert torch.equal(guide(u, c, 1.0), u + 1.0 * (c - u))
    assert torch.allclose(guide(u, c, 7.5), c * 7.5 - u * 6.5, atol=1e-5)
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    assert torch.equal(guide(u, c, 5.0, rescale=0.7), rescale_noise_cfg(guide(u, c, 5.0), c, guidance_rescale=0.7))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "1", None])
def test_check_option_refuses_non_finite_and_non_numbers(value):
    with pytest.raises(ValueError, match="--some-option"):
        check_option("some_option", value, 0)


def test_check_option_bounds():
    check_option("x", 0, 0)
    check_option("x", 1.0, 0, 1)
    check_option("x", None, 0, optional=True)
    for bad, kw in ((0, {"lo_open": True}), (1.5, {"hi": 1}), (2.5, {"integer": True}), (-1, {})):
        with pytest.raises(ValueError):
            check_option("x", bad, 0, **kw)
    check_choice("c", "a", ("a", "b"))
    with pytest.raises(ValueError):
        check_choice("c", "z", ("a", "b"))
    check_bool("b", None, optional=True)
    with pytest.raises(ValueError):
        check_bool("b", 1)
