"""Personalization data sets: a few images of a subject, its class noun and evaluation prompts (DreamBench's protocol).

The format (``Subject``): the subject's images (uint8, at the data set's resolution), one
training caption per image and the evaluation prompts, both with ``{}`` standing for the
subject, the class noun, and the class prompts (the class without the subject: prior
preservation and prior drift). Each method writes the subject its own way into ``{}``:
DreamBooth and LoRA as "sks <class>" (identifier and class noun), Custom Diffusion as
"<name> <class>" (modifier token and class noun), Textual Inversion as "<name>" (its learned
token). The run's prompts name the subject by its placeholder token ``<name>``
(``Subject.token``); CLIP-T reads the prompt with the class noun instead (``Prompt.attributes``).

Two loaders:

- ``DreamBench``: the layout of google/dreambooth (Ruiz et al. 2023): ``dataset/<subject>/*.jpg``
  and ``dataset/prompts_and_classes.txt``, whose "Classes" section lists ``subject_name,class``
  and whose "Object Prompts" and "Live Subject Prompts" sections hold the 25 prompts as
  ``'a {0} {1} in the jungle'.format(unique_token, class_token)``. Live subjects are the cats and
  dogs (the data set's README). Images are center-cropped and resized (PIL bicubic) to 512x512.
  Run prompts: every subject x every prompt, ``prompt i mod len`` (DreamBench generates 4 images
  per prompt: ``--num-samples`` = 4 x 30 x 25).
- ``EmbeddedConcepts`` ("embedded-concepts"): the held-out values of the shapes world, which the
  embedded text-to-image model never saw (their token embeddings are zero): a large green
  *diamond* (class "square") and a large *orange* circle (class "circle"), five 32x32 images
  each at seeded positions on the four backgrounds. Its prompts carry the ground truth
  (attribute accuracy checks that the subject appears as itself on the asked background), and it
  renders real class images (Custom Diffusion's real regularization set).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from bench.datasets import _missing, datasets_root, load_dataset
from bench.embedded.shapes import (BACKGROUNDS, COLORS, RENDERER_VERSION, SIZES, Scene, ShapeObject, WorldConfig,
                                   make_scenes, render, scene_rng)
from bench.errors import BenchError
from bench.evaluation import UInt8Images
from bench.interfaces import Prompt, ReferenceSet

PLACEHOLDER = "{}"


@dataclass(frozen=True)
class Subject:
    """One subject: its images, its class noun, its captions and evaluation prompts (``{}`` = the subject)."""

    name: str
    class_noun: str
    images: np.ndarray = field(repr=False)  # uint8 [N, H, W, 3]
    captions: tuple[str, ...]  # training caption of each image
    prompts: tuple[str, ...]  # evaluation prompts
    class_prompts: tuple[str, ...]  # the class without the subject (prior preservation, prior drift)
    prompt_attributes: tuple[Mapping[str, Any] | None, ...] = ()  # ground truth of each prompt (embedded world)
    live: bool = False
    masks: np.ndarray | None = field(default=None, repr=False)  # float32 [N, H, W]: the subject's coverage, if known

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9_]+", self.name):
            raise BenchError(f"subject name {self.name!r}: use lowercase letters, digits and _ only")
        if len(self.images) == 0:
            raise BenchError(f"subject {self.name} has no images")
        if len(self.captions) != len(self.images):
            raise BenchError(f"subject {self.name}: {len(self.captions)} captions for {len(self.images)} images")
        for text in self.captions + self.prompts:
            if text.count(PLACEHOLDER) != 1:
                raise BenchError(f"subject {self.name}: {text!r} must hold the subject placeholder {{}} once")
        if not self.prompts or not self.class_prompts:
            raise BenchError(f"subject {self.name} needs evaluation prompts and class prompts")
        if self.masks is not None and self.masks.shape != self.images.shape[:3]:
            raise BenchError(f"subject {self.name}: masks {self.masks.shape} do not match images {self.images.shape}")

    @property
    def token(self) -> str:
        """The placeholder token that names the subject in run prompts (and Textual Inversion's new token)."""
        return f"<{self.name}>"

    def select(self, index: slice | Sequence[int]) -> "Subject":
        """The same subject with only some of its images (their captions and masks follow them)."""
        picks = range(len(self.images))[index] if isinstance(index, slice) else list(index)
        picks = list(picks)
        return replace(
            self, images=self.images[picks], captions=tuple(self.captions[i] for i in picks),
            masks=None if self.masks is None else self.masks[picks])

    def images_tensor(self) -> torch.Tensor:
        """uint8 [N, 3, H, W]."""
        return torch.from_numpy(np.ascontiguousarray(self.images)).permute(0, 3, 1, 2).contiguous()

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(repr((self.name, self.class_noun, self.captions, self.prompts, self.class_prompts)).encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        return h.hexdigest()


def subject_of(text: str, subjects: Sequence[Subject]) -> Subject | None:
    """The subject whose placeholder token occurs in a run prompt, or None (a prompt without a subject)."""
    found = [s for s in subjects if s.token in text]
    if len(found) > 1:
        raise BenchError(f"prompt {text!r} names {len(found)} subjects; one subject per prompt")
    return found[0] if found else None


class PersonalizationSet(ReferenceSet):
    """A personalization data set: subjects (images, class noun, prompts). Reference images: the subjects'."""

    default_metrics = ("clip-i", "clip-t", "dino", "latency", "memory")

    def subjects(self) -> list[Subject]:
        raise NotImplementedError

    def class_reference(self, subject: Subject, num: int, seed: int) -> tuple[np.ndarray, list[str]] | None:
        """Real images of the subject's class with their captions (Custom Diffusion's regularization set), or None."""
        return None

    def prompts(self, num_samples: int) -> list[Prompt]:
        entries = []
        for s in self.subjects():
            attributes = s.prompt_attributes or (None,) * len(s.prompts)
            for template, truth in zip(s.prompts, attributes):
                attrs = {"subject": s.name, "clip_t_text": template.format(s.class_noun), **(truth or {})}
                entries.append(Prompt(template.format(s.token), attrs, s.name))
        return [entries[i % len(entries)] for i in range(num_samples)]

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "resolution": self.resolution,
                "subjects": {s.name: s.digest() for s in self.subjects()}}

    def dataset(self):
        return UInt8Images(torch.cat([s.images_tensor() for s in self.subjects()]))


# -- DreamBench (google/dreambooth) ------------------------------------------------------------------------------------
LIVE_CLASSES = ("cat", "dog")  # the data set's README: "9 ... are live subjects (dogs and cats)"
_PROMPT = re.compile(r"""['"](.*?)['"]\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)""")


def parse_prompts_and_classes(text: str) -> tuple[dict[str, str], list[str], list[str]]:
    """DreamBench's prompts_and_classes.txt -> ({subject: class}, object prompts, live prompts), prompts with ``{}``."""
    classes: dict[str, str] = {}
    sections: dict[str, list[str]] = {"object": [], "live": []}
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        lowered = stripped.lower()
        if lowered == "object prompts":
            current = "object"
        elif lowered == "live subject prompts":
            current = "live"
        elif current is None and "," in stripped and lowered != "subject_name,class":
            name, cls = (part.strip() for part in stripped.split(",", 1))
            classes[name] = cls
        elif current is not None:
            match = _PROMPT.search(stripped)
            if match:
                template = match.group(1)
                if "{0} {1}" not in template:
                    raise ValueError(f"prompt {template!r} does not hold '{{0}} {{1}}' (identifier and class)")
                sections[current].append(template.replace("{0} {1}", PLACEHOLDER))
    if not classes:
        raise ValueError("no 'subject_name,class' lines")
    if not sections["object"] or not sections["live"]:
        raise ValueError("no 'Object Prompts' or 'Live Subject Prompts' list")
    return classes, sections["object"], sections["live"]


def load_image(path: Path, resolution: int) -> np.ndarray:
    """Center crop to a square, PIL bicubic resize: uint8 [R, R, 3]."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        return np.asarray(im).copy()


def load_dreambench(root: Path, resolution: int = 512) -> list[Subject]:
    """Subjects of a DreamBench folder (the one holding prompts_and_classes.txt and a folder per subject)."""
    root = Path(root)
    try:
        classes, object_prompts, live_prompts = parse_prompts_and_classes(
            (root / "prompts_and_classes.txt").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BenchError(f"cannot read {root / 'prompts_and_classes.txt'}: {exc}".splitlines()[0]) from None
    subjects = []
    for name, cls in classes.items():
        files = sorted(p for p in (root / name).glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not files:
            raise BenchError(f"DreamBench subject {name} has no images in {root / name}")
        try:
            images = np.stack([load_image(f, resolution) for f in files])
        except OSError as exc:
            raise BenchError(f"cannot read an image of subject {name} in {root / name}: {exc}") from None
        live = cls in LIVE_CLASSES
        subjects.append(Subject(name, cls, images, ("a {}",) * len(images),  # instance prompt "a [V] [class noun]"
                                tuple(live_prompts if live else object_prompts), (f"a {cls}",), live=live))
    return subjects


class DreamBench(PersonalizationSet):
    """DreamBench (Ruiz et al. 2023): 30 subjects of 15 classes, 4-6 images each, 25 prompts per subject."""

    name = "dreambench"
    summary = "DreamBench (30 subjects, 4-6 images each, 25 prompts; google/dreambooth layout); needs the download"
    resolution = 512
    default_model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    feature_extractor = "inception-v3-compat"
    clip_backbone = "ViT-B/32"
    URL = "https://github.com/google/dreambooth"

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else datasets_root() / "dreambench" / "dataset"
        self._subjects: list[Subject] | None = None

    def preflight(self) -> None:
        if not (self.root / "prompts_and_classes.txt").is_file():
            raise _missing("DreamBench", self.root, f"clone {self.URL} and put its dataset/ folder there")

    def subjects(self) -> list[Subject]:
        if self._subjects is None:
            self.preflight()
            self._subjects = load_dreambench(self.root, self.resolution)
        return self._subjects


# -- the embedded concept set ------------------------------------------------------------------------------------------
CONCEPT_SEED = 8  # positions of the subject images; the t2i model trains on seed 6, prompts use 7
CONCEPT_IMAGES = 5
CLASS_REFERENCE_SEED = 9  # real class images (Custom Diffusion's regularization set)


@dataclass(frozen=True)
class EmbeddedConcept:
    name: str
    shape: str
    color: str
    size: str
    class_noun: str  # a seen shape: the class the subject belongs to


EMBEDDED_CONCEPTS = (
    EmbeddedConcept("diamond", "diamond", "green", "large", "square"),  # held-out shape
    EmbeddedConcept("orange", "circle", "orange", "large", "circle"),  # held-out color
)
EVAL_CONTEXTS = (("large", "black"), ("large", "white"), ("large", "gray"), ("large", "navy"),
                 ("small", "white"), ("small", "black"))


def _concept_scene(concept: EmbeddedConcept, index: int, background: str, size: str | None = None):
    size = size or concept.size
    rng = scene_rng(CONCEPT_SEED, index)
    r = SIZES[size]
    lo, hi = r + 0.02, 1.0 - r - 0.02
    obj = ShapeObject(concept.shape, concept.color, size, float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
    return Scene((obj,), background)


def _class_prompts(class_noun: str) -> tuple[str, ...]:
    return tuple(f"a {size} {color} {class_noun} on a {bg} background"
                 for size in SIZES for color in COLORS for bg in BACKGROUNDS)


def embedded_subject(concept: EmbeddedConcept, resolution: int = 32, caption: str = "a {size} {{}}") -> Subject:
    """The concept's five images (and exact masks), captions ``caption`` + " on a <background> background"."""
    backgrounds = list(BACKGROUNDS)
    scenes = [_concept_scene(concept, i, backgrounds[i % len(backgrounds)]) for i in range(CONCEPT_IMAGES)]
    rendered = [render(s, resolution) for s in scenes]
    images = np.stack([image for image, _ in rendered])
    masks = np.stack([mask[0] for _, mask in rendered])
    phrase = caption.format(size=concept.size, shape=concept.shape, color=concept.color)
    captions = tuple(f"{phrase} on a {s.background} background" for s in scenes)
    prompts, truths = [], []
    for size, bg in EVAL_CONTEXTS:
        prompts.append(f"a {size} {{}} on a {bg} background")
        truths.append({"background": bg, "count": 1,
                       "objects": [{"shape": concept.shape, "color": concept.color, "size": size}]})
    return Subject(concept.name, concept.class_noun, images, captions, tuple(prompts),
                   _class_prompts(concept.class_noun), tuple(truths), masks=masks)


class EmbeddedConcepts(PersonalizationSet):
    """The shapes world's held-out concepts: a green diamond and an orange circle, five 32x32 images each."""

    name = "embedded-concepts"
    summary = ("embedded personalization set: held-out diamond (class square) and orange (class circle), "
               "5 images each at 32x32, 6 prompts each")
    resolution = 32
    default_model = "embedded-t2i"
    feature_extractor = "shapes-cnn32"
    clip_backbone = "shapes-clip"
    embedded = True
    default_metrics = ("clip-i", "clip-t", "dino", "attribute-accuracy", "latency", "memory")

    def subjects(self) -> list[Subject]:
        return [embedded_subject(c, self.resolution) for c in EMBEDDED_CONCEPTS]

    def class_reference(self, subject: Subject, num: int, seed: int = CLASS_REFERENCE_SEED):
        """Rendered scenes of the class (seen colors and backgrounds): the world's real class photos."""
        world = WorldConfig(self.resolution, max_objects=1, split="train")
        scenes = [s for s in make_scenes(seed, range(num * 8), world) if s.objects[0].shape == subject.class_noun]
        if len(scenes) < num:
            return None
        scenes = scenes[:num]
        return np.stack([render(s, self.resolution)[0] for s in scenes]), [s.caption for s in scenes]

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "renderer_version": RENDERER_VERSION, "seed": CONCEPT_SEED}


# -- composition of two concepts (MagiCapture) ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Composition:
    """Two concepts learned together and asked for together: a ``subject`` (its shape) and a ``style`` (its color)."""

    subject: str  # the subject's name: its token <subject> names it in prompts
    style: str
    truth: Mapping[str, str]  # what the composed object must show: {"shape": ..., "color": ...}


class EmbeddedComposition(PersonalizationSet):
    """MagiCapture's task on the shapes world: the held-out diamond shape (subject, learned from the green diamonds)
    and the held-out orange color (style, learned from the orange circles), asked for together.

    Each concept's captions name the other attribute of its images with a known word ("a large green <diamond> on
    a gray background", "a large <orange> circle on a gray background"), so that <diamond> has only the shape to
    explain and <orange> only the color (MagiCapture's composed prompt splits the image into the subject's and the
    style's regions; here the two attributes share the object's region, so they are split by the words). The run's
    prompts compose them: "a large <orange> <diamond> on a black background" (the six contexts of
    embedded-concepts), whose ground truth is one orange diamond of the asked size on the asked background
    (attribute-accuracy: shape, color, background and count).
    """

    name = "embedded-composition"
    summary = ("embedded composition set (MagiCapture): the held-out diamond shape and orange color, learned apart "
               "and asked for together ('a large <orange> <diamond> on a black background'), 6 prompts")
    resolution = 32
    default_model = "embedded-t2i"
    feature_extractor = "shapes-cnn32"
    clip_backbone = "shapes-clip"
    embedded = True
    default_metrics = ("attribute-accuracy", "latency", "memory")
    composition = Composition("diamond", "orange", {"shape": "diamond", "color": "orange"})
    CAPTIONS = {"diamond": "a {size} {color} {{}}", "orange": "a {size} {{}} {shape}"}

    def subjects(self) -> list[Subject]:
        return [embedded_subject(c, self.resolution, self.CAPTIONS[c.name]) for c in EMBEDDED_CONCEPTS]

    def prompts(self, num_samples: int) -> list[Prompt]:
        c = self.composition
        entries = []
        for size, bg in EVAL_CONTEXTS:
            truth = {"composition": f"{c.style} {c.subject}", "background": bg, "count": 1,
                     "objects": [{**c.truth, "size": size}]}
            entries.append(Prompt(f"a {size} <{c.style}> <{c.subject}> on a {bg} background", truth, "composition"))
        return [entries[i % len(entries)] for i in range(num_samples)]

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "renderer_version": RENDERER_VERSION, "seed": CONCEPT_SEED,
                "composition": repr(self.composition), "captions": self.CAPTIONS}


def load_personalization_set(name: str) -> PersonalizationSet:
    """A registered personalization data set by name (BenchError for any other data set)."""
    reference = load_dataset(name)
    if not isinstance(reference, PersonalizationSet):
        raise BenchError(f"data set {name} is not a personalization data set (subjects with images and prompts); "
                         f"use embedded-concepts or dreambench")
    return reference
