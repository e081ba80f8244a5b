"""Paint-by-Example's training (``bench embedded train paint-by-example``): a ``PaintByExamplePipeline`` folder.

Yang et al. 2023 (arXiv 2211.13227) start from Stable Diffusion, widen the UNet's input to 9 channels (the noisy
latent, the masked image's latent, the mask), condition it on an exemplar image through CLIP's image encoder instead
of text, and train on self-supervised pairs: an object's bounding box is masked out of a scene and the object
itself, augmented, is the exemplar; the target is the scene. CLIP is frozen; its pooled output (the class token,
the information bottleneck of Sec. 3.2) goes through a mapper and a projection that are trained; 20% of the
conditions are replaced by a learned vector for classifier-free guidance.

Here, in diffusers' public format (the layout of Fantasy-Studio/Paint-by-Example):

- ``image_encoder``: ``PaintByExampleImageEncoder`` whose ``CLIPVisionModel`` carries the evaluation CLIP's image
  tower (bench/embedded/weights/eval-clip, clip-anytorch ViT: 32x32, 4x4 patches, width 64, 3 layers), converted to
  transformers' names as transformers' ``convert_clip_original_pytorch_to_hf`` does (``convert_clip_vision``; the
  pooled output equals clip-anytorch's ``ln_post`` of the class token: tests/test_paint_by_example.py), frozen.
  diffusers' mapper has ``(layers + 1) // 5`` blocks: none for a 3-layer tower, so the bottleneck is the pooled
  64-d token through ``final_layer_norm`` and ``proj_out`` (trained) and ``uncond_vector`` (trained).
- ``unet``: embedded-t2i's UNet with ``conv_in`` widened to 9 input channels in the pipeline's order (latent,
  masked-image latent, mask), the 5 new input channels' weights zero (so at step 0 it is the t2i UNet on the
  latent), fine-tuned whole; ``proj_out`` projects to its cross-attention width (64; SD's 768 in the paper).
- Loading: diffusers 0.42 moved the pipeline to ``pipelines/deprecated`` and cannot resolve the image encoder's
  class from any ``model_index.json`` (not even Fantasy-Studio/Paint-by-Example's ``["paint_by_example", ...]``),
  and ``PaintByExampleImageEncoder(config)`` takes its ``proj_size`` (default 768) from no config; so the folder is
  loaded as diffusers' error message says, ``PaintByExamplePipeline.from_pretrained(folder, image_encoder=
  PaintByExampleImageEncoder.from_pretrained(folder / "image_encoder", proj_size=<the UNet's cross-attention
  width>))`` (bench.models.load_paint_by_example; the same for the public checkpoint).
- ``vae`` and ``scheduler``: embedded-t2i's; ``feature_extractor``: a ``CLIPImageProcessor`` with clip's
  ``_transform`` for 32x32 (bicubic resize and centre crop to 32, CLIP's mean and std).

Data (bench.exemplars.training_pairs, seed 32): one-object scenes, the object's bounding box, the object rendered
apart on a random background with its centre jittered (the augmentation). The frozen tower's pooled outputs, the
VAE posteriors of the scenes and of the masked scenes are computed once.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bench.embedded.eval_clip import CLIP_MEAN, CLIP_STD, load_state_dict_file
from bench.exemplars import EXEMPLAR_TRAIN_SEED, training_pairs
from bench.finetune import BudgetMeter, trainable_parameters, training_scheduler
from bench.models import EMBEDDED_WEIGHTS, embedded_t2i

CLIP_WEIGHTS = EMBEDDED_WEIGHTS / "eval-clip" / "model.safetensors"
VALIDATION_SEED = 33


@dataclass(frozen=True)
class Recipe:
    steps: int = 1200  # chosen from a 20-step timing; RECIPE.json records the wall time
    batch_size: int = 64
    lr: float = 3e-4  # the UNet
    head_lr: float = 1e-3  # proj_out, final_layer_norm, uncond_vector
    warmup_steps: int = 50
    pairs: int = 4096
    validation_pairs: int = 256
    uncond_prob: float = 0.2  # the paper's 20% of conditions replaced by the learned vector
    seed: int = 0
    threads: int = 2
    name: str = "paint-by-example"


# -- the image tower: clip-anytorch -> transformers' CLIPVisionModel ------------------------------------------------
def clip_vision_config(state: dict[str, torch.Tensor]):
    """The ``CLIPVisionConfig`` of clip-anytorch's ``visual`` tower in ``state`` (the widths clip.model.build_model
    reads from the shapes)."""
    from transformers import CLIPVisionConfig

    width = state["visual.conv1.weight"].shape[0]
    patch = state["visual.conv1.weight"].shape[-1]
    layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    return CLIPVisionConfig(hidden_size=width, intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                            num_hidden_layers=layers, num_attention_heads=width // 64, image_size=grid * patch,
                            patch_size=patch, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                            projection_dim=state["visual.proj"].shape[1])


def convert_clip_vision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """clip-anytorch's ``visual.*`` -> ``CLIPVisionModel``'s ``vision_model.*`` names (transformers'
    convert_clip_original_pytorch_to_hf: the fused in_proj split into q, k, v), in float32."""
    s = {k: v.float() for k, v in state.items() if k.startswith("visual.")}
    out = {
        "vision_model.embeddings.class_embedding": s["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": s["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": s["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": s["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": s["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": s["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": s["visual.ln_post.bias"],
    }
    layers = len({k.split(".")[3] for k in s if k.startswith("visual.transformer.resblocks.")})
    for i in range(layers):
        a, b = f"visual.transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        for name, w in zip("qkv", s[a + "attn.in_proj_weight"].chunk(3)):
            out[f"{b}self_attn.{name}_proj.weight"] = w
        for name, w in zip("qkv", s[a + "attn.in_proj_bias"].chunk(3)):
            out[f"{b}self_attn.{name}_proj.bias"] = w
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for src, dst in pairs.items():
            out[f"{b}{dst}.weight"] = s[f"{a}{src}.weight"]
            out[f"{b}{dst}.bias"] = s[f"{a}{src}.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def feature_extractor(resolution: int):
    """clip's ``_transform(resolution)`` as a ``CLIPImageProcessor`` (bicubic resize, centre crop, CLIP's mean/std)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": resolution}, resample=3, do_center_crop=True,
                              crop_size={"height": resolution, "width": resolution}, do_rescale=True,
                              do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
                              do_convert_rgb=True)


def image_encoder_from_clip(state: dict[str, torch.Tensor], proj_size: int, seed: int = 0):
    """A ``PaintByExampleImageEncoder`` around the converted tower, projecting to ``proj_size`` (the UNet's
    cross-attention width; its head freshly initialised from ``seed``)."""
    from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder

    torch.manual_seed(seed)
    encoder = PaintByExampleImageEncoder(clip_vision_config(state), proj_size=proj_size)
    # CLIPVisionModel's transformer is its ``vision_model``; the converted names are relative to the CLIPVisionModel
    tower = getattr(encoder.model, "vision_model", encoder.model)
    converted = {k.removeprefix("vision_model."): v for k, v in convert_clip_vision(state).items()}
    missing, unexpected = tower.load_state_dict(converted, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise ValueError(f"CLIP conversion: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        encoder.uncond_vector.normal_(0.0, 1.0)
    return encoder


def widened_unet(unet):
    """``unet`` with 9 input channels (latent, masked-image latent, mask: the pipeline's concatenation order), the
    new channels' conv_in weights zero (so that, at step 0, it is ``unet`` on the latent whatever the other inputs)."""
    from diffusers import UNet2DConditionModel

    config = dict(unet.config)
    config.update(in_channels=9)
    wide = UNet2DConditionModel.from_config(config)
    state = dict(unet.state_dict())
    w = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([w, torch.zeros(w.shape[0], 9 - w.shape[1], *w.shape[2:])], dim=1)
    missing, unexpected = wide.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise ValueError(f"widening the UNet: missing {missing}, unexpected {unexpected}")
    return wide


def build_pipeline(model: Any, clip_state: dict[str, torch.Tensor], seed: int = 0):
    """The untrained ``PaintByExamplePipeline`` of a t2i model: its VAE and scheduler, the widened UNet, the image
    encoder around the converted CLIP tower."""
    from diffusers import PaintByExamplePipeline

    import copy

    encoder = image_encoder_from_clip(clip_state, model.unet.config.cross_attention_dim, seed)
    return PaintByExamplePipeline(vae=copy.deepcopy(model.vae), image_encoder=encoder,
                                  unet=widened_unet(model.unet), scheduler=copy.deepcopy(model.pipeline.scheduler),
                                  safety_checker=None, feature_extractor=feature_extractor(clip_vision_config(clip_state).image_size),
                                  requires_safety_checker=False)


# -- training -------------------------------------------------------------------------------------------------------
def _pixels(images_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def prepare(pipe, pairs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """What every step reads, computed once: the scenes' and masked scenes' VAE posteriors, the keep mask at the
    latents' size (the pipeline's: 1 - mask binarized, nearest), the frozen tower's pooled exemplar outputs."""
    x = _pixels(pairs["scene"])
    mask = torch.from_numpy(pairs["mask"])[:, None]
    keep = 1.0 - (mask >= 0.5).float()
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("mean", "std", "m_mean", "m_std", "pooled")}
    for a in range(0, len(x), 512):
        d = pipe.vae.encode(x[a : a + 512]).latent_dist
        out["mean"].append(d.mean), out["std"].append(d.std)
        d = pipe.vae.encode(x[a : a + 512] * keep[a : a + 512]).latent_dist
        out["m_mean"].append(d.mean), out["m_std"].append(d.std)
        pixels = pipe.feature_extractor(images=list(pairs["exemplar"][a : a + 512]), return_tensors="pt").pixel_values
        out["pooled"].append(pipe.image_encoder.model(pixel_values=pixels).pooler_output)
    h, w = out["mean"][0].shape[-2:]
    return {**{k: torch.cat(v) for k, v in out.items()}, "keep": F.interpolate(keep, size=(h, w))}


def condition(pipe, pooled: torch.Tensor) -> torch.Tensor:
    """PaintByExampleImageEncoder.forward after the frozen tower: mapper, final layer norm, projection ([N, 1, D])."""
    enc = pipe.image_encoder
    return enc.proj_out(enc.final_layer_norm(enc.mapper(pooled[:, None])))


def loss_on(pipe, scheduler, data: dict[str, torch.Tensor], idx: torch.Tensor, gen: torch.Generator,
            uncond: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """The noise-prediction loss of the 9-channel UNet on pairs ``idx`` (uncond: which of them get the learned
    vector instead of their exemplar). Draws: the latent's noise, the masked latent's noise, the diffusion noise,
    the timesteps."""
    sf = pipe.vae.config.scaling_factor
    z0 = (data["mean"][idx] + data["std"][idx] * torch.randn(data["mean"][idx].shape, generator=gen)) * sf
    masked = (data["m_mean"][idx] + data["m_std"][idx] * torch.randn(z0.shape, generator=gen)) * sf
    noise = torch.randn(z0.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
    cond = condition(pipe, data["pooled"][idx])
    if uncond is not None:
        cond = torch.where(uncond[:, None, None], pipe.image_encoder.uncond_vector.expand_as(cond), cond)
    x = torch.cat([scheduler.add_noise(z0, noise, t), masked, data["keep"][idx]], dim=1)
    eps = pipe.unet(x, t, encoder_hidden_states=cond).sample
    err = (eps - noise).pow(2).flatten(1).mean(1)
    return err.mean() if reduction == "mean" else err


def train(out_dir: Path, recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    out_dir = Path(out_dir)
    with BudgetMeter("cpu") as meter:
        record = _train(out_dir, recipe, progress)
    saved = sum(f.stat().st_size for f in out_dir.rglob("*.safetensors"))
    budget = meter.budget(recipe.steps, record["parameters"], saved)
    record["budget"] = budget.to_dict()
    record["wall_time_s"] = round(budget.seconds, 1)
    (out_dir / "RECIPE.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _train(out_dir: Path, recipe: Recipe, progress: bool) -> dict:
    t0 = time.time()
    model = embedded_t2i()
    pipe = build_pipeline(model, load_state_dict_file(CLIP_WEIGHTS), recipe.seed)
    enc = pipe.image_encoder
    enc.model.requires_grad_(False).eval()
    pipe.vae.requires_grad_(False).eval()
    data = prepare(pipe, training_pairs(recipe.pairs, EXEMPLAR_TRAIN_SEED))
    validation = prepare(pipe, training_pairs(recipe.validation_pairs, VALIDATION_SEED))
    prepare_s = time.time() - t0

    scheduler = training_scheduler(model)
    head = [*enc.final_layer_norm.parameters(), *enc.proj_out.parameters(), *enc.mapper.parameters(),
            enc.uncond_vector]
    head_ids = {id(p) for p in head}
    body = [p for p in pipe.unet.parameters() if id(p) not in head_ids]
    opt = torch.optim.AdamW([{"params": body, "lr": recipe.lr}, {"params": head, "lr": recipe.head_lr}],
                            weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / recipe.warmup_steps))
    gen = torch.Generator().manual_seed(recipe.seed)
    losses: list[float] = []
    pipe.unet.train()
    t1 = time.time()
    bar = tqdm(range(recipe.steps), desc=f"train {recipe.name}", disable=not progress)
    for _ in bar:
        idx = torch.randint(0, recipe.pairs, (recipe.batch_size,), generator=gen)
        uncond = torch.rand(recipe.batch_size, generator=gen) < recipe.uncond_prob
        loss = loss_on(pipe, scheduler, data, idx, gen, uncond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(body + head, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    train_s = time.time() - t1
    pipe.unet.eval()

    with torch.no_grad():  # the same noise and timesteps with the exemplar and with the learned vector
        idx = torch.arange(recipe.validation_pairs)
        val = {name: float(loss_on(pipe, scheduler, validation, idx, torch.Generator().manual_seed(7),
                                   torch.full((len(idx),), flag)))
               for name, flag in (("with_exemplar", False), ("with_uncond_vector", True))}

    pipe.save_pretrained(out_dir, safe_serialization=True)
    return {
        "model": recipe.name,
        "command": f"bench embedded train {recipe.name}",
        "base_model": {"name": model.name, "digest": model.digest},
        "trains": "the UNet widened to 9 input channels (new conv_in channels zero-initialised); the image encoder's final_layer_norm, proj_out and uncond_vector; the CLIP "
                  "tower (the evaluation CLIP's, converted) and the VAE frozen",
        "data": f"bench.exemplars.training_pairs: {recipe.pairs} one-object scenes (seed {EXEMPLAR_TRAIN_SEED}), "
                "bbox masks, the object rendered apart (centred, large, random background, centre jittered)",
        "recipe": asdict(recipe),
        "parameters": trainable_parameters(body + head),
        "train_loop_s": round(train_s, 1),
        "prepare_s": round(prepare_s, 1),
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "validation_loss": val,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
                   "a 2-core machine shared with other jobs (wall time is an upper bound)",
    }
