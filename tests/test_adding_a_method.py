"""docs/adding-a-method.md, checked: a third-party adapter registered through the ``diffbench.methods`` entry-point
group (a real dist-info on sys.path, as `pip install` leaves it) is listed, runs, and its declared claim is decided
by the claims engine at a tiny size."""

from __future__ import annotations

import textwrap

import pytest

PLUGIN = '''
from bench.claim import Arm, Claim
from bench.interfaces import MethodCard
from methods.sampling import SchedulerSampler


def arm(steps):
    return Arm("toy-euler", steps, model="embedded-ddpm", dataset="shapes16", num_samples=4, seeds=(0,),
               metrics=("latency",))


class ToyEuler(SchedulerSampler):
    """A toy sampler from outside the repository: diffusers' Euler scheduler, nothing else."""

    name = "toy-euler"
    summary = "toy Euler sampler (a plugin of the docs)"
    paper = "docs/adding-a-method.md"
    card = MethodCard(citation="The diffbench docs.", url="https://example.invalid/toy",
                      reproduces="one denoiser call per step", reference="NFE = steps")
    scheduler_class = "EulerDiscreteScheduler"
    claims = (
        Claim("nfe-follows-steps", "one denoiser call per step: 8 steps cost more calls than 2", "NFE = steps",
              "nfe", (("8 steps", arm(8)), ("2 steps", arm(2))), "greater", tolerance="margin", margin=5.0),
    )
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """Install the toy plugin as a distribution with an entry point, and let the registry scan again."""
    from bench import catalog

    (tmp_path / "toy_diffbench_plugin.py").write_text(PLUGIN)
    dist = tmp_path / "toy_diffbench_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-diffbench-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""
        [diffbench.methods]
        toy-euler = toy_diffbench_plugin:ToyEuler
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = catalog.METHODS
    for name, value in list(vars(registry).items()):  # the registry's tables as they were, back after the test
        if isinstance(value, dict):
            monkeypatch.setattr(registry, name, dict(value))
    monkeypatch.setattr(registry, "_plugins_scanned", False)
    return registry


def test_a_plugin_method_is_listed_and_its_claim_decided(plugin, tmp_path, monkeypatch, capsys):
    from bench.claims import HOLDS, execute_plan, judge, plan_claims, select_claims
    from bench.cli.main import main
    from bench.spec import RunSpec
    from bench.tracking import Tracker

    assert plugin.entry("toy-euler").source == "toy-diffbench-plugin"
    assert main(["ls", "methods"]) == 0 and "toy-euler" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    refs = select_claims(["toy-euler"])
    assert [r.qualified for r in refs] == ["toy-euler/nfe-follows-steps"]
    plan = plan_claims(refs, quick=True, base=RunSpec(device="cpu"))
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "plugin")
    tracker.check()
    done = execute_plan(plan, tracker, progress=False, log=lambda line: None)
    assert not done.errors, done.errors
    verdict = judge(plan, done.results, done.errors, done.run_ids)[0]
    assert verdict.verdict == HOLDS and [v[0] for v in verdict.values] == [8.0, 2.0]
