"""The editing comparison on the embedded world: every editor and inversion through `bench run`'s path, one table per
edit type, DiffEdit's mask IoU, and an image grid (source, ground-truth target, each method); then the restorers
(DDNM and its A+ y baseline) on embedded-restoration, per task, with their grid.

    python -m bench.editing_report --update README.md    # 64 edits, 50 steps, the README's tables and grids
    python -m bench.editing_report --from-json --update README.md   # re-render them from the last run, no sampling

Every configuration is one MLflow run (plan_run + execute, as `bench run`), so the numbers here are the runs'.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from bench.catalog import METHODS
from bench.datasets import load_dataset
from bench.denoiser import CountingDenoiser, sample_seed
from bench.editing import EDIT_TYPES, EmbeddedEdits
from bench.restoration import TASKS as RESTORATION_TASKS, EmbeddedRestoration
from bench.models import load_model
from bench.render import md_table
from bench.runner import execute, plan_run
from bench.spec import RunSpec
from bench.tracking import Tracker

CONFIGS = (  # (label, method, options)
    ("DDIM inversion (reconstruction)", "ddim-inversion", {}),
    ("null-text inversion (reconstruction)", "null-text-inversion", {}),
    ("SDEdit (strength 0.5)", "sdedit", {}),
    ("DiffEdit + DDIM inversion", "diffedit", {"inversion": "ddim"}),
    ("P2P + DDIM inversion", "p2p", {"inversion": "ddim"}),
    ("P2P + null-text inversion", "p2p", {"inversion": "null-text"}),
    ("EDICT inversion (reconstruction)", "edict-inversion", {}),
    ("EDICT (strength 0.8, guidance 3)", "edict", {}),
    ("Blended Latent (strength 0.75)", "blended-latent", {}),
    ("pix2pix-zero", "pix2pix-zero", {}),
    ("pix2pix-zero, no cross-attention guidance", "pix2pix-zero", {"xattn_guidance": 0.0}),
    ("PnP (guidance 7.5)", "pnp", {}),
    ("PnP (guidance 3)", "pnp", {"guidance": 3.0}),
)
RESTORATION = (  # (label, method, options, steps): DDNM at the paper's 100 steps; A+ y calls no network
    ("A+ y (pseudo-inverse)", "pseudo-inverse", {}, 1),
    ("DDNM (100 steps)", "ddnm", {}, 100),
)
ASYRP_TRAINING = {"optimizer": "adam", "lr": 0.03, "l1_loss_w": 0.3, "lr_step": 10}  # the claims' (methods/asyrp.py)
ASYRP = tuple((f"Asyrp, strength {s:g}", "asyrp", {**ASYRP_TRAINING, "edit_strength": s}) for s in (0.0, 0.5, 1.0))
ASYRP_STEPS = 40  # the official n_test_step
ASYRP_COLUMNS = (("attr acc color (blue)", "attr_acc_color", "{:.3f}"), ("attr acc shape", "attr_acc_shape", "{:.3f}"),
                 ("attr acc background", "attr_acc_background", "{:.3f}"), ("GT PSNR", "gt_psnr", "{:.2f}"),
                 ("train steps", "train_steps", "{:.0f}"))
RESTORATION_COLUMNS = (("PSNR to ground truth", "restore_psnr", "{:.2f}"), ("FID shapes-cnn16", "fid", "{:.3f}"),
                       ("max abs(A(x) - y), stored uint8", "consistency_error", "{:.4f}"),
                       ("same, rounding and clipping allowed", "consistency_error_unclipped", "{:.1e}"))
# (header, key, format): the embedded world's keys, named after the network that computed them (shapes-cnn32)
COLUMNS = (
    ("bg PSNR", "bg_psnr", "{:.2f}"), ("bg dist shapes-cnn32", "bg_dist_shapes_cnn32", "{:.3f}"),
    ("bg MSE x1e3", "bg_mse", "{:.2f}"), ("bg SSIM", "bg_ssim", "{:.3f}"),
    ("structure shapes-cnn32 x1e3", "structure_dist_shapes_cnn32", "{:.1f}"),
    ("CLIP whole", "clip_whole", "{:.2f}"), ("CLIP edited", "clip_edited", "{:.2f}"),
    ("GT PSNR", "gt_psnr", "{:.2f}"), ("GT dist shapes-cnn32", "gt_dist_shapes_cnn32", "{:.3f}"),
    ("attr acc", "attr_acc_all", "{:.3f}"), ("recon PSNR", "recon_psnr", "{:.2f}"),
)
SCALE = {"bg_mse": 1e3, "structure_dist_shapes_cnn32": 1e3}


def table(results: list[tuple[str, dict]], edit_type: str | None) -> str:
    """A markdown table (pandas) of every configuration; per edit type, the columns that are broken down by type."""
    suffix = f"/{edit_type}" if edit_type else ""
    columns = [c for c in COLUMNS if not edit_type or any(c[1] + suffix in values for _, values in results)]
    rows = []
    for label, values in results:
        cells = [label]
        for _, key, fmt in columns:
            v = values.get(key + suffix)
            cells.append("" if v is None or v != v else fmt.format(v * SCALE.get(key, 1.0)))
        rows.append(cells)
    return str(md_table(["method", *(h for h, _, _ in columns)], rows))


def markdown(results: list[tuple[str, dict]], iou: dict[str, float], num_samples: int, steps: int,
             counts: dict[str, int]) -> str:
    command = f"python -m bench.editing_report -n {num_samples} --steps {steps}"
    parts = [f"<!-- {command} -->", f"All {num_samples} edits ({steps} steps; each method at its own defaults, guidance "
             "7.5 unless the label says otherwise):", "", table(results, None)]
    for t in EDIT_TYPES:
        parts += ["", f"Edit type `{t}` ({counts[t]} edits):", "", table(results, t)]
    parts += ["", "DiffEdit mask IoU with the ground-truth edit mask: " + ", ".join(f"{k} {v:.3f}" for k, v in iou.items()), ""]
    return "\n".join(parts)


def restoration_markdown(results: list[tuple[str, dict]], num_samples: int) -> str:
    """One row per restorer: overall and per task (embedded-restoration's items take the tasks in turn)."""
    rows = []
    for label, values in results:
        for task in (None, *RESTORATION_TASKS):
            suffix = f"/{task}" if task else ""
            cells = [label, task or "all"]
            for _, key, fmt in RESTORATION_COLUMNS:
                v = values.get(key if key == "fid" and not task else key + suffix)
                cells.append("" if v is None or v != v or (key == "fid" and task) else fmt.format(v))
            rows.append(cells)
    head = (f"{num_samples} items of embedded-restoration (inpainting, 4x super-resolution, colorization in turn; "
            "FID over all items against the ground truths):")
    return "\n".join([head, "", str(md_table(["method", "task", *(h for h, _, _ in RESTORATION_COLUMNS)], rows)), ""])


README_COLUMNS = ("bg_psnr", "bg_dist_shapes_cnn32", "bg_ssim", "structure_dist_shapes_cnn32", "clip_whole", "clip_edited",
                  "gt_psnr", "attr_acc_all", "recon_psnr")
BEGIN, END = "<!-- bench.editing_report: begin -->", "<!-- bench.editing_report: end -->"


def asyrp_markdown(results: list[tuple[str, dict]], num_samples: int) -> str:
    rows = [[label, *("" if values.get(key) is None else fmt.format(values[key]) for _, key, fmt in ASYRP_COLUMNS)]
            for label, values in results]
    return "\n".join([f"{num_samples} held-out edits of embedded-recolor16 (pixel DDPM, {ASYRP_STEPS} steps; one f_t, "
                      "trained with the claims' options, shared by the three strengths):", "",
                      str(md_table(["method", *(h for h, _, _ in ASYRP_COLUMNS)], rows)), ""])


def summary_markdown(results: list[tuple[str, dict]], restored: list[tuple[str, dict]], num_samples: int, steps: int,
                     restoration_samples: int, asyrp: list[tuple[str, dict]] | None = None) -> str:
    """The README's two tables: every editor over all edits (the main columns), every restorer over all items."""
    columns = [c for c in COLUMNS if c[1] in README_COLUMNS]
    rows = [[label, *("" if values.get(key) is None or values[key] != values[key]
                      else fmt.format(values[key] * SCALE.get(key, 1.0)) for _, key, fmt in columns)]
            for label, values in results]
    edit_table = str(md_table(["method", *(h for h, _, _ in columns)], rows))
    rest_rows = [[label, *("" if values.get(key) is None else fmt.format(values[key]) for _, key, fmt in RESTORATION_COLUMNS)]
                 for label, values in restored]
    rest_table = str(md_table(["method", *(h for h, _, _ in RESTORATION_COLUMNS)], rest_rows))
    parts = [f"{num_samples} edits of embedded-edits, {steps} steps:", "", edit_table, "",
             f"{restoration_samples} items of embedded-restoration (the three tasks in turn):", "", rest_table]
    if asyrp:
        parts += ["", asyrp_markdown(asyrp, num_samples).rstrip()]
    return "\n".join(parts)


def update_markers(path: Path, text: str, command: str) -> None:
    """Replace what lies between the markers of ``path`` (README.md) with ``text``."""
    doc = path.read_text(encoding="utf-8")
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"--update {path}: no '{BEGIN}' ... '{END}' markers in it")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n<!-- written by `{command}`; never edited by hand -->\n\n{text}\n\n{END}{tail}",
                    encoding="utf-8")


def diffedit_iou(num_samples: int, steps: int) -> dict[str, float]:
    """IoU of DiffEdit's mask (nearest-upsampled from the latent) with the renderer's edit mask, per edit type."""
    model, items = load_model("embedded-t2i"), EmbeddedEdits().edits(num_samples)
    cls = METHODS.get("diffedit")
    m = cls(cls.parse_args({}))
    with torch.no_grad():
        z0 = m.encode_images(model, items)
        cond_src, uncond = m.encode_text(model, [it.source_prompt for it in items])
        cond_tgt, _ = m.encode_text(model, [it.target_prompt for it in items])
        mask = m.masks(model, CountingDenoiser(model.unet, torch.device("cpu")), z0, cond_src, cond_tgt, uncond, steps,
                       m.generators([sample_seed(0, i) for i in range(len(items))]))
    ours = F.interpolate(mask, size=items[0].mask.shape)[:, 0].numpy() > 0.5
    truth = np.stack([it.mask for it in items]) > 0.5
    iou = (ours & truth).sum((1, 2)) / np.maximum((ours | truth).sum((1, 2)), 1)
    types = np.array([it.edit_type for it in items])
    return {"all": float(iou.mean()), **{t: float(iou[types == t].mean()) for t in EDIT_TYPES}}


def grid(rows: list[tuple[str, np.ndarray]], path: Path, columns: list[int], scale: int = 4) -> None:
    """One row per image source (source, target, each method), one column per edit, labels on the left."""
    h, w = rows[0][1].shape[1:3]
    label_w = 270
    cell = (h * scale + 2, w * scale + 2)
    out = Image.new("RGB", (label_w + len(columns) * cell[1], len(rows) * cell[0]), "white")
    draw = ImageDraw.Draw(out)
    for r, (label, images) in enumerate(rows):
        draw.text((4, r * cell[0] + cell[0] // 2 - 6), label, fill="black")
        for c, i in enumerate(columns):
            tile = Image.fromarray(images[i]).resize((w * scale, h * scale), Image.NEAREST)
            out.paste(tile, (label_w + c * cell[1] + 1, r * cell[0] + 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.editing_report", description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", "-n", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--output-root", default="bench-runs")
    p.add_argument("--table", default="reports/figures/editing-table.md")
    p.add_argument("--grid", default="reports/figures/editing-grid.png")
    p.add_argument("--restoration-samples", type=int, default=256, help="items of embedded-restoration (FID: >= 128)")
    p.add_argument("--restoration-grid", default="reports/figures/restoration-grid.png")
    p.add_argument("--asyrp-grid", default="reports/figures/asyrp-grid.png")
    p.add_argument("--update", action="append", default=[], metavar="FILE",
                   help=f"write the summary tables between the {BEGIN} ... {END} markers of FILE (README.md)")
    p.add_argument("--from-json", action="store_true",
                   help="re-render the tables (and --update) from the last run's JSON beside --table; no sampling")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.table).with_suffix(".json").read_text())
        summary = summary_markdown([tuple(r) for r in saved["results"]], [tuple(r) for r in saved["restoration"]],
                                   saved["num_samples"], saved["steps"], saved["restoration_samples"],
                                   [tuple(r) for r in saved.get("asyrp", [])])
        for path in args.update:
            update_markers(Path(path), summary, f"python -m bench.editing_report -n {saved['num_samples']} --steps "
                                                f"{saved['steps']} --update {path}")
        print(summary)
        return 0
    tracker = Tracker(args.tracking_uri, "diffbench-editing")
    tracker.check()
    root = Path(args.output_root)

    def run(configs, **fields) -> tuple[list[tuple[str, dict]], list[tuple[str, np.ndarray]]]:
        """Each (label, spec fields) as one MLflow run through `bench run`'s path: its values and its samples."""
        values, images = [], []
        for label, spec_fields in configs:
            result = execute(plan_run(RunSpec(**fields, **spec_fields)), tracker, progress=False)
            values.append((label, result.values))
            images.append((label, np.concatenate([np.load(f) for f in sorted((result.output / "samples").glob("shard-*.npy"))])))
            print(f"{label}: {result.output} (MLflow run {result.run_id}), {result.values['sampling_seconds']:.0f} s "
                  "sampling", flush=True)
        return values, images

    results, rows = run([(label, {"method": name, "method_args": options, "output": str(
        root / f"edit-{name}-{'-'.join(map(str, options.values())) or 'default'}")}) for label, name, options in CONFIGS],
        dataset="embedded-edits", steps=args.steps, num_samples=args.num_samples)
    restored, restored_rows = run([(label, {"method": name, "method_args": options, "steps": steps,
                                            "output": str(root / f"restore-{name}")})
                                   for label, name, options, steps in RESTORATION],
                                  dataset="embedded-restoration", model="embedded-ddpm",
                                  num_samples=args.restoration_samples)
    asyrp, asyrp_rows = run([(label, {"method": name, "method_args": options,
                                      "output": str(root / f"recolor-asyrp-{options['edit_strength']:g}")})
                             for label, name, options in ASYRP],
                            dataset="embedded-recolor16", model="embedded-ddpm", steps=ASYRP_STEPS,
                            num_samples=args.num_samples)
    items = EmbeddedEdits().edits(args.num_samples)
    iou = diffedit_iou(args.num_samples, args.steps)
    text = markdown(results, iou, args.num_samples, args.steps, {t: sum(it.edit_type == t for it in items) for t in EDIT_TYPES})
    text += "\n" + restoration_markdown(restored, args.restoration_samples)
    text += "\n" + asyrp_markdown(asyrp, args.num_samples)
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    Path(args.table).write_text(text)
    Path(args.table).with_suffix(".json").write_text(json.dumps(
        {"num_samples": args.num_samples, "steps": args.steps, "results": results, "diffedit_iou": iou,
         "restoration_samples": args.restoration_samples, "restoration": restored, "asyrp": asyrp}, indent=1) + "\n")
    columns = [i for t in EDIT_TYPES for i in [k for k, it in enumerate(items) if it.edit_type == t][:2]]
    grid([("source", np.stack([it.source for it in items])), ("ground-truth target", np.stack([it.target for it in items]))]
         + rows, Path(args.grid), columns)
    degraded = EmbeddedRestoration().edits(args.restoration_samples)
    picks = [i for t in RESTORATION_TASKS for i in [k for k, it in enumerate(degraded) if it.edit_type == t][:3]]
    grid([("observation A+ y", np.stack([it.source for it in degraded])),
          ("ground truth", np.stack([it.target for it in degraded]))] + restored_rows,
         Path(args.restoration_grid), picks, scale=6)
    recolor = load_dataset("embedded-recolor16").edits(args.num_samples)
    grid([("source", np.stack([it.source for it in recolor])), ("ground truth (blue)", np.stack([it.target for it in recolor]))]
         + asyrp_rows, Path(args.asyrp_grid), list(range(min(12, len(recolor)))), scale=6)
    for path in args.update:
        update_markers(Path(path), summary_markdown(results, restored, args.num_samples, args.steps,
                                                    args.restoration_samples, asyrp),
                       f"python -m bench.editing_report -n {args.num_samples} --steps {args.steps} --update {path}")
    print(text)
    print(f"grids: {args.grid}, {args.restoration_grid}, {args.asyrp_grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
