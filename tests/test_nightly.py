"""`bench nightly`: a real regression (a named cell run with fewer steps) exits 3; an unchanged rerun exits 0.

The end-to-end tests run the embedded model (embedded-ddpm, the default of shapes16) at 128 samples:
the tiny random-weight fixture has no quality to lose, so fewer steps would not worsen its FID.
"""

from __future__ import annotations

import json

import pytest

from bench.cli.main import main
from bench.errors import BenchError
from bench.nightly import Comparison, cell_summaries, compare, regressions

SUITE = """\
name: nightly-test
defaults: {{num_samples: 128, batch_size: 128, metrics: [fid, latency]}}
seeds: 2
regression: {{fid: 0.10, nfe: 0.0}}
grid:
  - {{name: ddim-10, method: ddim, steps: {steps}}}
"""


@pytest.fixture(scope="module")
def nightly_world(tmp_path_factory):
    """A baseline measured for real: the cell ddim-10 at 10 steps, 2 seeds."""
    tmp = tmp_path_factory.mktemp("nightly")
    (tmp / "suite.yaml").write_text(SUITE.format(steps=10))
    (tmp / "fewer-steps.yaml").write_text(SUITE.format(steps=2))
    uri = f"sqlite:///{tmp}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        rc = main(["nightly", "--suite", "suite.yaml", "--baseline", "baseline.json", "--update-baseline",
                   "--out", "first", "--tracking-uri", uri, "--no-progress"])
    assert rc == 0
    return tmp, uri


def nightly(tmp, uri, suite: str, out: str) -> int:
    return main(["nightly", "--suite", suite, "--baseline", "baseline.json", "--out", out, "--tracking-uri", uri,
                 "--no-progress"])


def test_baseline_file_holds_mean_ci_and_protocol_per_cell(nightly_world):
    tmp, _ = nightly_world
    baseline = json.loads((tmp / "baseline.json").read_text())
    cell = baseline["cells"]["ddim-10"]
    assert cell["steps"] == 10 and cell["method"] == "ddim" and cell["model"] == "embedded-ddpm"
    assert cell["seeds"] == [0, 1] and len(cell["eval_protocol_hash"]) == 16
    fid = cell["metrics"]["fid"]
    assert len(fid["values"]) == 2 and fid["mean"] == pytest.approx(sum(fid["values"]) / 2) and fid["ci95"] > 0
    assert cell["metrics"]["nfe"] == {"mean": 10.0, "ci95": 0.0, "values": [10.0, 10.0]}
    assert baseline["tolerances"] == {"fid": 0.1, "nfe": 0.0} and "sqrt" in baseline["rule"]
    assert baseline["environment"]["torch_version"]


def test_unchanged_rerun_exits_0(nightly_world, monkeypatch, capsys):
    tmp, uri = nightly_world
    monkeypatch.chdir(tmp)
    assert nightly(tmp, uri, "suite.yaml", "rerun") == 0
    out = capsys.readouterr().out
    assert "0 regressions" in out
    comparisons = json.loads((tmp / "rerun" / "comparison.json").read_text())["comparisons"]
    assert {(c["metric"], c["verdict"]) for c in comparisons} == {("fid", "ok"), ("nfe", "ok")}
    page = (tmp / "rerun" / "report.html").read_text()
    assert "Comparison with the baseline" in page and "ddim-10" in page and "data:image/png;base64," in page


def test_same_name_with_fewer_steps_is_a_regression_exit_3(nightly_world, monkeypatch, capsys):
    tmp, uri = nightly_world
    monkeypatch.chdir(tmp)
    assert nightly(tmp, uri, "fewer-steps.yaml", "regressed") == 3
    captured = capsys.readouterr()
    line = [x for x in captured.err.splitlines() if x.startswith("bench: regression:")]
    assert len(line) == 1 and "fid at cell ddim-10" in line[0] and "steps 10 -> 2" in line[0]
    comparisons = {c["metric"]: c for c in json.loads((tmp / "regressed" / "comparison.json").read_text())["comparisons"]}
    assert comparisons["fid"]["verdict"] == "REGRESSION" and comparisons["nfe"]["verdict"] == "improved"
    assert comparisons["fid"]["worse_by"] > comparisons["fid"]["margin"]
    assert "REGRESSION" in (tmp / "regressed" / "report.html").read_text()
    # the baseline did not move
    assert json.loads((tmp / "baseline.json").read_text())["cells"]["ddim-10"]["steps"] == 10


def test_missing_or_incompatible_baseline_is_refused_before_sampling(nightly_world, monkeypatch, capsys):
    tmp, uri = nightly_world
    monkeypatch.chdir(tmp)
    assert main(["nightly", "--suite", "suite.yaml", "--baseline", "nope.json", "--tracking-uri", uri]) == 2
    assert "create it with --update-baseline" in capsys.readouterr().err
    (tmp / "more-samples.yaml").write_text(SUITE.format(steps=10).replace("num_samples: 128", "num_samples: 256"))
    assert nightly(tmp, uri, "more-samples.yaml", "refused") == 2
    err = capsys.readouterr().err
    assert "cell ddim-10: the baseline was measured under metric protocol" in err and err.count("\n") == 1
    assert not (tmp / "refused").exists()


# -- the rule, on numbers ------------------------------------------------------------------------


def cells(fid_values, nfe=10.0, protocol="p" * 16, steps=10):
    rows = [{"cell": "c", "method": "ddim", "method_args": "{}", "steps": steps, "model": "m", "seed": i,
             "eval_protocol_hash": protocol, "fid": v, "nfe": nfe} for i, v in enumerate(fid_values)]
    return cell_summaries(rows, ["fid", "nfe"])


def verdicts(base, new, tolerances=None):
    return {c.metric: c.verdict for c in compare({"cells": base}, new, tolerances or {"fid": 0.10, "nfe": 0.0})}


def test_rule_accounts_for_seed_noise_and_tolerance():
    base = cells([10.0, 10.4, 9.6])
    assert verdicts(base, cells([10.9, 11.3, 10.5])) == {"fid": "ok", "nfe": "ok"}  # +0.9: inside the seed CI
    assert verdicts(base, cells([14.0, 14.4, 13.6]))["fid"] == "REGRESSION"  # +4: beyond it
    assert verdicts(base, cells([6.0, 6.4, 5.6]))["fid"] == "improved"
    one = cells([10.0])  # one seed: no interval, the tolerance alone decides
    assert verdicts(one, cells([10.9]))["fid"] == "ok" and verdicts(one, cells([11.1]))["fid"] == "REGRESSION"
    assert verdicts(one, cells([10.0], nfe=11.0))["nfe"] == "REGRESSION"  # NFE has no noise and no tolerance
    (c,) = [c for c in compare({"cells": one}, cells([11.1]), {"fid": 0.1}) if c.metric == "fid"]
    assert c.margin == pytest.approx(1.0) and c.worse_by == pytest.approx(1.1)
    assert "fid at cell c: 11.1 vs baseline 10" in c.line()


def test_rule_direction_new_missing_and_protocol():
    from bench.nightly import lower_is_better

    assert lower_is_better("fid") and not lower_is_better("throughput_images_per_s")
    rows = [{"cell": "c", "method": "ddim", "method_args": "{}", "steps": 10, "model": "m", "seed": 0,
             "eval_protocol_hash": "p", "throughput_images_per_s": v} for v in (100.0,)]
    base = cell_summaries(rows, ["throughput_images_per_s"])
    slower = cell_summaries([{**rows[0], "throughput_images_per_s": 50.0}], ["throughput_images_per_s"])
    assert verdicts(base, slower, {"throughput_images_per_s": 0.2}) == {"throughput_images_per_s": "REGRESSION"}
    new = compare({"cells": {"gone": base["c"]}}, base, {"fid": 0.1})
    assert {(c.cell, c.verdict) for c in new} == {("c", "new"), ("gone", "missing")}
    assert regressions(new) == [] and all(isinstance(c, Comparison) for c in new)
    with pytest.raises(BenchError, match="refusing to compare"):
        compare({"cells": cells([1.0], protocol="a" * 16)}, cells([1.0], protocol="b" * 16), {"fid": 0.1})
    note = [c.note for c in compare({"cells": cells([1.0], steps=20)}, cells([1.0], steps=2), {"fid": 0.1})]
    assert note == ["configuration changed since the baseline: steps 20 -> 2"]
