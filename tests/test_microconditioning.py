"""SDXL's micro-conditioning metrics (metrics/microconditioning.py) on the renderer's ground truth, and the claims
that use them (methods/cfg.py: sdxl-crop-conditioning, sdxl-size-conditioning)."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.datasets import Shapes32
from bench.embedded.shapes import BACKGROUNDS, COLORS, SIZES, render
from bench.errors import BenchError
from bench.evaluation import EvalContext
from bench.spec import RunSpec
from metrics.microconditioning import (BORDER_PIXELS, Cutoff, Sharpness, border_foreground, laplacian_sharpness,
                                       prompt_scene, reference_renders)

N = 256  # shapes32's prompts of a default text-to-image run


@pytest.fixture(scope="module")
def targets():
    return [p.attributes for p in Shapes32().prompts(N)]


@pytest.fixture(scope="module")
def renders(targets):
    return reference_renders(targets, (32, 32))


def context(images: np.ndarray, targets) -> EvalContext:
    return EvalContext(RunSpec(num_samples=len(images)), torch.from_numpy(np.ascontiguousarray(images)), Shapes32(),
                       torch.device("cpu"), targets=targets)


def moved(targets, where) -> np.ndarray:
    """The prompts' scenes with the first object's centre moved by ``where(i, obj)`` -> (cx, cy)."""
    out = []
    for i, t in enumerate(targets):
        scene = prompt_scene(t)
        cx, cy = where(i, scene.objects[0])
        first = replace(scene.objects[0], cx=cx, cy=cy)
        out.append(render(replace(scene, objects=(first,) + scene.objects[1:]), 32)[0])
    return np.stack(out).transpose(0, 3, 1, 2)


def small_original(images: np.ndarray, size: int) -> np.ndarray:
    """The SDXL recipe's small original: area-down-sampled to ``size`` px, bilinearly up-sampled back."""
    x = torch.from_numpy(images).float()
    x = F.interpolate(F.interpolate(x, size=(size, size), mode="area"), size=images.shape[-2:], mode="bilinear",
                      align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


# -- cut-off objects ----------------------------------------------------------------------------------------------


def test_renderer_ground_truth_is_never_cut_off(targets, renders):
    assert renders.shape == (N, 3, 32, 32) and renders.dtype == np.uint8
    assert border_foreground(renders, targets).max() == 0  # not one foreground pixel on any border
    out = Cutoff().compute(context(renders, targets))
    assert out == {"cutoff_rate": 0.0, "cutoff_rate_reference": 0.0}


def test_objects_moved_onto_the_border_are_cut_off(targets):
    sides = lambda i, o: [(0.0, o.cy), (1.0, o.cy), (o.cx, 0.0), (o.cx, 1.0)][i % 4]  # noqa: E731
    centred = Cutoff().compute(context(moved(targets, sides), targets))
    assert centred["cutoff_rate"] == 1.0 and centred["cutoff_rate_reference"] == 0.0
    # a quarter of the radius past the left edge: still every image
    quarter = moved(targets, lambda i, o: (0.75 * SIZES[o.size], o.cy))
    assert Cutoff().compute(context(quarter, targets))["cutoff_rate"] == 1.0


def test_the_rule_counts_half_covered_pixels_and_needs_two_of_them():
    target = {"background": "black", "objects": [{"color": "red"}, {"color": "yellow"}]}
    black, red = np.array(BACKGROUNDS["black"]), np.array(COLORS["red"])
    image = np.zeros((1, 3, 32, 32), np.uint8)

    def count(pixels, fraction):
        x = image.copy()
        for r, c in pixels:
            x[0, :, r, c] = np.rint(black + fraction * (red - black))
        return border_foreground(x, [target])[0]

    assert count([(0, 5)], 1.0) == 1 and count([(0, 5), (31, 7)], 1.0) == 2 and BORDER_PIXELS == 2
    assert count([(0, c) for c in range(32)], 0.36) == 0  # the renderer's most covered border pixel: background
    assert count([(0, c) for c in range(32)], 0.55) == 32  # red is the least contrasting color on black
    assert count([(5, 5), (6, 6)], 1.0) == 0  # inside the frame: not on the border


def test_cutoff_refuses_a_run_without_colors_in_its_targets(renders):
    with pytest.raises(BenchError, match="no per-sample targets"):
        Cutoff().compute(context(renders[:4], None))
    with pytest.raises(BenchError, match="names its background and object colors"):
        Cutoff().compute(context(renders[:2], [{"color": "red"}, {"background": "mauve", "objects": []}]))


# -- sharpness ----------------------------------------------------------------------------------------------------


def test_sharpness_is_the_mean_absolute_laplacian(renders):
    """Against torch's conv2d with the 4-neighbour kernel (valid, no padding), channel by channel."""
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    x = torch.from_numpy(renders[:16]).double() / 255
    lap = F.conv2d(x.reshape(-1, 1, 32, 32), kernel[None, None]).reshape(16, -1)
    assert np.allclose(laplacian_sharpness(renders[:16]), lap.abs().mean(1).numpy(), rtol=1e-12, atol=0)
    assert laplacian_sharpness(np.full((2, 3, 8, 8), 77, np.uint8)).tolist() == [0.0, 0.0]


def test_a_small_original_is_less_sharp_than_the_render(targets, renders):
    out = Sharpness().compute(context(renders, targets))
    assert out["sharpness"] == out["sharpness_reference"] > 0 and out["sharpness_ratio"] == 1.0
    blurred = {s: Sharpness().compute(context(small_original(renders, s), targets)) for s in (8, 16, 24)}
    assert blurred[8]["sharpness"] < blurred[16]["sharpness"] < blurred[24]["sharpness"] < out["sharpness"]
    assert blurred[8]["sharpness_reference"] == out["sharpness_reference"]
    assert blurred[8]["sharpness_ratio"] < 0.5
    per_image = laplacian_sharpness(small_original(renders, 8)) < laplacian_sharpness(renders)
    assert per_image.all()


def test_sharpness_without_scenes_has_no_reference(renders):
    out = Sharpness().compute(context(renders[:4], None))
    assert set(out) == {"sharpness"}
    with pytest.raises(BenchError, match="no interior"):
        Sharpness().compute(context(np.zeros((1, 3, 2, 2), np.uint8), None))


# -- declarations --------------------------------------------------------------------------------------------------


def test_metrics_are_registered_with_their_directions_and_formats():
    from bench.catalog import METRICS
    from bench.outputs import lookup

    assert METRICS.get("cutoff") is Cutoff and METRICS.get("sharpness") is Sharpness
    assert Cutoff.needs_targets and not Sharpness.needs_targets
    for key, direction, shown in (("cutoff_rate", "lower", "0.250"), ("cutoff_rate_reference", "none", "0.250"),
                                  ("sharpness", "higher", "0.2500"), ("sharpness_reference", "none", "0.2500"),
                                  ("sharpness_ratio", "none", "0.250")):
        out = lookup(key)
        assert out.direction == direction and out.format(0.25) == shown and out.family in ("cutoff", "sharpness")
    assert Cutoff().protocol(RunSpec(), Shapes32())["min_border_pixels"] == BORDER_PIXELS


# -- the claims -----------------------------------------------------------------------------------------------------


def cfg_claims():
    from bench.catalog import METHODS

    return {c.id: c for c in METHODS.get("cfg").claims}


def test_cfg_declares_the_micro_conditioning_claims_on_embedded_sdxl():
    from bench.claims import ClaimRef, plan_claims

    claims = cfg_claims()
    crop, size = claims["sdxl-crop-conditioning"], claims["sdxl-size-conditioning"]
    assert (crop.metric, crop.relation, crop.margin, crop.relative) == ("cutoff_rate", "less", 0.5, True)
    assert (size.metric, size.relation) == ("sharpness", "greater")
    assert [a.options for _, a in crop.arms] == [{"guidance": 4.0}, {"guidance": 4.0, "crop_top": 16, "crop_left": 16}]
    assert [a.options for _, a in size.arms] == [{"guidance": 4.0},
                                                 {"guidance": 4.0, "original_height": 8, "original_width": 8}]
    for claim in (crop, size):
        for _, arm in claim.arms:
            assert arm.model == "embedded-sdxl" and arm.dataset == "shapes32" and arm.steps == 50
            assert arm.metrics == ("cutoff", "sharpness")
    plan = plan_claims([ClaimRef("cfg", crop), ClaimRef("cfg", size)], quick=True)
    assert len(plan.runs) == 3 * 2  # the default arm is one run for both claims; two seeds at --quick
    # the older cfg claims still run on embedded-t2i with their metrics (their runs' protocol is unchanged)
    for _, arm in claims["guidance-raises-attribute-accuracy"].arms:
        assert arm.model == "embedded-t2i" and arm.metrics == ("fid", "attribute-accuracy", "latency")


def test_a_missing_model_makes_the_claims_not_measured_in_one_line(tmp_path, monkeypatch):
    """Until the embedded SDXL weights exist, `bench claims --method cfg` says so in one line per claim."""
    import bench.models
    from bench.claims import UNMEASURED, ClaimRef, execute_plan, judge, plan_claims

    def missing(name):
        assert name == "embedded-sdxl"
        return bench.models.resolve_folder(str(tmp_path / "weights" / "sdxl"))  # the loader's first step

    monkeypatch.setattr(bench.models, "load_model", missing)
    claims = cfg_claims()
    refs = [ClaimRef("cfg", claims[i]) for i in ("sdxl-crop-conditioning", "sdxl-size-conditioning")]
    plan = plan_claims(refs, quick=True)
    lines = []
    done = execute_plan(plan, tracker=None, progress=False, log=lines.append)
    assert done.made == 0 and len(done.errors) == len(plan.runs)
    for verdict in judge(plan, done.results, done.errors, done.run_ids):
        assert verdict.verdict == UNMEASURED and "does not exist" in verdict.detail and "\n" not in verdict.detail


def test_both_metrics_run_on_a_tiny_sdxl_through_the_runner(sdxl_dir, tmp_path):
    """cfg on a tiny random SDXL folder (32x32) with shapes32's prompts: the runner gives the metrics their targets
    and accepts every value they return."""
    from bench.runner import evaluate, plan_run, sample

    plan = plan_run(RunSpec(method="cfg", method_args={"guidance": 4.0, "crop_top": 16, "crop_left": 16},
                            model=str(sdxl_dir), dataset="shapes32", steps=2, num_samples=4, batch_size=4,
                            metrics=("cutoff", "sharpness"), output=str(tmp_path / "run")))
    assert plan.protocol["metrics"]["cutoff"]["min_border_pixels"] == BORDER_PIXELS
    images, timings = sample(plan, progress=False)
    values = evaluate(plan, images, timings)
    assert 0.0 <= values["cutoff_rate"] <= 1.0 and values["cutoff_rate_reference"] == 0.0
    assert values["sharpness"] > 0 and values["sharpness_ratio"] == pytest.approx(
        values["sharpness"] / values["sharpness_reference"])
