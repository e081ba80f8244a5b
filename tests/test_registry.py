import subprocess
import sys

import pytest

from bench.errors import UnknownName
from bench.interfaces import Method
from bench.registry import Entry, Registry


def make_registry():
    reg = Registry("widget", "diffbench.test-widgets", base=Method)
    reg.register("ddim", "methods.ddim:DDIM", "a sampler", "Song et al.")
    return reg


def test_get_imports_lazily_and_checks_base():
    reg = make_registry()
    from methods.ddim import DDIM

    assert reg.get("ddim") is DDIM
    reg.register("bad", "bench.errors:BenchError", "not a method")
    with pytest.raises(TypeError, match="not a Method"):
        reg.get("bad")


def test_duplicate_names_raise():
    reg = make_registry()
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("ddim", "methods.ddpm:DDPM", "again")


def test_unknown_name_suggests_closest():
    reg = make_registry()
    with pytest.raises(UnknownName, match=r"did you mean 'ddim'\?"):
        reg.get("dim")
    with pytest.raises(UnknownName) as info:
        reg.get("zzzzzz")
    assert "did you mean" not in str(info.value)


def test_entry_point_plugins_are_registered(monkeypatch):
    class FakeDist:
        name = "diffbench-plugin"

    class FakeEP:
        name = "plugin-ddpm"
        value = "methods.ddpm:DDPM"
        dist = FakeDist()

        def load(self):
            from methods.ddpm import DDPM

            return DDPM

    import bench.registry as registry_module

    monkeypatch.setattr(registry_module, "entry_points", lambda group: [FakeEP()] if group == "diffbench.test-widgets" else [])
    reg = make_registry()
    assert "plugin-ddpm" in reg.names()
    entry = reg.entry("plugin-ddpm")
    assert entry.source == "diffbench-plugin" and entry.paper.startswith("Ho et al.")


def test_catalog_lists_without_importing_torch():
    code = "import sys, bench.catalog as c; [list(r.entries()) for r in (c.METHODS, c.METRICS, c.DATASETS, c.MODELS)]; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_registered_method_matches_its_card():
    """Contract: the lazy registry metadata equals the class's own, and every adapter has a card."""
    from bench.catalog import METHODS

    for entry in METHODS.entries():
        cls = METHODS.get(entry.name)
        assert cls.name == entry.name
        assert cls.summary == entry.summary, entry.name
        assert cls.paper == entry.paper, entry.name
        assert cls.card.citation and cls.card.url.startswith("https://") and cls.card.reproduces


def test_every_registered_metric_and_dataset_loads():
    from bench.catalog import DATASETS, METRICS

    for reg in (METRICS, DATASETS):
        for entry in reg.entries():
            obj = reg.get(entry.name)
            assert obj.name == entry.name and obj.summary == entry.summary
