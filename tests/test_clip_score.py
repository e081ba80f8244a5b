"""CLIP score against a direct computation; the evaluation CLIP's state dict through clip.load; attribute accuracy."""

import numpy as np
import pytest
import torch

from bench.embedded.eval_clip import (
    CLIP_MEAN, CLIP_STD, Recipe, build, build_from_state_dict, export_for_clip_load, import_clip, load_state_dict_file,
    stored_state_dict,
)
from bench.errors import BenchError
from bench.evaluation import EvalContext
from bench.models import EMBEDDED_WEIGHTS
from bench.spec import RunSpec

TINY = Recipe(embed_dim=16, vision_layers=1, vision_width=64, patch_size=8, text_width=64, text_layers=1, context_length=32)
PROMPTS = ["a small red circle on a black background", "a large blue square on a white background",
           "a small green triangle and a large yellow circle on a gray background"]


@pytest.fixture(scope="module")
def tiny_clip_file(tmp_path_factory):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build(TINY).float()
    path = tmp_path_factory.mktemp("clip") / "model.safetensors"
    save_file(stored_state_dict(model, torch.arange(49408)), str(path))
    return path


def test_state_dict_builds_through_clip_load(tiny_clip_file, tmp_path):
    clip = import_clip()
    ours = build_from_state_dict(load_state_dict_file(tiny_clip_file))
    exported = export_for_clip_load(tiny_clip_file, tmp_path / "shapes-clip.pt")
    theirs, preprocess = clip.load(str(exported), device="cpu", jit=False)
    tokens = clip.tokenize(PROMPTS, context_length=32)
    assert torch.allclose(ours.encode_text(tokens), theirs.float().encode_text(tokens), atol=1e-5)
    assert theirs.visual.input_resolution == 32 and ours.visual.conv1.kernel_size == (8, 8)


def test_clip_score_equals_a_direct_computation(tiny_clip_file, monkeypatch):
    import bench.clip
    import metrics.clip_score as cs
    from bench.datasets import Shapes32

    monkeypatch.setattr(bench.clip, "embedded_weights", lambda: tiny_clip_file)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=gen)
    ctx = EvalContext(RunSpec(num_samples=3), images, Shapes32(), torch.device("cpu"), prompts=PROMPTS)
    metric = cs.CLIPScore()
    values = metric.compute(ctx)

    model = build_from_state_dict(load_state_dict_file(tiny_clip_file))  # 32x32 input: clip's transform is exact
    x = (images.float() / 255 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(import_clip().tokenize(PROMPTS, context_length=32)), dim=-1)
    direct = (100 * (img * txt).sum(-1).clamp(min=0)).mean()
    assert values["clip_score"] == pytest.approx(float(direct), rel=1e-4, abs=1e-4)
    protocol = metric.protocol(RunSpec(), Shapes32())
    assert protocol["backbone"] == "shapes-clip" and protocol["scale"] == 100.0 and protocol["embedded"]


def test_real_backbone_offline_is_one_line(monkeypatch, tmp_path):
    from bench.clip import preflight

    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(BenchError, match=r"ViT-B-32\.pt") as info:
        preflight("ViT-B/32")
    assert "\n" not in str(info.value) and "openaipublic" in str(info.value)
    with pytest.raises(BenchError, match="unknown CLIP backbone"):
        preflight("ViT-Z/99")


def test_attribute_accuracy_scoring():
    from metrics.attribute_accuracy import score

    targets = [{"background": "black", "count": 1, "objects": [{"shape": "circle", "color": "red", "size": "small"}]},
               {"background": "gray", "count": 2, "objects": [{"shape": "square", "color": "blue", "size": "large"},
                                                             {"shape": "triangle", "color": "green", "size": "small"}]}]
    right = {"background": np.array([0, 2]), "count": np.array([0, 1]), "shape": np.array([0, 1]),
             "color": np.array([0, 2]), "size": np.array([0, 1]), "shape2": np.array([4, 2]),
             "color2": np.array([7, 1]), "size2": np.array([2, 0])}
    values = score(right, targets)
    assert values["attr_acc_all"] == 1.0 and values["attr_acc_shape"] == 1.0
    wrong = dict(right, color2=np.array([7, 3]), size=np.array([1, 1]))
    values = score(wrong, targets)
    assert values["attr_acc_all"] == 0.5 and values["attr_acc_color"] == pytest.approx(2 / 3)
    assert values["attr_acc_size"] == pytest.approx(2 / 3)  # size is reported, not part of "all"


@pytest.mark.skipif(not (EMBEDDED_WEIGHTS / "feature-net32" / "model.safetensors").exists(), reason="not trained")
def test_attribute_accuracy_of_rendered_scenes_is_high_and_of_wrong_targets_low():
    from bench.datasets import Shapes32
    from bench.embedded.shapes import render_set
    from metrics.attribute_accuracy import predict, score
    from bench.embedded.feature_extractor import WEIGHTS_DIR32, load_network

    shapes = Shapes32()
    prompts = shapes.prompts(200)
    images, scenes = render_set(7, range(200), shapes.world())  # the prompts' own scenes
    predicted = predict(load_network(WEIGHTS_DIR32), torch.from_numpy(images).permute(0, 3, 1, 2))
    assert score(predicted, [p.attributes for p in prompts])["attr_acc_all"] > 0.9
    shuffled = [p.attributes for p in prompts[1:] + prompts[:1]]
    assert score(predicted, shuffled)["attr_acc_all"] < 0.2


@pytest.mark.skipif(not (EMBEDDED_WEIGHTS / "eval-clip" / "model.safetensors").exists(), reason="not trained")
def test_committed_evaluation_clip_loads_through_clip_load_and_reads_its_world(tmp_path):
    import json

    from bench.embedded.shapes import WorldConfig, render_set
    from bench.clip import clip_scores, embedded_weights

    clip = import_clip()
    model, preprocess = clip.load(str(export_for_clip_load(embedded_weights(), tmp_path / "shapes-clip.pt")),
                                  device="cpu", jit=False)
    model = model.float().eval()
    assert model.context_length == 32 and model.visual.input_resolution == 32
    record = json.loads((embedded_weights().parent / "RECIPE.json").read_text())
    assert record["heldout_retrieval"]["image_to_caption_top1_in_batches_of_100"] > 0.9
    images, scenes = render_set(12345, range(40), WorldConfig(32, max_objects=2, split="all"))
    uint8 = torch.from_numpy(images).permute(0, 3, 1, 2)
    captions = [s.caption for s in scenes]
    matched = clip_scores(model, preprocess, uint8, captions, torch.device("cpu"))
    mismatched = clip_scores(model, preprocess, uint8, captions[1:] + captions[:1], torch.device("cpu"))
    assert float(matched.mean()) > float(mismatched.mean()) + 5  # its own caption scores clearly higher
