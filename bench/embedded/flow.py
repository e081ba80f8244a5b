"""The embedded flow-matching model: a genuine ``StableDiffusion3Pipeline`` folder (MMDiT, rectified flow), 32x32.

SD3 in miniature (Esser et al. 2024), in SD3-medium's layout and file formats (``model_index.json``,
``transformer/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``,
``scheduler/``; safetensors), so that it loads with ``StableDiffusion3Pipeline.from_pretrained`` as SD3 does:

- ``SD3Transformer2DModel``: an MMDiT (joint attention over image and text tokens, separate weights per stream,
  adaLN from the timestep and the pooled text embedding), 2x2 latent patches (16 image tokens), 4 blocks of width
  96. Velocity prediction: the transformer predicts ``noise - x0`` at ``x_t = (1 - t) x0 + t noise``.
- Two ``CLIPTextModelWithProjection`` (width 32, 2 layers, CLIP's vocabulary): their penultimate hidden states,
  concatenated, are the context (``joint_attention_dim`` 64); their projected pooled outputs, concatenated, the
  pooled embedding. There is no third (T5) encoder: ``text_encoder_3`` and ``tokenizer_3`` are null in
  model_index.json, and the folder loads as diffusers' SD3 docs load SD3 without T5:
  ``StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)``. The pipeline then
  appends ``max_sequence_length`` zero tokens for T5; this model was trained with none, so call it with
  ``max_sequence_length=0`` (the harness does: the loader reads it from transformer/RECIPE.json). 256 zero tokens
  would make the context 333 tokens instead of 77, and every joint block's context stream and attention that much
  longer: several times the training cost on 2 CPU cores.
- ``AutoencoderKL``: the embedded text-to-image model's VAE, with SD3's latent normalization: ``shift_factor`` the
  mean of the training latents and ``scaling_factor`` one over their standard deviation after the shift
  (SD3's 0.0609 and 1.5305 were computed the same way).
- ``FlowMatchEulerDiscreteScheduler`` with shift 1: SD3 shifts its schedule by 3 at 1024x1024 for its many image
  tokens (Esser et al. 5.3.2); at 16 tokens no shift.

Training (``bench embedded train flow``, bench/recipes/flow.py): rectified flow with SD3's logit-normal timestep
sampling (Esser et al. 3.1, m = 0, s = 1); ``bench embedded train flow-reflow``: the second rectified flow of Liu
et al. 2023 (reflow), the same architecture fine-tuned on pairs (noise, image) that the first flow's ODE made.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from bench.embedded.sdxl import SDXL_TEXT_CONFIG, TEXT_WIDTH
from bench.embedded.tokenizer import load, write_tokenizer_files
from bench.embedded.tokenizer import train as convert_tokenizer

TRANSFORMER_CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=4,
    attention_head_dim=24,
    num_attention_heads=4,
    joint_attention_dim=2 * TEXT_WIDTH,  # the two CLIP encoders' states, concatenated (no T5 to pad to)
    caption_projection_dim=96,
    pooled_projection_dim=2 * TEXT_WIDTH,
    pos_embed_max_size=16,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)
MAX_SEQUENCE_LENGTH = 0  # the zero T5 tokens of the context (the pipeline's max_sequence_length): none


def build_text_encoders(config: dict = SDXL_TEXT_CONFIG):
    return CLIPTextModelWithProjection(CLIPTextConfig(**config)), CLIPTextModelWithProjection(CLIPTextConfig(**config))


def build_transformer(config: dict = TRANSFORMER_CONFIG):
    return SD3Transformer2DModel(**config)


def build_scheduler():
    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def encode(text_encoder, text_encoder_2, input_ids, max_sequence_length: int = MAX_SEQUENCE_LENGTH):
    """(prompt_embeds [B, 77 + max_sequence_length, 64], pooled [B, 64]) exactly as
    ``StableDiffusion3Pipeline.encode_prompt`` makes them without a T5 encoder (clip_skip None: penultimate states;
    the T5 part zeros)."""
    import torch

    first = text_encoder(input_ids, output_hidden_states=True)
    second = text_encoder_2(input_ids, output_hidden_states=True)
    clip = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    t5 = clip.new_zeros(clip.shape[0], max_sequence_length, clip.shape[-1])
    return torch.cat([clip, t5], dim=-2), torch.cat([first.text_embeds, second.text_embeds], dim=-1)


def save_pipeline(out_dir: Path, vae: AutoencoderKL, text_encoder, text_encoder_2, transformer, scheduler=None) -> Path:
    """Write a StableDiffusion3Pipeline folder in SD3-medium's layout, without T5 (tokenizers as vocab + merges)."""
    out_dir = Path(out_dir)
    tok_dir = out_dir / "tokenizer"
    write_tokenizer_files(tok_dir)
    tokenizer = load(tok_dir)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler or build_scheduler(), vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(out_dir / name)
        convert_tokenizer(out_dir / name, progress=False)
    return out_dir
