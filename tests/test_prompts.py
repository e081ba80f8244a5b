"""Prompt data sets: each loader on a small fixture in its source's own format; missing data is one line."""

import shutil
from pathlib import Path

import pytest
import torch

from bench.datasets import (
    Coco2014Captions, DrawBench, PartiPrompts, PromptFile, Shapes32, load_dataset,
)
from bench.errors import BenchError

FIXTURES = Path(__file__).parent / "fixtures" / "prompts"


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFBENCH_DATA", str(tmp_path))
    return tmp_path


def install(root: Path, name: str, relative: str) -> Path:
    dst = root / relative
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURES / name, dst)
    return dst


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_coco_captions_one_per_image_in_a_seeded_order(data_root):
    install(data_root, "captions_val2014.json", "coco2014/annotations/captions_val2014.json")
    coco = Coco2014Captions()
    captions = coco.captions()
    assert sorted(c[0] for c in captions) == [184613, 391895, 522418]
    by_id = {i: c for i, _, c in captions}
    assert by_id[391895] == "A man riding on the back of a motorcycle."  # the lowest annotation id, stripped
    assert by_id[522418] == "A woman wearing a net on her head cutting a cake."
    assert captions == Coco2014Captions().captions()  # the permutation is seeded
    prompts = coco.prompts(7)  # prompt i = caption i mod 3
    assert [p.text for p in prompts[3:6]] == [p.text for p in prompts[:3]]
    assert coco.identity()["annotations_sha256"] and coco.has_images


def test_coco_reference_images_center_cropped_and_resized(data_root):
    from PIL import Image

    install(data_root, "captions_val2014.json", "coco2014/annotations/captions_val2014.json")
    coco = Coco2014Captions()
    with pytest.raises(BenchError, match=r"val2014\.zip") as info:
        coco.dataset()
    one_line(info)
    (data_root / "coco2014" / "val2014").mkdir()
    for _, name, _ in coco.captions():
        Image.new("RGB", (64, 40), (200, 10, 10)).save(data_root / "coco2014" / "val2014" / name)
    images = coco.dataset()
    assert len(images) == 3
    first = images[0]
    assert first.dtype == torch.uint8 and first.shape == (3, 512, 512)
    assert abs(int(first[0, 256, 256]) - 200) <= 1


def test_partiprompts_tsv(data_root):
    install(data_root, "PartiPrompts.tsv", "partiprompts/PartiPrompts.tsv")
    prompts = PartiPrompts().load_all()
    assert len(prompts) == 4  # the blank row is skipped
    assert prompts[0].text == "bond" and prompts[0].category == "Abstract/Basic"
    assert '"Fly an airplane"' in prompts[2].text
    assert prompts[3].text.startswith('"Fire"')  # quotes are literal: the file quotes nothing
    assert not PartiPrompts.has_images


def test_drawbench_csv(data_root):
    install(data_root, "drawbench.csv", "drawbench/drawbench.csv")
    prompts = DrawBench().load_all()
    assert [p.category for p in prompts] == ["Colors", "Colors", "Counting", "Text"]
    assert prompts[2].text == "Two cars on the street, one red."
    assert prompts[0].text == "A red colored car."  # the UTF-8 BOM is not part of the header


def test_prompt_file_by_path(tmp_path):
    path = shutil.copy(FIXTURES / "prompts.txt", tmp_path / "mine.txt")
    dataset = load_dataset(str(path))
    assert isinstance(dataset, PromptFile)
    texts = [p.text for p in dataset.prompts(4)]
    assert texts == ["a small red circle on a black background",
                     "a large blue square and a small green triangle on a white background",
                     "an astronaut riding a horse", "a small red circle on a black background"]
    assert dataset.identity()["sha256"]


@pytest.mark.parametrize("cls,hint", [
    (PartiPrompts, "google-research/parti"),
    (DrawBench, "docs.google.com/spreadsheets"),
    (Coco2014Captions, "annotations_trainval2014.zip"),
])
def test_missing_real_data_sets_say_what_to_download_and_where(data_root, cls, hint):
    with pytest.raises(BenchError, match=hint) as info:
        cls().prompts(3)
    assert str(data_root) in one_line(info)


def test_missing_prompt_file_and_malformed_files(tmp_path, data_root):
    with pytest.raises(BenchError, match="does not exist") as info:
        load_dataset(str(tmp_path / "nope.txt")).prompts(1)
    one_line(info)
    with pytest.raises(BenchError, match="--dataset PATH"):
        load_dataset("prompt-file").prompts(1)
    bad = data_root / "partiprompts" / "PartiPrompts.tsv"
    bad.parent.mkdir(parents=True)
    bad.write_text("Text\tCategory\nhello\tx\n")
    with pytest.raises(BenchError, match="no 'Prompt' column") as info:
        PartiPrompts().prompts(1)
    one_line(info)
    install(data_root, "captions_val2014.json", "coco2014/annotations/captions_val2014.json").write_text('{"images": []}')
    with pytest.raises(BenchError, match="not a COCO captions file"):
        Coco2014Captions().prompts(1)


def test_unknown_data_set_suggests():
    with pytest.raises(BenchError, match="did you mean 'shapes32'"):
        load_dataset("shapes33")


def test_shapes32_prompts_carry_their_scenes_attributes():
    shapes = Shapes32()
    prompts = shapes.prompts(50)
    assert [p.text for p in shapes.prompts(20)] == [p.text for p in prompts[:20]]  # prompt i does not depend on N
    for p in prompts:
        attrs = p.attributes
        objects = " and ".join(f"a {o['size']} {o['color']} {o['shape']}" for o in attrs["objects"])
        assert p.text == f"{objects} on a {attrs['background']} background"
    assert {len(p.attributes["objects"]) for p in prompts} == {1, 2}
    assert shapes.prompts_identity()["seed"] != shapes.identity()["seed"]  # prompts are not the reference scenes
