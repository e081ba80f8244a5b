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
            raise AssertionError("listing must not import a plugin")

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


HEAVY = ("torch", "diffusers", "transformers", "mlflow", "torch_fidelity", "numpy")


@pytest.mark.parametrize("kind", ["methods", ""])
def test_bench_ls_imports_no_plugin_module(kind):
    """`bench ls methods` reads summaries and papers from the sources: no adapter or metric package, no heavy library."""
    code = (
        "import sys, contextlib, io\n"
        "from bench.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        f"    rc = main(['ls'{', ' + repr(kind) if kind else ''}])\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('methods', 'metrics')"
        f" or m.split('.')[0] in {HEAVY!r})\n"
        "print(rc, loaded, 'ddim' in out.getvalue() and 'Song et al.' in out.getvalue())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0 [] True", out.stdout + out.stderr


def test_static_metadata_follows_bases_constants_and_docstrings():
    from bench.registry import static_metadata

    pp2s = static_metadata("methods.dpm_solver_pp:DPMSolverPP2S")  # paper = PAPER, a module-level constant
    assert pp2s["name"] == "dpmsolver++-2s" and pp2s["paper"].startswith("Lu et al. 2022b")
    assert static_metadata("bench.models:embedded_t2i")["docstring"].startswith("tiny latent text-to-image")
    assert static_metadata("no.such.module:X") == {}


def test_summary_and_paper_are_written_once():
    """The catalog holds targets only; what `bench ls` shows is the class's own (or the loader's docstring)."""
    import ast
    import inspect

    import bench.catalog as catalog

    tree = ast.parse(inspect.getsource(catalog))
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "register"]
    for entry in catalog.MODELS.entries():
        assert entry.summary and entry.summary == inspect.getdoc(catalog.MODELS.get(entry.name)).splitlines()[0]


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
