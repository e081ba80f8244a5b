"""A comparison report from MLflow runs: one self-contained HTML page (or markdown with its images).

Sections: the leaderboard; quality-versus-NFE and quality-versus-latency (Pareto)
plots; each configuration's image grid at one shared run seed (sample i of every
run with that seed starts from the same noise, so grids compare cell by cell);
each method card's paper reference next to the value reproduced here, with
the verdicts of the newest `bench claims` run (bench.claims.latest_verdicts); and the environment.

The HTML page fetches nothing: images are inlined as base64 PNG and a Content
Security Policy forbids every other source. The page and the markdown are rendered from
jinja2 templates (bench/templates/report.*.j2): every text from runs and cards is escaped
(HTML autoescaping; markdown escaping by ``bench.render``), and markdown tables are pandas'.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import platform
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from markupsafe import Markup

from bench import outputs
from bench.leaderboard import display_rows, lower_is_better
from bench.render import md_cell, md_table, render

# -- claims: the verdicts of the newest `bench claims` run (bench/claims.py), never a table of its own ------------


def claim_checks(verdicts: Sequence[Mapping[str, Any]] | None, method: str) -> list[dict[str, str]]:
    """The report's rows for ``method`` from the newest claims run's table (rows as bench.claims.Verdict.to_dict)."""
    rows = []
    for v in verdicts or ():
        if v["method"] != method:
            continue
        arms = "; ".join(a["label"] for a in v.get("arms", ()))
        rows.append({"check": f"{v['claim']}: {v['statement']} ({v['metric']} {v['relation']}: {arms})",
                     "measured": "; ".join(x for x in (v.get("measured", ""), v.get("detail", "")) if x),
                     "verdict": v["verdict"]})
    return rows


# -- the report's content -------------------------------------------------------------------------


@dataclass
class Section:
    """Extra content (e.g. the nightly comparison): escaped by whoever builds it."""

    title: str
    html: str
    md: str


@dataclass
class Report:
    title: str
    subtitle: str
    metric: str
    board: Any
    headers: list[str]
    groups: list
    plots: list[tuple[str, bytes]]  # caption, PNG
    grid_seed: int | None
    grids: dict[int, dict[str, tuple[bytes, str]]]  # steps -> config -> (PNG, caption)
    grid_configs: list[str]
    cards: list[dict[str, Any]]
    environment: list[tuple[str, str]]
    sections: list[Section] = field(default_factory=list)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot_quality_vs_nfe(board, metric: str, title: str) -> bytes:
    from bench.sweep import plot_fid_vs_nfe

    buf = io.BytesIO()
    plot_fid_vs_nfe(board, buf, title, metric=metric)
    return buf.getvalue()


def pareto_front(points: Sequence[tuple[float, float]], lower_better: bool = True) -> list[int]:
    """Indices of the points no other point beats on both cost (x) and quality (y), by increasing cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1] if lower_better else -points[i][1]))
    front, best = [], math.inf
    for i in order:
        y = points[i][1] if lower_better else -points[i][1]
        if y < best:
            front.append(i)
            best = y
    return front


def plot_pareto(board, metric: str, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = board[board["latency_per_image_ms"].notna() & board[metric].notna()]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for label, group in data.groupby("config", sort=False):
        xerr = group.get("latency_per_image_ms_ci95")
        yerr = group.get(f"{metric}_ci95")
        ax.errorbar(group["latency_per_image_ms"], group[metric],
                    xerr=None if xerr is None or xerr.isna().all() else xerr,
                    yerr=None if yerr is None or yerr.isna().all() else yerr,
                    fmt="o", capsize=2, label=label)
        for _, r in group.iterrows():
            ax.annotate(f"{int(r['steps'])}", (r["latency_per_image_ms"], r[metric]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    points = list(zip(data["latency_per_image_ms"], data[metric]))
    front = pareto_front(points, lower_is_better(metric))
    if front:
        xs, ys = zip(*(points[i] for i in front))
        ax.step(xs, ys, where="post", color="black", alpha=0.5, linewidth=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("latency per image (ms, median over batches; log)")
    ax.set_ylabel(outputs.label(metric))
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def grid_png(client, run_id: str, output: str) -> bytes | None:
    """The run's grid.png artifact (the local output folder's copy if the store has none), at half size."""
    from PIL import Image

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    raw = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(client.download_artifacts(run_id, "grid.png", tmp)).read_bytes()
    except Exception:
        local = Path(output) / "grid.png" if output else None
        if local and local.is_file():
            raw = local.read_bytes()
    if raw is None:
        return None
    img = Image.open(io.BytesIO(raw))
    if img.width > 300:  # saved at 4x; 2x keeps every pixel sharp at a quarter of the bytes
        img = img.resize((img.width // 2, img.height // 2), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def common_seed(runs) -> int | None:
    """The seed that most configurations ran with (the smallest on ties)."""
    counts = runs.groupby("seed")["config_key"].nunique()
    if counts.empty:
        return None
    best = counts.max()
    return int(min(s for s, n in counts.items() if n == best))


def collect_grids(client, runs, board) -> tuple[int | None, dict[int, dict[str, tuple[bytes, str]]], list[str]]:
    runs = runs.copy()
    runs["config_key"] = runs["config"] + "@" + runs["steps"].astype(str) + "@" + runs["model"]
    seed = common_seed(runs)
    grids: dict[int, dict[str, tuple[bytes, str]]] = {}
    configs: list[str] = []
    if seed is None:
        return None, grids, configs
    # one image per (configuration, steps) of the leaderboard's first device: the seed's latest run
    device = board.iloc[0]["device"]
    for _, r in board[board["device"] == device].sort_values(["config", "steps"]).iterrows():
        hit = runs[(runs["config"] == r["config"]) & (runs["steps"] == r["steps"]) & (runs["model"] == r["model"])
                   & (runs["seed"] == seed) & (runs["device"] == device)].sort_values("start_time")
        if hit.empty:
            continue
        run = hit.iloc[-1]
        png = grid_png(client, run["run_id"], run["output"])
        if png is None:
            continue
        label = r["config"] if r["model"] == board.iloc[0]["model"] else f"{r['config']} [{r['model']}]"
        if label not in configs:
            configs.append(label)
        value = run.get("fid", float("nan"))
        caption = f"{label}, {int(r['steps'])} steps, NFE {run.get('nfe', float('nan')):g}, seed {seed}" + (
            "" if value is None or math.isnan(value) else f", FID {value:.2f} (this seed)") + f"; run {run['run_name']}"
        grids.setdefault(int(r["steps"]), {})[label] = (png, caption)
    return seed, grids, configs


def method_cards(runs, verdicts: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    from bench.catalog import METHODS

    out = []
    for method in sorted(set(runs["method"]) | {v["method"] for v in verdicts or ()}):
        try:
            card = METHODS.get(method).card
        except Exception:
            card = None
        out.append({
            "method": method,
            "citation": card.citation if card else "",
            "url": card.url if card else "",
            "reference": card.reference if card else "",
            "claim": card.embedded_claim if card else "",
            "checks": claim_checks(verdicts, method),
        })
    return out


def strip_credentials(uri: str) -> str:
    """The store as a reader may see it: no password, and a local file by its name only (no path of this machine)."""
    uri = re.sub(r"//[^/@]+@", "//***@", uri)
    if uri.startswith(("sqlite:///", "file:")):
        scheme = "sqlite:///" if uri.startswith("sqlite:///") else "file:"
        return scheme + uri.rstrip("/").rsplit("/", 1)[-1]
    return uri


def environment(runs, tracking_uri: str) -> list[tuple[str, str]]:
    import bench

    def values(column: str, short: int | None = None) -> str:
        counts = runs[column].fillna("").map(lambda v: v[:short] if short else v).value_counts()
        return ", ".join(f"{v or '(unknown)'} ({n} run{'s' * (n != 1)})" for v, n in counts.items())

    devices = (runs["device"] + " (" + runs["device_name"] + ")").value_counts()
    return [
        ("torch", values("torch_version")),
        ("diffusers", values("diffusers_version")),
        ("device", ", ".join(f"{d} ({n} run{'s' * (n != 1)})" for d, n in devices.items())),
        ("diffbench commit", values("diffbench_git_sha", 12)),
        ("MLflow store", strip_credentials(tracking_uri)),
        ("report made by", f"diffbench {bench.__version__}, Python {platform.python_version()}, "
                           f"{platform.system()} {platform.machine()}, {time.strftime('%Y-%m-%d %H:%M %Z')}"),
    ]


def build(runs, metric: str, client, tracking_uri: str, title: str, subtitle: str,
          sections: Sequence[Section] = (), verdicts: Sequence[Mapping[str, Any]] | None = None,
          per_protocol: bool = False) -> Report:
    """Everything the page shows, computed once; the renderers only format it. ``verdicts``: the claims table of the
    newest `bench claims` run (bench.claims.latest_verdicts), shown per method."""
    from bench.leaderboard import leaderboard

    board = leaderboard(runs, metric, per_protocol=per_protocol)
    runs = runs[runs[metric].notna()]
    headers, groups = display_rows(board, metric)
    plots = []
    label = outputs.label(metric)
    for (h, device), group in board.groupby(["eval_protocol_hash", "device"], sort=False):
        where = f"{group.iloc[0]['dataset']}, n={group.iloc[0]['num_samples']}, {device}"
        if "nfe" in group and group["nfe"].notna().any():
            plots.append((f"{label} versus NFE ({where}, protocol {h[:10]})",
                          plot_quality_vs_nfe(group, metric, f"{label} vs NFE ({where})")))
        if "latency_per_image_ms" in group and group["latency_per_image_ms"].notna().any():
            plots.append((f"{label} versus latency per image, Pareto front ({where}, protocol {h[:10]})",
                          plot_pareto(group, metric, f"{label} vs latency ({where})")))
    seed, grids, configs = collect_grids(client, runs, board)
    return Report(title, subtitle, metric, board, headers, groups, plots, seed, grids, configs,
                  method_cards(runs, verdicts), environment(runs, tracking_uri), list(sections))


# -- rendering ------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,'DejaVu Sans',sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.plots{display:flex;flex-wrap:wrap;gap:1em} figure{margin:0} figcaption{font-size:.8em;color:#555;max-width:600px}
.grids{overflow-x:auto} .grids img{width:200px;image-rendering:pixelated}
.pass{color:#fff;background:#2a7d2a;padding:0 .4em;border-radius:3px}
.fail{color:#fff;background:#b22;padding:0 .4em;border-radius:3px}
.none{color:#555;background:#eee;padding:0 .4em;border-radius:3px}
.small{font-size:.85em;color:#444}
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def verdict_class(verdict: str) -> str:
    return {"holds": "pass", "does not hold": "fail"}.get(verdict, "none")


def verdict_badge(verdict: str) -> str:
    return f'<span class="{verdict_class(verdict)}">{e(verdict)}</span>'


def render_html(r: Report) -> str:
    """The page from bench/templates/report.html.j2 (autoescaped; sections bring their own, escaped, HTML)."""
    ranked = "lower is better" if lower_is_better(r.metric) else "higher is better"
    return render("report.html.j2", r=r, csp=CSP, css=Markup(CSS), ranked=ranked, data_uri=data_uri,
                  verdict_class=verdict_class)


NO_CHECK = {"check": "no verdict (run `bench claims`)", "measured": "", "verdict": "n/a"}


def render_md(r: Report, assets: Path, rel: str) -> str:
    """Markdown (bench/templates/report.md.j2, tables by pandas) with the images written to ASSETS (REL/name.png)."""
    assets.mkdir(parents=True, exist_ok=True)
    leaderboard = [(key, md_table(r.headers, rows)) for key, rows in r.groups]
    plots = []
    for i, (caption, png) in enumerate(r.plots):
        (assets / f"plot-{i}.png").write_bytes(png)
        plots.append((caption, f"{rel}/plot-{i}.png"))
    grids = None
    if r.grids:
        rows = []
        for steps in sorted(r.grids):
            cells = [str(steps)]
            for j, c in enumerate(r.grid_configs):
                hit = r.grids[steps].get(c)
                if hit is None:
                    cells.append("-")
                    continue
                (assets / f"grid-{steps}-{j}.png").write_bytes(hit[0])
                cells.append(f"![{md_cell(hit[1])}]({rel}/grid-{steps}-{j}.png)")
            rows.append(cells)
        grids = md_table(["steps", *(md_cell(c) for c in r.grid_configs)], rows, escape=False)
    cards = md_table(["method", "paper", "paper's reference numbers", "checked here", "measured", "verdict"],
                     [[c["method"], c["citation"], c["reference"], chk["check"], chk["measured"], chk["verdict"]]
                      for c in r.cards for chk in c["checks"] or [NO_CHECK]])
    env = md_table(["", ""], r.environment)
    return render("report.md.j2", r=r, leaderboard=leaderboard, plots=plots, grids=grids, cards=cards,
                  environment=env, markdown=Markup).rstrip("\n") + "\n"  # markdown(): a section's, escaped by its maker


def write(report: Report, out: Path, fmt: str) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "md":
        assets = out.with_name(out.stem + "_files")
        out.write_text(render_md(report, assets, assets.name))
    else:
        out.write_text(render_html(report))
    return out
