"""Pools of rendered scenes, cached on disk: training runs take epochs over a pool instead of re-rendering.

A 32x32 scene costs about 3 ms to render (4x4 supersampling), more than a small
network's training step spends on it, so the text-to-image recipes draw their
batches from a fixed pool. The pool is a pure function of (seed, size, world,
renderer version); the cache file is named by all of them and holds only uint8
pixels (``np.load`` with ``allow_pickle=False``); the scenes are re-derived from
the seed, which is cheap.
"""

from __future__ import annotations

import os

import numpy as np

from bench.files import cache_dir
from bench.embedded.shapes import RENDERER_VERSION, Scene, WorldConfig, make_scenes, render_set

RENDER_CHUNK = 2000


def pool_path(seed: int, size: int, world: WorldConfig):
    name = f"shapes-r{world.resolution}-o{world.max_objects}-{world.split}-v{RENDERER_VERSION}-seed{seed}-n{size}.npy"
    return cache_dir() / "scene-pools" / name


def scene_pool(seed: int, size: int, world: WorldConfig) -> tuple[np.ndarray, list[Scene]]:
    """Scenes ``0..size-1`` of the set with ``seed``: (images uint8 [N, H, W, 3], scenes)."""
    path = pool_path(seed, size, world)
    scenes = make_scenes(seed, range(size), world)
    if path.exists():
        try:
            images = np.load(path, allow_pickle=False)
            if images.shape == (size, world.resolution, world.resolution, 3) and images.dtype == np.uint8:
                return images, scenes
        except (OSError, ValueError):  # a damaged cache entry is re-rendered, never trusted
            pass
    images = np.concatenate([render_set(seed, range(a, min(a + RENDER_CHUNK, size)), world)[0]
                             for a in range(0, size, RENDER_CHUNK)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, images, allow_pickle=False)
    os.replace(tmp, path)
    return images, scenes
