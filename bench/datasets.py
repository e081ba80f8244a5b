"""Reference sets for the metrics: the embedded shapes world and real data sets through torch-fidelity."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch_fidelity.registry import DATASETS_REGISTRY

from bench.catalog import DATASETS
from bench.embedded.shapes import RENDERER_VERSION, WorldConfig, make_scenes, render_set
from bench.errors import BenchError
from bench.evaluation import UInt8Images
from bench.interfaces import Prompt, ReferenceSet

SHAPES_REFERENCE_SEED = 2  # the pixel DDPM trains on seed 1, the feature network on seed 3


class Shapes16(ReferenceSet):
    """10,000 rendered single-object 16x16 scenes (seen attribute values), seed 2."""

    name = "shapes16"
    summary = "embedded shapes world, 16x16, one object; 10k rendered reference images"
    resolution = 16
    default_model = "embedded-ddpm"
    feature_extractor = "shapes-cnn16"
    embedded = True
    size = 10_000

    def world(self) -> WorldConfig:
        return WorldConfig(resolution=self.resolution, max_objects=1, split="train")

    def identity(self) -> dict[str, Any]:
        w = self.world()
        return {
            "name": self.name,
            "renderer_version": RENDERER_VERSION,
            "seed": SHAPES_REFERENCE_SEED,
            "size": self.size,
            "resolution": w.resolution,
            "max_objects": w.max_objects,
            "split": w.split,
        }

    def dataset(self):
        images, _ = render_set(SHAPES_REFERENCE_SEED, range(self.size), self.world())
        return UInt8Images(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())


def datasets_root() -> Path:
    return Path(os.environ.get("DIFFBENCH_DATA", Path("~/.cache/diffbench/data").expanduser()))


class Cifar10Train(ReferenceSet):
    """CIFAR-10 training set (50k) through torch-fidelity's ``cifar10-train`` input, Inception features."""

    name = "cifar10"
    summary = "CIFAR-10 train (50k, 32x32) via torch-fidelity; Inception-v3 features; needs the download"
    resolution = 32
    default_model = "google/ddpm-cifar10-32"
    feature_extractor = "inception-v3-compat"

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "torch_fidelity_input": "cifar10-train", "size": 50_000, "resolution": 32}

    def preflight(self) -> None:
        folder = datasets_root() / "cifar-10-batches-py"
        if not folder.is_dir():
            raise BenchError(
                f"CIFAR-10 is not at {folder}: download cifar-10-python.tar.gz (www.cs.toronto.edu/~kriz/cifar.html) "
                f"and extract it into {datasets_root()} (or set DIFFBENCH_DATA)"
            )

    def dataset(self):
        self.preflight()
        try:
            return DATASETS_REGISTRY["cifar10-train"](str(datasets_root()), False)
        except RuntimeError as exc:
            raise BenchError(f"CIFAR-10 in {datasets_root()} cannot be read: {exc}") from None


# -- text-to-image: the 32x32 world and prompt data sets ---------------------------------------------------------------
SHAPES_PROMPT_SEED = 7  # prompts of text-to-image runs; the t2i model trains on seed 6, the evaluation CLIP on 5
TEXT_TO_IMAGE_METRICS = ("fid", "kid", "clip-score", "attribute-accuracy", "latency", "memory")
PROMPT_ONLY_METRICS = ("clip-score", "latency", "memory")


class Shapes32(Shapes16):
    """The text-to-image world: 10,000 rendered 32x32 scenes of one or two objects (seen values), seed 2.

    Its prompts are the captions of scenes of another seed (7), each with its ground-truth attributes, so that
    attribute accuracy can check every generated image against what its prompt asked for.
    """

    name = "shapes32"
    summary = "embedded text-to-image world, 32x32, 1-2 objects: 10k reference images, captions with attributes"
    resolution = 32
    default_model = "embedded-t2i"
    feature_extractor = "shapes-cnn32"
    clip_backbone = "shapes-clip"
    default_metrics = TEXT_TO_IMAGE_METRICS
    # 256 prompts x 50 steps x 2 CFG branches keep the default text-to-image run under 2 minutes on 2 cores;
    # KID is unbiased at this size, FID is biased upwards (compare FID only at equal sample counts)
    default_num_samples = 256

    def world(self) -> WorldConfig:
        return WorldConfig(resolution=self.resolution, max_objects=2, split="train")

    def prompts(self, num_samples: int):
        scenes = make_scenes(SHAPES_PROMPT_SEED, range(num_samples), self.world())
        return [Prompt(s.caption, {**s.attributes(), "count": len(s.objects)}, f"{len(s.objects)} object(s)")
                for s in scenes]

    def prompts_identity(self) -> dict[str, Any]:
        return {**self.identity(), "seed": SHAPES_PROMPT_SEED}


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _missing(what: str, path: Path, how: str) -> BenchError:
    return BenchError(f"{what} is not at {path}: {how} (or set DIFFBENCH_DATA; now {datasets_root()})")


def _cycle(prompts: list, num_samples: int, name: str) -> list:
    """Prompt i of a run is prompt ``i mod len`` of the data set (several images per prompt past the end)."""
    if not prompts:
        raise BenchError(f"data set {name} has no prompts")
    return [prompts[i % len(prompts)] for i in range(num_samples)]


class PromptOnlySet(ReferenceSet):
    """A prompt data set without reference images: CLIP score and latency, no FID/KID."""

    resolution = 0  # any: generated images are not compared with reference images
    default_model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    feature_extractor = ""
    has_images = False
    default_metrics = PROMPT_ONLY_METRICS

    def path(self) -> Path:
        raise NotImplementedError

    def read(self, path: Path) -> list:
        raise NotImplementedError

    def dataset(self):
        raise BenchError(f"data set {self.name} has prompts but no reference images; FID and KID need one with images")

    def load_all(self) -> list:
        self.preflight()
        try:
            return self.read(self.path())
        except (OSError, UnicodeDecodeError, KeyError, ValueError) as exc:
            raise BenchError(f"cannot read {self.name} from {self.path()}: {type(exc).__name__}: {exc}".splitlines()[0]) from None

    def prompts(self, num_samples: int):
        return _cycle(self.load_all(), num_samples, self.name)

    def identity(self) -> dict[str, Any]:
        path = self.path()
        return {"name": self.name, "file": path.name, "sha256": _file_sha256(path) if path.exists() else None,
                "assignment": "prompt i mod len"}


class PartiPrompts(PromptOnlySet):
    """PartiPrompts (Yu et al. 2022): 1,632 prompts in 12 categories and 11 challenge aspects, a TSV file."""

    name = "partiprompts"
    summary = "PartiPrompts (1,632 prompts; TSV with Prompt, Category, Challenge, Note); needs the file"
    URL = "https://github.com/google-research/parti/blob/main/PartiPrompts.tsv"

    def path(self) -> Path:
        return datasets_root() / "partiprompts" / "PartiPrompts.tsv"

    def preflight(self) -> None:
        if not self.path().is_file():
            raise _missing("PartiPrompts", self.path(), f"download PartiPrompts.tsv from {self.URL} into {self.path().parent}")

    def read(self, path: Path) -> list:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))  # the file quotes nothing
        if rows and "Prompt" not in rows[0]:
            raise ValueError(f"no 'Prompt' column (columns: {', '.join(rows[0])})")
        return [Prompt(r["Prompt"].strip(), None, f"{r.get('Category', '')}/{r.get('Challenge', '')}")
                for r in rows if (r.get("Prompt") or "").strip()]


class DrawBench(PromptOnlySet):
    """DrawBench (Saharia et al. 2022, Imagen): 200 prompts in 11 categories, a CSV file."""

    name = "drawbench"
    summary = "DrawBench (200 prompts; CSV with Prompts, Category); needs the file"
    URL = "https://docs.google.com/spreadsheets/d/1y7nAbmR4FREi6npB1u-Bo3GFdwdOPYJc617rBOxIRHY (File > Download > CSV)"

    def path(self) -> Path:
        return datasets_root() / "drawbench" / "drawbench.csv"

    def preflight(self) -> None:
        if not self.path().is_file():
            raise _missing("DrawBench", self.path(), f"save the DrawBench sheet as CSV from {self.URL} to {self.path()}")

    def read(self, path: Path) -> list:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        if rows and "Prompts" not in rows[0]:
            raise ValueError(f"no 'Prompts' column (columns: {', '.join(rows[0])})")
        return [Prompt(r["Prompts"].strip(), None, r.get("Category", "") or "") for r in rows if (r.get("Prompts") or "").strip()]


class PromptFile(PromptOnlySet):
    """A user's prompt file: one prompt a line (blank lines skipped), UTF-8."""

    name = "prompt-file"
    summary = "a prompt file of yours (one prompt a line): pass its path as --dataset"
    default_model = "embedded-t2i"

    def __init__(self, path: str | Path = ""):
        self._given = str(path)
        self._path = Path(path).expanduser()

    def path(self) -> Path:
        return self._path

    def preflight(self) -> None:
        if not self._given:
            raise BenchError("pass the path of your prompt file (one prompt a line) as --dataset PATH")
        if not self._path.is_file():
            raise BenchError(f"prompt file {self._path} does not exist (one prompt a line)")

    def read(self, path: Path) -> list:
        return [Prompt(line.strip()) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class Coco2014Captions(ReferenceSet):
    """COCO 2014 val captions (Chen et al. 2015) as prompts, val2014 images as the FID reference (Inception).

    One caption per image (the lowest annotation id), images in a permutation seeded by 0: prompt i is the
    caption of image i of the permutation; the reference set is the first ``reference_size`` images of the same
    permutation, center-cropped and resized (PIL bicubic) to 512x512, SD-1.5's resolution.
    """

    name = "coco2014-captions"
    summary = "COCO-2014 val captions as prompts, val2014 images as FID reference (Inception); needs the download"
    resolution = 512
    default_model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    feature_extractor = "inception-v3-compat"
    default_metrics = ("fid", "kid", "clip-score", "latency", "memory")
    reference_size = 5000
    permutation_seed = 0
    ANNOTATIONS_URL = "http://images.cocodataset.org/annotations/annotations_trainval2014.zip"
    IMAGES_URL = "http://images.cocodataset.org/zips/val2014.zip"

    def folder(self) -> Path:
        return datasets_root() / "coco2014"

    def annotations_path(self) -> Path:
        return self.folder() / "annotations" / "captions_val2014.json"

    def images_dir(self) -> Path:
        return self.folder() / "val2014"

    def preflight(self) -> None:
        if not self.annotations_path().is_file():
            raise _missing("COCO-2014 captions", self.annotations_path(),
                           f"download {self.ANNOTATIONS_URL} and extract it into {self.folder()}")

    def preflight_images(self) -> None:
        if not self.images_dir().is_dir():
            raise _missing("COCO-2014 val images", self.images_dir(), f"download {self.IMAGES_URL} and extract it into {self.folder()}")

    def captions(self) -> list[tuple[int, str, str]]:
        """(image id, file name, caption) in the seeded permutation order."""
        self.preflight()
        try:
            data = json.loads(self.annotations_path().read_text(encoding="utf-8"))
            files = {im["id"]: im["file_name"] for im in data["images"]}
            first: dict[int, tuple[int, str]] = {}
            for ann in data["annotations"]:
                key = ann["image_id"]
                if key not in first or ann["id"] < first[key][0]:
                    first[key] = (ann["id"], ann["caption"].strip())
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise BenchError(f"{self.annotations_path()} is not a COCO captions file ({type(exc).__name__}: {exc})") from None
        ids = sorted(first)
        order = np.random.default_rng(self.permutation_seed).permutation(len(ids))
        return [(ids[i], files.get(ids[i], ""), first[ids[i]][1]) for i in order]

    def prompts(self, num_samples: int):
        return _cycle([Prompt(c) for _, _, c in self.captions()], num_samples, self.name)

    def identity(self) -> dict[str, Any]:
        path = self.annotations_path()
        return {"name": self.name, "annotations_sha256": _file_sha256(path) if path.exists() else None,
                "caption_choice": "lowest annotation id per image", "permutation_seed": self.permutation_seed,
                "reference_size": self.reference_size, "resolution": self.resolution,
                "resize": "center crop, PIL bicubic"}

    def dataset(self):
        self.preflight_images()
        files = [self.images_dir() / f for _, f, _ in self.captions()[: self.reference_size]]
        return ImageFiles(files, self.resolution)


class ImageFiles(torch.utils.data.Dataset):
    """Image files, center-cropped and resized (PIL bicubic) to ``resolution``: uint8 [3, R, R]."""

    def __init__(self, files: list[Path], resolution: int):
        self.files, self.resolution = files, resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as im:
            im = im.convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((self.resolution,) * 2, Image.BICUBIC)
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).contiguous()


def load_dataset(name: str) -> ReferenceSet:
    """A registered data set by name, else a prompt file (one prompt a line) by path."""
    if name in DATASETS:
        return DATASETS.get(name)()
    path = Path(name).expanduser()
    if path.suffix.lower() in (".txt", ".prompts") or path.is_file():
        return PromptFile(path)
    DATASETS.get(name)  # raises with the "did you mean" message
    raise AssertionError("unreachable")
