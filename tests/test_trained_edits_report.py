"""bench.trained_edits_report: every row it plans names a registered method, model, data set and metric; the
mask overlay changes the region to fill and nothing else."""

from __future__ import annotations

import numpy as np

from bench.catalog import DATASETS, METHODS, METRICS, MODELS
from bench.interfaces import EditItem
from bench.trained_edits_report import BLOCKS, _mask_overlay


def test_every_planned_run_is_registered():
    for block in BLOCKS:
        assert block.dataset in DATASETS, block.dataset
        assert all(metric in METRICS for metric in block.metrics), block.metrics
        for run in block.runs:
            assert run.method in METHODS, run.method
            assert run.model in MODELS, run.model


def test_the_grid_covers_the_five_papers():
    methods = {run.method for block in BLOCKS for run in block.runs}
    assert {"controlnet", "instruct-pix2pix", "paint-by-example", "imagic", "diffusionclip"} <= methods


def test_mask_overlay_changes_the_masked_region_only():
    source = np.full((8, 8, 3), 77, np.uint8)
    mask = np.zeros((8, 8), np.float32)
    mask[2:6, 2:6] = 1
    item = EditItem(key="0", source=source, source_prompt="", target_prompt="", mask=mask, edit_type="x")
    out = _mask_overlay(item)
    assert np.array_equal(out[mask == 0], source[mask == 0])
    assert set(np.unique(out[mask == 1])) == {0, 255}
    assert np.array_equal(item.source, source)  # the item's own image is untouched
