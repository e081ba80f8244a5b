"""Claims as data (bench/claim.py, bench/claims.py): the planner and the verdict rules on fake values, every
registered method declaring a claim, and a few cheap declared claims run through the engine at a tiny size.

The paper claims themselves live on the adapters (``Method.claims``) and are decided by `bench claims`; these tests
run the same declarations with a few samples (the full and --quick sizes are `bench claims [--quick]`).
"""

from __future__ import annotations

import math

import pytest

from bench.claim import Arm, Claim, pixel
from bench.claims import (FAILS, HOLDS, UNMEASURED, ClaimRef, decide, execute_plan, judge, latest_verdicts,
                          markdown_table, plan_claims, record, select_claims)
from bench.errors import BenchError, UnknownName


def two(relation="less", tolerance="ci", margin=0.0, relative=False, bound=None, metric="fid", arms=None) -> Claim:
    arms = arms or (("a", Arm("ddim", 50)), ("b", Arm("ddim", 5)))
    return Claim("c", "a statement", "the paper's numbers", metric, arms, relation, tolerance, margin, relative, bound)


def fake_class(name):
    return None


# -- verdict rules ----------------------------------------------------------------------------------------------


def test_less_holds_when_the_paired_interval_is_below_zero():
    verdict, why = decide(two(), [{0: 1.0, 1: 1.1, 2: 0.9}, {0: 2.0, 1: 2.2, 2: 1.9}])
    assert verdict == HOLDS and "paired over 3 seeds" in why


def test_less_does_not_hold_when_the_interval_straddles_zero():
    assert decide(two(), [{0: 1.0, 1: 2.5, 2: 0.9}, {0: 2.0, 1: 1.2, 2: 1.9}])[0] == FAILS
    assert decide(two("greater"), [{0: 1.0, 1: 1.1}, {0: 2.0, 1: 2.2}])[0] == FAILS


def test_pairing_by_seed_beats_the_spread_between_seeds():
    """Each seed's pair moves together (the same initial noise): the difference is clear though the means'
    intervals overlap."""
    a, b = {0: 1.0, 1: 3.0, 2: 5.0}, {0: 1.2, 1: 3.2, 2: 5.3}
    assert decide(two(), [a, b])[0] == HOLDS


def test_margin_tolerance_and_one_seed_compare_means():
    assert decide(two(tolerance="margin", margin=0.5), [{0: 1.0}, {0: 1.4}])[0] == FAILS
    assert decide(two(tolerance="margin", margin=0.5), [{0: 1.0}, {0: 1.6}])[0] == HOLDS
    verdict, why = decide(two(), [{0: 1.0}, {0: 1.6}])
    assert verdict == HOLDS and "no interval" in why


def test_relative_margin_is_a_fraction_of_the_other_arm():
    claim = two("at-most", margin=0.1, relative=True)
    assert decide(claim, [{0: 1.05, 1: 1.06, 2: 1.04}, {0: 1.0, 1: 1.0, 2: 1.0}])[0] == HOLDS
    assert decide(claim, [{0: 1.3, 1: 1.31, 2: 1.29}, {0: 1.0, 1: 1.0, 2: 1.0}])[0] == FAILS
    assert decide(two("at-least", margin=0.1, relative=True), [{0: 0.95, 1: 0.96, 2: 0.955}, {0: 1.0, 1: 1.0, 2: 1.0}])[0] == HOLDS


def test_within_and_bounds():
    near = two("within", margin=0.2)
    assert decide(near, [{0: 1.0, 1: 1.1}, {0: 1.05, 1: 1.0}])[0] == HOLDS
    assert decide(near, [{0: 1.0, 1: 1.0}, {0: 2.0, 1: 2.0}])[0] == FAILS
    one = (("a", Arm("ddim", 50)),)
    assert decide(two("at-most", bound=2.0, arms=one), [{0: 1.0, 1: 1.1, 2: 1.05}])[0] == HOLDS
    assert decide(two("at-least", bound=2.0, arms=one), [{0: 1.0, 1: 1.1, 2: 1.05}])[0] == FAILS


def test_u_shape_and_monotone_relations():
    arms = tuple((f"s{i}", Arm("cfg", 20, {"guidance": float(i)})) for i in range(4))
    u = two("minimum-inside", arms=arms)
    values = [{0: 3.0, 1: 3.1}, {0: 1.0, 1: 1.1}, {0: 2.0, 1: 2.1}, {0: 4.0, 1: 4.1}]
    assert decide(u, values)[0] == HOLDS
    assert decide(u, [{0: 1.0, 1: 1.1}, {0: 2.0, 1: 2.1}, {0: 3.0, 1: 3.1}, {0: 4.0, 1: 4.1}])[0] == FAILS
    down = two("decreasing", tolerance="margin", arms=arms[:3])
    assert decide(down, [{0: 3.0}, {0: 2.0}, {0: 1.0}])[0] == HOLDS
    assert decide(down, [{0: 3.0}, {0: 4.0}, {0: 1.0}])[0] == FAILS
    assert decide(two("increasing", tolerance="margin", arms=arms[:3]), [{0: 1.0}, {0: 2.0}, {0: 3.0}])[0] == HOLDS


def test_a_missing_value_is_not_measured_with_the_reason():
    verdict, why = decide(two(), [{0: math.nan}, {0: 1.0}])
    assert verdict == UNMEASURED and "no value of fid for arm 'a'" in why


def test_bad_declarations_fail_at_import():
    with pytest.raises(ValueError, match="relation"):
        two("below")
    with pytest.raises(ValueError, match="bound or two arms"):
        two("at-most", arms=(("a", Arm("ddim", 50)),))
    with pytest.raises(ValueError, match="two arms"):
        two("less", arms=(("a", Arm("ddim", 50)),))


# -- planning ---------------------------------------------------------------------------------------------------


def test_identical_runs_are_shared_between_claims_and_quick_sizes_apply():
    c1 = Claim("x", "s", "r", "fid", (("a", pixel("ddim", 50)), ("b", pixel("ddim", 5))))
    c2 = Claim("y", "s", "r", "fid", (("a", pixel("ddim", 50)), ("b", pixel("pndm", 20))))
    full = plan_claims([ClaimRef("ddim", c1), ClaimRef("pndm", c2)], method_class=fake_class)
    assert len(full.runs) == 9 and full.shared() == 3  # ddim 50 x 3 seeds serves both claims
    assert {r.spec.num_samples for r in full.runs.values()} == {1000}
    quick = plan_claims([ClaimRef("ddim", c1), ClaimRef("pndm", c2)], quick=True, method_class=fake_class)
    assert len(quick.runs) == 6 and {r.spec.num_samples for r in quick.runs.values()} == {128}
    assert quick.arms["ddim/x"][0] == quick.arms["pndm/y"][0]
    assert quick.sample_calls() == 128 * 2 * (50 + 5 + 20) and quick.estimate_seconds() > 0
    tiny = plan_claims([ClaimRef("ddim", c1)], quick=True, method_class=fake_class, num_samples=8, seeds=(0,))
    assert len(tiny.runs) == 2 and {(r.spec.num_samples, r.spec.seed) for r in tiny.runs.values()} == {(8, 0)}


def test_quick_options_and_steps_change_the_run():
    arm = Arm("dreambooth", 25, {"prior_preservation": False}, quick_steps=10, quick_options={"train_steps": 40})
    claim = Claim("z", "s", "r", "clip_i", (("a", arm), ("b", Arm("textual-inversion", 25))), "greater")
    plan = plan_claims([ClaimRef("dreambooth", claim)], quick=True, method_class=fake_class)
    first = plan.runs[plan.arms["dreambooth/z"][0][0][1]].spec
    assert first.steps == 10 and dict(first.method_args) == {"prior_preservation": False, "train_steps": 40}


def test_claim_tags_are_valid_mlflow_keys():
    from bench.claims import tag_key

    assert tag_key("dpmsolver++", "10-steps-at-or-below-ddim-50") == "claim.dpmsolver__.10-steps-at-or-below-ddim-50"


def test_a_failed_run_makes_its_claims_not_measured():
    claim = Claim("x", "s", "r", "fid", (("a", pixel("ddim", 50)), ("b", pixel("ddim", 5))))
    plan = plan_claims([ClaimRef("ddim", claim)], quick=True, method_class=fake_class)
    keys = [k for arm in plan.arms["ddim/x"] for _, k in arm]
    results = {k: {"fid": 1.0 if i < 2 else 2.0} for i, k in enumerate(keys)}
    assert judge(plan, results)[0].verdict == HOLDS
    verdict = judge(plan, results, errors={keys[0]: "out of memory"})[0]
    assert verdict.verdict == UNMEASURED and "failed: out of memory" in verdict.detail
    assert "| ddim " in markdown_table([verdict]) and "not measured" in markdown_table([verdict])


# -- the declarations -------------------------------------------------------------------------------------------

FROM_PACKAGE_E = {"ddpo", "reward-weighted", "diffusion-dpo", "diffedit"}  # their claims come with their fixes


def registered():
    from bench.catalog import METHODS

    return [e.name for e in METHODS.entries() if e.source == "builtin"]


@pytest.mark.parametrize("name", registered())
def test_every_registered_method_declares_a_claim(name):
    from bench.catalog import METHODS, METRICS

    claims = METHODS.get(name).claims
    why = " (declared with the alignment and DiffEdit fixes of issue 13)" if name in FROM_PACKAGE_E else ""
    assert claims, f"method {name!r} declares no claim{why}"
    ids = [c.id for c in claims]
    assert len(ids) == len(set(ids)), f"{name}: claim ids repeat: {ids}"
    for claim in claims:
        assert claim.statement and claim.reference, f"{name}/{claim.id}: the statement and the paper's numbers"
        for _, arm in claim.arms:
            assert arm.method in METHODS, f"{name}/{claim.id}: unknown method {arm.method!r}"
            METHODS.get(arm.method).parse_args({**arm.options, **arm.quick_options})
            for metric in arm.metrics or ():
                assert metric in METRICS, f"{name}/{claim.id}: unknown metric {metric!r}"


def test_every_claim_metric_is_a_declared_output():
    """A claim names a value some metric declares (bench.outputs): a renamed key fails here, not in `bench claims`."""
    import bench.outputs

    lookup = getattr(bench.outputs, "lookup", None)
    if lookup is None:
        pytest.skip("metrics do not declare their outputs yet")
    from bench.catalog import METHODS

    missing = [f"{name}/{c.id}: {c.metric}" for name in registered() for c in METHODS.get(name).claims
               if lookup(c.metric) is None]
    assert not missing, missing


def test_unknown_method_is_exit_2_with_a_suggestion(capsys):
    from bench.cli.main import main

    with pytest.raises(UnknownName, match="did you mean 'ddim'"):
        select_claims(["ddimm"])
    assert main(["claims", "--method", "ddimm", "--plan"]) == 2
    assert "did you mean 'ddim'" in capsys.readouterr().err
    assert main(["claims", "--method", "ddim", "--claim", "more-steps", "--plan"]) == 2


def test_quick_plan_of_everything_prints_runs_and_an_estimate(capsys):
    from bench.cli.main import main

    assert main(["claims", "--quick", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "ddim/more-steps-lower-fid" in out and "estimated time" in out and "sample-calls" in out


# -- the engine on declared claims, at a tiny size ----------------------------------------------------------------

CHEAP = [("cfg-rescale", "zero-terminal-snr-reaches-darker", 16), ("ddim", "more-steps-lower-fid", 128)]  # FID: >= 128


@pytest.mark.parametrize("method,claim_id,n", CHEAP)
def test_declared_claim_runs_through_the_engine_at_a_tiny_size(method, claim_id, n, tmp_path, monkeypatch):
    from bench.spec import RunSpec
    from bench.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    refs = [r for r in select_claims([method]) if r.claim.id == claim_id]
    plan = plan_claims(refs, quick=True, base=RunSpec(device="cpu"), num_samples=n, seeds=(0, 1))
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "claims-test")
    tracker.check()
    done = execute_plan(plan, tracker, progress=False, log=lambda line: None)
    assert not done.errors and done.made == len(plan.runs)
    verdicts = judge(plan, done.results, done.errors, done.run_ids)
    assert verdicts[0].verdict in (HOLDS, FAILS), verdicts[0].detail
    record(verdicts, tracker, plan, done, tmp_path / "claims")
    again = execute_plan(plan, tracker, progress=False, log=lambda line: None)
    assert again.made == 0 and again.reused == len(plan.runs)  # FINISHED runs of the same protocol are reused
    rows, run = latest_verdicts(tracker)
    assert rows[0]["verdict"] == verdicts[0].verdict and run.data.tags[f"claim.{method}.{claim_id}"]



def test_update_writes_the_table_between_the_markers_only(tmp_path):
    from bench.cli.claims import BEGIN, END, update_markers

    page = tmp_path / "README.md"
    page.write_text(f"before\n{BEGIN}\nold table\n{END}\nafter\n", encoding="utf-8")
    update_markers(page, "| a |\n|---|\n| 1 |", quick=True)
    text = page.read_text(encoding="utf-8")
    assert text.startswith("before\n") and text.endswith(f"{END}\nafter\n")
    assert "old table" not in text and "| 1 |" in text and "bench claims --quick --markdown --update" in text


def test_update_without_markers_is_bad_input_before_any_run(tmp_path):
    from bench.cli.main import main

    page = tmp_path / "notes.md"
    page.write_text("no markers\n", encoding="utf-8")
    assert main(["claims", "--method", "ddim", "--quick", "--update", str(page)]) == 2


def test_a_training_shared_across_arms_is_estimated_once():
    """asyrp's claims run three strengths over one trained f_t (the cache key leaves the strength out): the plan
    counts its optimizer steps (planned_train_steps: passes x batches x timesteps >= t_edit) once, not per run."""
    from bench.claims import SECONDS_PER_TRAIN_STEP, plan_claims, select_claims

    plan = plan_claims(select_claims(["asyrp"]), quick=True)
    runs = list(plan.runs.values())
    assert len(runs) == 3 and len({r.train_key for r in runs}) == 1 and runs[0].train_key is not None
    assert [r.train_steps for r in runs] == [10 * 2 * 5] * 3  # quick: 10 passes x 16/8 batches x 5 timesteps >= 500
    per_run = sum(r.estimate_seconds() for r in runs)
    assert plan.estimate_seconds() == pytest.approx(per_run - 2 * 100 * SECONDS_PER_TRAIN_STEP)
    ddim = plan_claims(select_claims(["ddim"]), quick=True)
    assert all(r.train_key is None for r in ddim.runs.values())  # nothing trained, nothing shared
