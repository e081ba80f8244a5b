"""The editing comparison on the embedded world: every editor and inversion through `bench run`'s path, one table per
edit type, DiffEdit's mask IoU, and an image grid (source, ground-truth target, each method).

    python -m bench.editing_report                       # 64 edits, 50 steps, the README's table and grid

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
from bench.denoiser import CountingDenoiser, sample_seed
from bench.editing import EDIT_TYPES, EmbeddedEdits
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
)
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
    parts = [f"<!-- {command} -->", f"All {num_samples} edits ({steps} DDIM steps, guidance 7.5):", "", table(results, None)]
    for t in EDIT_TYPES:
        parts += ["", f"Edit type `{t}` ({counts[t]} edits):", "", table(results, t)]
    parts += ["", "DiffEdit mask IoU with the ground-truth edit mask: " + ", ".join(f"{k} {v:.3f}" for k, v in iou.items()), ""]
    return "\n".join(parts)


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
    args = p.parse_args(argv)
    tracker = Tracker(args.tracking_uri, "diffbench-editing")
    tracker.check()
    results, rows = [], []
    for label, name, options in CONFIGS:
        folder = f"edit-{name}-{'-'.join(map(str, options.values())) or 'default'}"
        spec = RunSpec(method=name, method_args=options, dataset="embedded-edits", steps=args.steps,
                       num_samples=args.num_samples, output=str(Path(args.output_root) / folder))
        plan = plan_run(spec)
        result = execute(plan, tracker, progress=False)
        results.append((label, result.values))
        samples = np.concatenate([np.load(f) for f in sorted((result.output / "samples").glob("shard-*.npy"))])
        rows.append((label, samples))
        print(f"{label}: {result.output} (MLflow run {result.run_id}), "
              f"{result.values['sampling_seconds']:.0f} s sampling", flush=True)
    items = EmbeddedEdits().edits(args.num_samples)
    iou = diffedit_iou(args.num_samples, args.steps)
    text = markdown(results, iou, args.num_samples, args.steps, {t: sum(it.edit_type == t for it in items) for t in EDIT_TYPES})
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    Path(args.table).write_text(text)
    Path(args.table).with_suffix(".json").write_text(json.dumps(
        {"num_samples": args.num_samples, "steps": args.steps, "results": results, "diffedit_iou": iou}, indent=1) + "\n")
    columns = [i for t in EDIT_TYPES for i in [k for k, it in enumerate(items) if it.edit_type == t][:2]]
    grid([("source", np.stack([it.source for it in items])), ("ground-truth target", np.stack([it.target for it in items]))]
         + rows, Path(args.grid), columns)
    print(text)
    print(f"grid: {args.grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
