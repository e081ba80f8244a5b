"""Editing data sets: one format (``bench.interfaces.EditItem``), two loaders.

- ``embedded-edits``: rendered 32x32 scenes of the text-to-image world with one attribute changed (color, shape,
  background or size). The renderer draws the same scene with the change, so every edit has its ground-truth
  target image and the exact region that changes (from the renderer's coverage masks), which no public editing
  benchmark has.
- ``pie-bench``: PIE-Bench (Ju et al. 2024, "PnP Inversion: Boosting Diffusion-based Editing with 3 Lines of
  Code"), in its own layout: ``mapping_file.json`` (per key: ``image_path``, ``original_prompt``,
  ``editing_prompt``, ``editing_instruction``, ``blended_word``, ``mask`` as run-length pairs over the 512x512
  image, ``editing_type_id``) beside ``annotation_images/``. Masks decode as the benchmark's own evaluation does
  (``mask_decode`` in cure-lab/PnPInversion evaluation/evaluate.py: (start, length) pairs, row-major, the one-pixel
  border set to edited); prompts lose their ``[`` ``]`` marks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from bench.datasets import datasets_root
from bench.embedded.shapes import (BACKGROUNDS, RENDERER_VERSION, SIZES, Scene, WorldConfig, render, sample_scene,
                                   scene_rng)
from bench.errors import BenchError
from bench.evaluation import UInt8Images
from bench.interfaces import EditItem, Prompt, ReferenceSet

EDIT_SEED = 8  # the t2i model trains on seed 6, its prompts are seed 7, the evaluation CLIP trains on 5
EDIT_TYPES = ("color", "shape", "background", "size")
EDIT_METRICS = ("edit-background", "edit-structure", "edit-clip", "edit-ground-truth", "reconstruction",
                "attribute-accuracy", "latency", "memory")
PIE_METRICS = ("edit-background", "edit-structure", "edit-clip", "reconstruction", "latency", "memory")
DEFAULT_EDITS = 64  # 16 edits per type: one default `bench run` of null-text inversion + P2P takes minutes on a CPU


def embedded_edit(index: int, seed: int = EDIT_SEED, world: WorldConfig | None = None) -> tuple[Scene, Scene, str, tuple[str, str]]:
    """Edit ``index``: (source scene, target scene, edit type, (source word, target word)); edit types take turns."""
    world = world or WorldConfig(resolution=32, max_objects=2, split="train")
    rng = scene_rng(seed, index)
    source = sample_scene(rng, world)
    edit_type = EDIT_TYPES[index % len(EDIT_TYPES)]
    if edit_type == "background":
        new = str(rng.choice([b for b in BACKGROUNDS if b != source.background]))
        return source, Scene(source.objects, new), edit_type, (source.background, new)
    k = int(rng.integers(len(source.objects)))
    obj = source.objects[k]
    values = {"color": world.colors(), "shape": world.shapes(), "size": tuple(SIZES)}[edit_type]
    old = getattr(obj, edit_type)
    new = str(rng.choice([v for v in values if v != old]))
    return source, source.with_changes(k, **{edit_type: new}), edit_type, (old, new)


def edit_mask(source: Scene, target: Scene, cover_source: np.ndarray, cover_target: np.ndarray) -> np.ndarray:
    """Where the edit changes the image, from the coverage masks: the changed object's pixels in the source or the
    target (any coverage), or, for a background edit, every pixel the objects do not fully cover."""
    if source.background != target.background:
        return (cover_source.sum(0) < 1.0).astype(np.float32)
    (k,) = [i for i, (a, b) in enumerate(zip(source.objects, target.objects)) if a != b]
    return ((cover_source[k] > 0) | (cover_target[k] > 0)).astype(np.float32)


class EmbeddedEdits(ReferenceSet):
    """Rendered 32x32 scenes of the text-to-image world, one attribute changed; ground-truth target and mask."""

    name = "embedded-edits"
    summary = "embedded editing set: 32x32 scenes with one attribute changed (color, shape, background, size); ground-truth targets and masks"
    resolution = 32
    default_model = "embedded-t2i"
    feature_extractor = "shapes-cnn32"
    clip_backbone = "shapes-clip"
    embedded = True
    edit_targets = True  # every edit has its ground-truth target (metric edit-ground-truth)
    default_metrics = EDIT_METRICS
    default_num_samples = DEFAULT_EDITS
    reference_size = 1000  # ground-truth targets as a FID reference, if anyone asks for FID

    def world(self) -> WorldConfig:
        return WorldConfig(resolution=self.resolution, max_objects=2, split="train")

    def identity(self) -> dict[str, Any]:
        w = self.world()
        return {"name": self.name, "renderer_version": RENDERER_VERSION, "seed": EDIT_SEED, "resolution": w.resolution,
                "max_objects": w.max_objects, "split": w.split, "edit_types": list(EDIT_TYPES),
                "assignment": "edit i has type EDIT_TYPES[i mod 4]; object, new value from the scene's stream",
                "mask": "changed object's coverage > 0 in source or target; background: pixels not fully covered"}

    def edits(self, num_samples: int) -> list[EditItem]:
        items = []
        for i in range(num_samples):
            source, target, edit_type, words = embedded_edit(i, EDIT_SEED, self.world())
            src_img, src_cover = render(source, self.resolution)
            tgt_img, tgt_cover = render(target, self.resolution)
            items.append(EditItem(
                key=f"{i:05d}", source=src_img, source_prompt=source.caption, target_prompt=target.caption,
                mask=edit_mask(source, target, src_cover, tgt_cover), edit_type=edit_type, target=tgt_img,
                blend_words=words, instruction=f"change the {edit_type} from {words[0]} to {words[1]}",
            ))
        return items

    def prompts(self, num_samples: int):
        out = []
        for i in range(num_samples):
            _, target, edit_type, _ = embedded_edit(i, EDIT_SEED, self.world())
            out.append(Prompt(target.caption, {**target.attributes(), "count": len(target.objects)}, edit_type))
        return out

    def dataset(self):
        images = np.stack([render(embedded_edit(i, EDIT_SEED, self.world())[1], self.resolution)[0]
                           for i in range(self.reference_size)])
        return UInt8Images(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())


# -- PIE-Bench ---------------------------------------------------------------------------------------------------------
PIE_EDIT_TYPES = {  # editing_type_id -> the benchmark's category (its annotation_images folder names)
    "0": "random", "1": "change_object", "2": "add_object", "3": "delete_object", "4": "change_content",
    "5": "change_pose", "6": "change_color", "7": "change_material", "8": "change_background", "9": "change_style",
}
PIE_SIZE = 512
PIE_FIELDS = ("image_path", "original_prompt", "editing_prompt", "editing_instruction", "blended_word", "mask",
              "editing_type_id")


def rle_decode(counts: Sequence[int], shape: tuple[int, int] = (PIE_SIZE, PIE_SIZE), border: bool = True) -> np.ndarray:
    """PIE-Bench's mask: (start, length) pairs over the row-major image; with ``border`` the outermost pixels are
    marked edited, as the benchmark's evaluation does "to avoid annotation errors in boundary"."""
    flat = np.zeros(shape[0] * shape[1], dtype=np.float32)
    for start, length in zip(counts[0::2], counts[1::2]):
        flat[int(start) : int(start) + int(length)] = 1.0
    mask = flat.reshape(shape)
    if border:
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1.0
    return mask


def rle_encode(mask: np.ndarray) -> list[int]:
    """The inverse of ``rle_decode`` (without the border): (start, length) pairs of the runs of ones."""
    flat = np.concatenate([[0], (np.asarray(mask).reshape(-1) > 0.5).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


class PIEBench(ReferenceSet):
    """PIE-Bench's 700 edits (10 edit types) from its own layout under DIFFBENCH_DATA/pie-bench, or a folder."""

    name = "pie-bench"
    summary = "PIE-Bench (700 edits, 10 types; mapping_file.json + annotation_images/, RLE masks); needs the download"
    resolution = PIE_SIZE
    default_model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    feature_extractor = "inception-v3-compat"
    clip_backbone = "ViT-L/14"  # PIE-Bench's CLIP (torchmetrics CLIPScore, openai/clip-vit-large-patch14)
    default_metrics = PIE_METRICS
    URL = "https://github.com/cure-lab/PnPInversion (PIE-Bench: the Google Drive link of its README)"

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root else datasets_root() / "pie-bench"

    def mapping_path(self) -> Path:
        return self.root / "mapping_file.json"

    def preflight(self) -> None:
        if not self.mapping_path().is_file():
            raise BenchError(f"PIE-Bench is not at {self.root}: download it from {self.URL} and extract it so that "
                             f"{self.mapping_path()} and {self.root / 'annotation_images'} exist (or set DIFFBENCH_DATA)")

    def mapping(self) -> list[tuple[str, dict]]:
        """The mapping file's entries in key order, checked field by field."""
        self.preflight()
        try:
            data = json.loads(self.mapping_path().read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BenchError(f"{self.mapping_path()} is not a PIE-Bench mapping file ({type(exc).__name__}: {exc})"
                             .splitlines()[0]) from None
        if not isinstance(data, dict) or not data:
            raise BenchError(f"{self.mapping_path()} must map keys to edits")
        for key, entry in data.items():
            missing = [f for f in PIE_FIELDS if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise BenchError(f"{self.mapping_path()}: edit {key} lacks {', '.join(missing)}")
        return sorted(data.items())

    def edits(self, num_samples: int) -> list[EditItem]:
        entries = self.mapping()
        if num_samples > len(entries):
            raise BenchError(f"{self.name} has {len(entries)} edits; ask for at most that many (-n {len(entries)})")
        items = []
        for key, e in entries[:num_samples]:
            path = self.root / "annotation_images" / e["image_path"]
            try:
                with Image.open(path) as im:
                    source = np.asarray(im.convert("RGB")).copy()
            except OSError as exc:
                raise BenchError(f"cannot read PIE-Bench image {path}: {exc}") from None
            if source.shape[:2] != (PIE_SIZE, PIE_SIZE):
                raise BenchError(f"PIE-Bench image {path} is {source.shape[1]}x{source.shape[0]}, not 512x512")
            words = str(e["blended_word"]).split(" ") if e["blended_word"] else []
            items.append(EditItem(
                key=str(key), source=source, source_prompt=_unmark(e["original_prompt"]),
                target_prompt=_unmark(e["editing_prompt"]), mask=rle_decode(e["mask"]),
                edit_type=PIE_EDIT_TYPES.get(str(e["editing_type_id"]), str(e["editing_type_id"])),
                blend_words=(words[0], words[1]) if len(words) == 2 else ("", ""),
                instruction=str(e["editing_instruction"]),
            ))
        return items

    def prompts(self, num_samples: int):
        entries = self.mapping()[:num_samples]
        return [Prompt(_unmark(e["editing_prompt"]), None, PIE_EDIT_TYPES.get(str(e["editing_type_id"]), ""))
                for _, e in entries]

    def identity(self) -> dict[str, Any]:
        path = self.mapping_path()
        return {"name": self.name, "mapping_sha256": hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None,
                "mask": "rle (start, length) pairs, 512x512, border marked edited (PIE-Bench's mask_decode)",
                "prompts": "[ and ] removed"}

    def dataset(self):
        raise BenchError("pie-bench compares each edit with its own source (edit metrics); it has no FID reference set")


def _unmark(prompt: str) -> str:
    return str(prompt).replace("[", "").replace("]", "")
