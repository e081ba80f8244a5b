"""Editing metrics: PIE-Bench's protocol (Ju et al. 2024, cure-lab/PnPInversion evaluation/), plus ground truth.

Every metric is computed per edit, then averaged over all edits (``KEY``) and per edit type (``KEY/TYPE``); edits
where a region is empty are left out of that region's means (PIE-Bench writes "nan").

- ``edit-background``: PSNR, MSE, SSIM and LPIPS between the edited image and the source on the unedited region.
  As PIE-Bench does it: both images are multiplied by (1 - mask), then the metric runs over the whole image; PSNR
  and SSIM with data range 1 (torchmetrics' defaults: SSIM's 11x11 Gaussian window, sigma 1.5, reflection padding
  cropped off); MSE on [0, 1] pixels.
- ``edit-structure``: structure distance (Tumanyan et al. 2022): the MSE between the self-similarity matrices
  (cosine) of the two images' spatial features, whole image.
- ``edit-clip``: CLIP score (100 max(cos, 0)) of the target prompt on the edited image and on its edited region
  (the image multiplied by the mask).
- ``edit-ground-truth`` (the embedded editing sets: embedded-edits, embedded-recolor16): PSNR and LPIPS against the ground-truth target image.
- ``reconstruction``: PSNR and LPIPS against the source over the whole image: the inversion's reconstruction error
  for the inversion methods (ddim-inversion, null-text-inversion), the whole change for an editor.

The backbones are the data set's, and the protocol names them: on real images, LPIPS is the lpips package (v0.1)
with AlexNet (PIE-Bench itself used SqueezeNet) and structure distance uses DINO ViT-B/8's last-layer keys
(PIE-Bench's), both read from torch.hub's cache; on the embedded world, "lpips-shapes" is the same computation as
LPIPS without learned weights (channel-unit-normalized features, squared differences summed over channels,
spatial mean, summed over layers; lpips' ``normalize_tensor`` and ``spatial_average``) over the five conv layers of
the feature network (shapes-cnn32), and "structure-shapes" uses its 8x8 layer.

The keys say which network computed a value, so that nobody compares the embedded world's numbers with a paper's
LPIPS or DINO: ``bg_lpips``, ``gt_lpips``, ``recon_lpips`` and ``structure_distance`` on real images;
``bg_dist_shapes_cnn32``, ``gt_dist_shapes_cnn32``, ``recon_dist_shapes_cnn32`` and ``structure_dist_shapes_cnn32``
on the embedded world.
"""

from __future__ import annotations

import dataclasses

import functools
from pathlib import Path
from typing import Any, ClassVar, Sequence

import lpips
import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure
from torchvision import transforms

from bench import reuse
from bench.clip import clip_scores, load_clip, preflight
from bench.embedded.feature_extractor import WEIGHTS_DIR32, load_network
from bench.errors import BenchError
from bench.files import file_digest
from bench.interfaces import Metric, ReferenceSet
from bench.outputs import Output
from metrics.clip_score import CLIPScore

PSNR_MSE_FLOOR = 1e-10  # identical images: PSNR 100 dB rather than infinity
SSIM_WINDOW, SSIM_SIGMA, SSIM_K = 11, 1.5, (0.01, 0.03)
EMBEDDED_NET = "shapes_cnn32"  # the key suffix of the values the embedded world's feature network computes
STRUCTURE_LAYER = 2  # shapes-cnn32: the third conv block, 64 channels at 8x8
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet weights, which lpips' "alex" backbone loads
DINO_REPO, DINO_WEIGHTS = "facebookresearch_dino_main", "dino_vitbase8_pretrain.pth"


# -- pure functions over float images in [0, 1], [N, 3, H, W] --------------------------------------------------------
def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(PSNR_MSE_FLOOR))


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).flatten(1).mean(1)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM (Wang et al. 2004) per image by torchmetrics (data range 1, 11x11 Gaussian window, sigma 1.5), PIE-Bench's.

    PIE-Bench used a torchmetrics (before 1.5) that cropped the reflection padding's border off the SSIM map before
    averaging; torchmetrics 1.5 (Lightning-AI/torchmetrics#2721) averages the whole map. The protocol is PIE-Bench's:
    torchmetrics' full map, its border (``(window - 1) / 2`` pixels) cropped, averaged per image. In float64:
    torchmetrics clamps negative variances to 0, and float32 round-off in flat regions (the embedded world's
    backgrounds, the masked-out region) would otherwise move SSIM by ~1e-4.
    """
    _, full = structural_similarity_index_measure(
        a.double(), b.double(), gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_WINDOW, data_range=1.0,
        k1=SSIM_K[0], k2=SSIM_K[1], reduction="none", return_full_image=True)
    pad = (SSIM_WINDOW - 1) // 2
    return full[..., pad:-pad, pad:-pad].flatten(1).mean(1).to(a.dtype)


def lpips_from_features(fa: Sequence[torch.Tensor], fb: Sequence[torch.Tensor]) -> torch.Tensor:
    """LPIPS without learned weights (lpips' ``lpips=False``): unit-normalized channels, summed over layers."""
    total = 0
    for x, y in zip(fa, fb):
        d = (lpips.normalize_tensor(x) - lpips.normalize_tensor(y)) ** 2
        total = total + lpips.spatial_average(d.sum(dim=1, keepdim=True), keepdim=False).flatten()
    return total


def self_similarity(features: torch.Tensor) -> torch.Tensor:
    """[N, T, D] tokens -> [N, T, T] cosine similarities."""
    x = F.normalize(features, dim=-1)
    return x @ x.transpose(1, 2)


def structure_distance(fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """MSE between the self-similarity matrices of two images' tokens [N, T, D] (Tumanyan et al. 2022)."""
    return (self_similarity(fa) - self_similarity(fb)).pow(2).flatten(1).mean(1)


# -- backbones ----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _feature_net(folder: str):
    return load_network(Path(folder))


def feature_net_folder() -> Path:
    return WEIGHTS_DIR32


def _net_input(net, images01: torch.Tensor) -> torch.Tensor:
    x = images01 * 2 - 1  # LPIPS takes [-1, 1], as the feature network does
    if x.shape[-1] != net.resolution:
        x = F.interpolate(x, size=(net.resolution, net.resolution), mode="bilinear", antialias=True, align_corners=False)
    return x


def torch_hub_dir() -> Path:
    return Path(torch.hub.get_dir())


class Backbones:
    """The LPIPS and structure-distance networks of a data set: the embedded world's, or AlexNet and DINO."""

    def __init__(self, reference: ReferenceSet):
        self.embedded = bool(reference.embedded)

    def lpips_key(self, prefix: str) -> str:
        """``{prefix}_lpips`` (LPIPS, AlexNet) on real images, ``{prefix}_dist_shapes_cnn32`` on the embedded world."""
        return f"{prefix}_dist_{EMBEDDED_NET}" if self.embedded else f"{prefix}_lpips"

    def structure_key(self) -> str:
        """``structure_distance`` (DINO ViT-B/8) on real images, ``structure_dist_shapes_cnn32`` on the embedded world."""
        return f"structure_dist_{EMBEDDED_NET}" if self.embedded else "structure_distance"

    def lpips_protocol(self) -> dict[str, Any]:
        if self.embedded:
            return {"name": "lpips-shapes", "network": "shapes-cnn32 (feature-net32), its five conv layers",
                    "weights": file_digest([feature_net_folder() / "model.safetensors"]),
                    "computation": "lpips=False: unit-normalized channels, squared difference summed over channels, "
                                   "spatial mean, sum over layers; inputs in [-1, 1]"}
        return {"name": "lpips-alex", "package": "lpips 0.1.4, version 0.1, net alex, linear layers on",
                "inputs": "[-1, 1]", "weights": ALEXNET_FILE}

    def structure_protocol(self) -> dict[str, Any]:
        if self.embedded:
            return {"name": "structure-shapes", "network": "shapes-cnn32, conv block 3 (64 channels, 8x8 tokens)",
                    "weights": file_digest([feature_net_folder() / "model.safetensors"]),
                    "distance": "MSE of the cosine self-similarity matrices"}
        return {"name": "structure-dino", "network": "DINO ViT-B/8 (torch.hub facebookresearch/dino), block 11 keys",
                "preprocessing": "PIE-Bench's: 0..255 floats, resize 224 (max 480), ImageNet normalization",
                "distance": "MSE of the cosine self-similarity matrices"}

    def preflight_lpips(self) -> None:
        if not self.embedded:
            path = torch_hub_dir() / "checkpoints" / ALEXNET_FILE
            if not path.exists():
                raise BenchError(f"LPIPS needs torchvision's AlexNet weights at {path}: download "
                                 f"https://download.pytorch.org/models/{ALEXNET_FILE} into {path.parent}")

    def preflight_structure(self) -> None:
        if not self.embedded:
            repo, weights = torch_hub_dir() / DINO_REPO, torch_hub_dir() / "checkpoints" / DINO_WEIGHTS
            if not repo.is_dir() or not weights.exists():
                raise BenchError(f"structure distance needs DINO ViT-B/8 in torch.hub's cache ({repo} and {weights}): "
                                 f"run torch.hub.load('facebookresearch/dino:main', 'dino_vitb8') on a machine with "
                                 f"network access and copy {torch_hub_dir()} here")

    @functools.cached_property
    def _alex(self):
        self.preflight_lpips()  # loaded once per process and shared (bench.reuse): only read
        return reuse.shared(("lpips", "alex", "0.1"), lambda: lpips.LPIPS(net="alex", version="0.1", verbose=False).eval())

    @functools.cached_property
    def _dino(self):
        self.preflight_structure()
        return reuse.shared(("dino_vitb8", str(torch_hub_dir() / DINO_REPO)),
                            lambda: torch.hub.load(str(torch_hub_dir() / DINO_REPO), "dino_vitb8", source="local").eval())

    @torch.no_grad()
    def lpips(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.embedded:
            net = _feature_net(str(feature_net_folder()))
            return lpips_from_features(net.layers(_net_input(net, a)), net.layers(_net_input(net, b)))
        return self._alex(a * 2 - 1, b * 2 - 1).flatten()

    @torch.no_grad()
    def structure(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.embedded:
            net = _feature_net(str(feature_net_folder()))
            fa, fb = (net.layers(_net_input(net, x))[STRUCTURE_LAYER].flatten(2).transpose(1, 2) for x in (a, b))
            return structure_distance(fa, fb)
        return torch.stack([structure_distance(self._dino_keys(x[None]), self._dino_keys(y[None]))[0]
                            for x, y in zip(a, b)])

    def _dino_keys(self, image01: torch.Tensor) -> torch.Tensor:
        """[1, T, D]: block 11's keys of DINO ViT-B/8, heads concatenated (PIE-Bench's VitExtractor)."""
        model, out = self._dino, []
        x = transforms.Resize(224, max_size=480)(image01 * 255)  # PIE-Bench feeds 0..255 floats
        x = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(x)
        handle = model.blocks[11].attn.qkv.register_forward_hook(lambda m, i, o: out.append(o))
        try:
            model(x)
        finally:
            handle.remove()
        qkv = out[0][0]  # [T, 3 D]
        heads = model.blocks[11].attn.num_heads
        keys = qkv.reshape(qkv.shape[0], 3, heads, -1).permute(1, 2, 0, 3)[1]  # [heads, T, d]
        return keys.transpose(0, 1).reshape(1, qkv.shape[0], -1)


# -- the metric stages -----------------------------------------------------------------------------------------------
def _float01(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 255.0


def _stack(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _masks(items) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(it.mask, dtype=np.float32) for it in items]))[:, None]


def summarize(values: dict[str, torch.Tensor], types: Sequence[str], valid: dict[str, torch.Tensor] | None = None
              ) -> dict[str, float]:
    """Mean of every per-edit value overall (``key``) and per edit type (``key/type``), over the valid edits."""
    out: dict[str, float] = {}
    kinds = sorted(set(types))
    for key, v in values.items():
        v = v.double().cpu()
        ok = (valid or {}).get(key, torch.ones(len(v), dtype=torch.bool)) & torch.isfinite(v)
        out[key] = float(v[ok].mean()) if ok.any() else float("nan")
        for kind in kinds:
            sel = ok & torch.tensor([t == kind for t in types])
            out[f"{key}/{kind}"] = float(v[sel].mean()) if sel.any() else float("nan")
    return out


EDIT_CHUNK = 256  # edits evaluated at a time (LPIPS and structure see one chunk as one batch; a run of at most
# EDIT_CHUNK edits is one batch, as before the metric phase read its samples in chunks)


class EditMetric(Metric):
    """Base: an editing run's per-edit values, averaged overall and per edit type."""

    needs_edits: ClassVar[bool] = True
    requires: ClassVar[str] = ""  # "lpips", "structure": the backbone this metric needs

    def check(self, spec, reference: ReferenceSet) -> None:
        if self.requires == "lpips":
            Backbones(reference).preflight_lpips()
        elif self.requires == "structure":
            Backbones(reference).preflight_structure()

    def compute(self, ctx) -> dict[str, float]:
        if ctx.items is None:
            raise BenchError(f"{self.name}: this run has no edits")
        if len(ctx.items) != ctx.num_samples:
            raise BenchError(f"{self.name}: {ctx.num_samples} samples for {len(ctx.items)} edits")
        backbones = Backbones(ctx.reference)

        def chunk_values(a: int, chunk: torch.Tensor):
            # the edits of this chunk alone: per-edit values of EDIT_CHUNK samples at a time, never the whole run
            part = dataclasses.replace(ctx, samples=chunk, items=ctx.items[a : a + len(chunk)], _features={},
                                       prompts=None if ctx.prompts is None else ctx.prompts[a : a + len(chunk)],
                                       targets=None if ctx.targets is None else ctx.targets[a : a + len(chunk)])
            values, valid = self.per_edit(part, backbones)
            return values, {k: valid.get(k, torch.ones(len(chunk), dtype=torch.bool)) for k in values}

        values, valid = ctx.map_samples(chunk_values, EDIT_CHUNK)
        return summarize(values, [it.edit_type for it in ctx.items], valid)

    def per_edit(self, ctx, backbones: Backbones) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        raise NotImplementedError


class EditBackground(EditMetric):
    name = "edit-background"
    summary = "background preservation (PIE-Bench): PSNR, MSE, SSIM, LPIPS against the source outside the edit mask"
    outputs = (
        Output("bg_psnr", "background PSNR", "higher", ".2f", "edit-background"),
        Output("bg_mse", "background MSE", "lower", ".4f", "edit-background"),
        Output("bg_ssim", "background SSIM", "higher", ".3f", "edit-background"),
        Output("bg_lpips", "background LPIPS (AlexNet)", "lower", ".3f", "edit-background"),
        Output("bg_dist_shapes_cnn32", "background feature distance (shapes-cnn32)", "lower", ".3f", "edit-background"),
    )
    requires = "lpips"

    def protocol(self, spec, reference):
        return {"region": "both images times (1 - mask), metric over the whole image (PIE-Bench)",
                "psnr": f"data range 1, MSE floored at {PSNR_MSE_FLOOR}", "mse": "[0, 1] pixels",
                "ssim": f"Gaussian {SSIM_WINDOW}x{SSIM_WINDOW}, sigma {SSIM_SIGMA}, K {SSIM_K}, reflect pad cropped",
                "lpips": Backbones(reference).lpips_protocol()}

    def per_edit(self, ctx, backbones):
        keep = 1.0 - _masks(ctx.items)
        edited = _float01(ctx.samples) * keep
        source = _float01(_stack([it.source for it in ctx.items])) * keep
        ok = keep.flatten(1).sum(1) > 0
        values = {"bg_psnr": psnr(edited, source), "bg_mse": mse(edited, source), "bg_ssim": ssim(edited, source),
                  backbones.lpips_key("bg"): backbones.lpips(edited, source)}
        return values, {k: ok for k in values}


class EditStructure(EditMetric):
    name = "edit-structure"
    summary = "structure distance: MSE of feature self-similarity between edit and source (DINO on real images)"
    outputs = (
        Output("structure_distance", "structure distance (DINO ViT-B/8)", "lower", ".4f", "edit-structure"),
        Output("structure_dist_shapes_cnn32", "structure distance (shapes-cnn32)", "lower", ".4f", "edit-structure"),
    )
    requires = "structure"

    def protocol(self, spec, reference):
        return {"region": "whole image", "structure": Backbones(reference).structure_protocol()}

    def per_edit(self, ctx, backbones):
        source = _float01(_stack([it.source for it in ctx.items]))
        return {backbones.structure_key(): backbones.structure(_float01(ctx.samples), source)}, {}


class EditCLIP(EditMetric):
    name = "edit-clip"
    summary = "CLIP score of the target prompt on the edited image and on its edited region (PIE-Bench)"
    outputs = (
        Output("clip_whole", "CLIP whole image", "higher", ".2f", "edit-clip"),
        Output("clip_edited", "CLIP edited region", "higher", ".2f", "edit-clip"),
    )
    needs_prompts = True

    def check(self, spec, reference):
        preflight(reference.clip_backbone)

    def protocol(self, spec, reference):
        return {**CLIPScore().protocol(spec, reference), "edited_region": "uint8 image times the mask (PIE-Bench)"}

    def per_edit(self, ctx, backbones):
        model, preprocess = load_clip(ctx.reference.clip_backbone, ctx.device)
        prompts = [it.target_prompt for it in ctx.items]
        masks = _masks(ctx.items)
        region = (ctx.samples.float() * masks).to(torch.uint8)
        return {"clip_whole": clip_scores(model, preprocess, ctx.samples, prompts, ctx.device),
                "clip_edited": clip_scores(model, preprocess, region, prompts, ctx.device)}, \
            {"clip_edited": masks.flatten(1).sum(1) > 0}


class EditGroundTruth(EditMetric):
    name = "edit-ground-truth"
    summary = "distance to the ground-truth edited image (embedded-edits): PSNR and LPIPS, whole image"
    outputs = (
        Output("gt_psnr", "ground-truth PSNR", "higher", ".2f", "edit-ground-truth"),
        Output("gt_lpips", "ground-truth LPIPS (AlexNet)", "lower", ".3f", "edit-ground-truth"),
        Output("gt_dist_shapes_cnn32", "ground-truth feature distance (shapes-cnn32)", "lower", ".3f", "edit-ground-truth"),
    )
    requires = "lpips"

    def check(self, spec, reference):
        if not getattr(reference, "embedded", False) or not getattr(reference, "edit_targets", False):
            raise BenchError(f"metric {self.name} needs ground-truth targets, which only the embedded editing sets "
                             f"have (embedded-edits, embedded-recolor16; data set {reference.name} has none)")
        super().check(spec, reference)

    def protocol(self, spec, reference):
        return {"region": "whole image", "lpips": Backbones(reference).lpips_protocol()}

    def per_edit(self, ctx, backbones):
        if any(it.target is None for it in ctx.items):
            raise BenchError(f"{self.name}: some edits have no ground-truth target")
        edited, target = _float01(ctx.samples), _float01(_stack([it.target for it in ctx.items]))
        return {"gt_psnr": psnr(edited, target), backbones.lpips_key("gt"): backbones.lpips(edited, target)}, {}


class ReconstructionError(EditMetric):
    name = "reconstruction"
    summary = "PSNR and LPIPS against the source, whole image: an inversion method's reconstruction error"
    outputs = (
        Output("recon_psnr", "reconstruction PSNR", "higher", ".2f", "reconstruction"),
        Output("recon_lpips", "reconstruction LPIPS (AlexNet)", "lower", ".3f", "reconstruction"),
        Output("recon_dist_shapes_cnn32", "reconstruction feature distance (shapes-cnn32)", "lower", ".3f", "reconstruction"),
    )
    requires = "lpips"

    def protocol(self, spec, reference):
        return {"region": "whole image", "lpips": Backbones(reference).lpips_protocol()}

    def per_edit(self, ctx, backbones):
        edited, source = _float01(ctx.samples), _float01(_stack([it.source for it in ctx.items]))
        return {"recon_psnr": psnr(edited, source), backbones.lpips_key("recon"): backbones.lpips(edited, source)}, {}

