"""`bench report`: a self-contained page, checked by rendering it in headless Chromium; claims from data."""

from __future__ import annotations

import html.parser
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bench.cli.main import main
from tests.test_leaderboard import make_run

HOSTILE_RUN = '<script>alert("run")</script>'
HOSTILE_EXPERIMENT = 'exp <b>&"x"'
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
        if path:
            return path
    pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")


def render(page: Path, tmp: Path, *mode: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"  # a fresh profile per launch
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *mode,
           page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


class Elements(html.parser.HTMLParser):
    """Counts what the rendered DOM holds: leaderboard rows, images by source, scripts."""

    def __init__(self):
        super().__init__()
        self.table: list[str] = []
        self.rows: dict[str, int] = {}
        self.images: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.table.append(a.get("class") or "")
        elif tag == "tr" and self.table:
            self.rows[self.table[-1]] = self.rows.get(self.table[-1], 0) + 1
        elif tag == "img":
            self.images.append(a.get("src") or "")
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag == "table" and self.table:
            self.table.pop()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """Eight real runs (2 methods x 2 step counts x 2 seeds) and one with a hostile run name."""
    tmp = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{tmp}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        common = ["--model", str(tiny_model_dir), "--num-samples", "128", "--batch-size", "128",
                  "--metrics", "fid,latency", "--no-progress", "--tracking-uri", uri, "--experiment", HOSTILE_EXPERIMENT]
        assert main(["sweep", "--method", "ddim,ddpm", "--steps", "2,4", "--seeds", "2", "--out", "sw", *common]) == 0
        assert main(["run", "--method", "ddim", "--steps", "2", "--run-name", HOSTILE_RUN, *common]) == 0
    return tmp, uri


def test_html_report_renders_in_chromium_with_tables_plots_and_grids(world, capsys, tmp_path):
    tmp, uri = world
    out = tmp_path / "reports" / "r.html"
    rc = main(["report", "--tracking-uri", uri, "--experiment", HOSTILE_EXPERIMENT, "--out", str(out),
               "--title", "<i>nightly</i> & co"])
    assert rc == 0, capsys.readouterr().err
    page = out.read_text()
    # self-contained and escaped: no scripts, no external sources, user text as entities
    assert "<script" not in page and not re.search(r'(src|href)="(?!data:)', page)
    assert "&lt;script&gt;alert(&#34;run&#34;)&lt;/script&gt;" in page  # jinja2's autoescaping (markupsafe)
    assert "exp &lt;b&gt;&amp;&#34;x&#34;" in page and "&lt;i&gt;nightly&lt;/i&gt; &amp; co" in page

    dom = render(out, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "CONSOLE" not in dom.stderr, [l for l in dom.stderr.splitlines() if "CONSOLE" in l]  # no page errors
    found = Elements()
    found.feed(dom.stdout)
    assert found.scripts == 0
    assert found.rows["leaderboard"] == 1 + 4  # header + 4 configurations
    assert found.rows["cards"] >= 1 + 2 and found.rows["env"] >= 5
    assert len(found.images) == 2 + 4  # FID-vs-NFE, Pareto, and a grid per configuration
    assert all(src.startswith("data:image/png;base64,") for src in found.images)
    for label in ("Leaderboard", "Plots", "Samples", "Papers and what is reproduced", "Environment", "Jonathan Ho"):
        assert label in dom.stdout

    shot = tmp_path / "shot.png"
    ran = render(out, tmp_path, "--hide-scrollbars", "--window-size=1280,2000", f"--screenshot={shot}")
    assert ran.returncode == 0 and shot.stat().st_size > 10_000, ran.stderr[-2000:]
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # text, plots and samples, not a blank page
    white = max(colors)[0] / (img.width * img.height)
    assert white < 0.97


def test_console_check_catches_a_blocked_external_fetch(tmp_path):
    """The control for the check above: the same policy blocks (and logs) an external image."""
    from bench.report import CSP

    page = tmp_path / "control.html"
    page.write_text(f'<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" content="{CSP}">'
                    '</head><body><img src="https://example.invalid/x.png"></body></html>')
    ran = render(page, tmp_path, "--dump-dom")
    assert "CONSOLE" in ran.stderr and "Content Security Policy" in ran.stderr


def test_markdown_report_writes_its_images(world, capsys, tmp_path):
    tmp, uri = world
    out = tmp_path / "r.md"
    assert main(["report", "--tracking-uri", uri, "--out", str(out)]) == 0
    md = re.sub(r" +", " ", out.read_text())  # pandas' to_markdown pads the columns
    assert "| rank | method | steps | NFE | seeds | FID |" in md and "| ddpm | 4 | 4 | 2 |" in md
    links = [line.split("](")[1].split(")")[0] for line in md.splitlines() if line.startswith("![")]
    assert len(links) == 2 and all((tmp_path / link).stat().st_size > 1000 for link in links)
    assert len(list((tmp_path / "r_files").glob("grid-*.png"))) == 4
    assert "<script>" not in md and "run &lt;script&gt;alert" in md


def test_claims_table_is_the_newest_claims_runs_verdicts(tmp_path):
    """The report's claims come from `bench claims` (bench.claims): the newest claims run's table, per method."""
    import pandas as pd

    from bench.claim import Claim, pixel
    from bench.claims import ClaimRef, Execution, judge, latest_verdicts, plan_claims, record
    from bench.report import method_cards
    from bench.tracking import Tracker

    claim = Claim("x", "more steps, lower FID", "Table 1", "fid", (("50", pixel("ddim", 50)), ("5", pixel("ddim", 5))))
    plan = plan_claims([ClaimRef("ddim", claim)], quick=True, method_class=lambda name: None)
    keys = [k for arm in plan.arms["ddim/x"] for _, k in arm]
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "claims-report")
    assert latest_verdicts(tracker) is None
    for fid50 in (1.0, 9.0):  # two claims runs: the newest one counts
        verdicts = judge(plan, {k: {"fid": fid50 if i < 2 else 5.0 + i} for i, k in enumerate(keys)})
        record(verdicts, tracker, plan, Execution(), tmp_path / "claims")
    rows, run = latest_verdicts(tracker, None)
    cards = method_cards(pd.DataFrame({"method": ["pndm"]}), rows)
    ddim = next(c for c in cards if c["method"] == "ddim")
    assert [c["verdict"] for c in ddim["checks"]] == ["does not hold"] and "more steps, lower FID" in ddim["checks"][0]["check"]
    assert next(c for c in cards if c["method"] == "pndm")["checks"] == []



def test_store_is_shown_without_a_path_of_the_machine():
    from bench.report import strip_credentials

    assert strip_credentials("sqlite:////home/someone/project/mlflow.db") == "sqlite:///mlflow.db"
    assert strip_credentials("file:///home/someone/mlruns") == "file:mlruns"
    assert strip_credentials("https://user:secret@host/path") == "https://***@host/path"
