"""Tiny random pipeline folders in the layouts of today's families: SDXL, SD3 and FLUX (issue 16).

Each is the pipeline's own ``save_pretrained`` folder at toy widths, built offline: the CLIP tokenizers are the
embedded world's conversion of the clip package's BPE file (tests/tiny_t2i.py's), and the T5 tokenizer is a
transformers ``T5Tokenizer`` over an in-memory unigram vocabulary (no sentencepiece file, no download). The widths
follow the constraints the pipelines check (facts carried over from diffusers' own fast tests' dummy components):

- SDXL: UNet ``cross_attention_dim`` = the two text encoders' widths added; ``addition_embed_type`` "text_time"
  with ``projection_class_embeddings_input_dim`` = 6 x ``addition_time_embed_dim`` + the second encoder's
  ``projection_dim``.
- SD3: ``joint_attention_dim`` = T5's ``d_model`` (the CLIP context is zero-padded to it), ``pooled_projection_dim``
  = the two CLIP projections added.
- FLUX: ``in_channels`` = 4 x the VAE's latent channels (2x2 packing), ``pooled_projection_dim`` = CLIP's width,
  ``joint_attention_dim`` = T5's ``d_model``, ``axes_dims_rope`` adding up to ``attention_head_dim``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tests.tiny_t2i import TINY_TEXT, TINY_VAE

CLIP = dict(TINY_TEXT)  # width 16, CLIP's 49,408-token vocabulary, projection 16
T5 = dict(d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4, relative_attention_num_buckets=8)
T5_WORDS = ("a", "small", "large", "red", "green", "blue", "circle", "square", "triangle", "on", "background", "black",
            "white", "gray", "navy")
TINY_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2 * CLIP["hidden_size"], attention_head_dim=2, norm_num_groups=4, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + CLIP["projection_dim"],
)
TINY_SD3 = dict(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
                num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=T5["d_model"],
                pooled_projection_dim=2 * CLIP["projection_dim"])
TINY_FLUX = dict(patch_size=1, in_channels=4 * 4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=T5["d_model"], pooled_projection_dim=CLIP["hidden_size"],
                 axes_dims_rope=(4, 4, 8))


def _clip_tokenizer():
    from bench.embedded.tokenizer import load, write_tokenizer_files

    return load(write_tokenizer_files(Path(tempfile.mkdtemp(prefix="tiny-clip-tok-"))))


def _t5_tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -float(i + 1)) for i, w in enumerate(T5_WORDS)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _t5_encoder():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=3 + len(T5_WORDS), **T5))


def _vae(shift: bool):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**TINY_VAE, **({"shift_factor": 0.0} if shift else {}))


def save_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from bench.embedded.t2i import SD15_SCHEDULER_CONFIG

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    with torch.no_grad():  # a random UNet's output is tiny; make guidance and micro-conditioning visibly matter
        for p in unet.conv_out.parameters():
            p.mul_(50)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(shift=False), text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP)), tokenizer=_clip_tokenizer(),
        tokenizer_2=_clip_tokenizer(), unet=unet, scheduler=EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def save_tiny_sd3(folder: Path, seed: int = 0) -> Path:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**TINY_SD3), scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(shift=True),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP)), tokenizer=_clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP)), tokenizer_2=_clip_tokenizer(),
        text_encoder_3=_t5_encoder(), tokenizer_3=_t5_tokenizer(),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def save_tiny_flux(folder: Path, seed: int = 0) -> Path:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    pipe = FluxPipeline(
        transformer=FluxTransformer2DModel(**TINY_FLUX), scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(shift=True),
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP)), tokenizer=_clip_tokenizer(),
        text_encoder_2=_t5_encoder(), tokenizer_2=_t5_tokenizer(),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
