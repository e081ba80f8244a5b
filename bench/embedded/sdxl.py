"""The embedded SDXL model: a genuine ``StableDiffusionXLPipeline`` folder with SDXL's micro-conditioning, 32x32.

SDXL in miniature (Podell et al. 2023), in SDXL-base's own layout and file formats (``model_index.json``,
``vae/``, ``unet/``, ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``, ``scheduler/``;
safetensors), so that it loads with ``StableDiffusionXLPipeline.from_pretrained`` as SDXL does:

- ``AutoencoderKL``: the embedded text-to-image model's VAE, copied (32x32 RGB <-> 4x8x8 latents); SDXL trained
  its own, the paper's point here is the UNet's conditioning, not the autoencoder.
- ``CLIPTextModel`` and ``CLIPTextModelWithProjection`` (width 32 each, 2 layers, CLIP's vocabulary): the UNet's
  context is their penultimate hidden states concatenated (64 wide), as SDXL's two encoders' are; the second's
  projected pooled embedding goes to the UNet with the micro-conditioning.
- ``UNet2DConditionModel`` with ``addition_embed_type="text_time"``: the six ``add_time_ids`` (original size,
  crop top-left, target size), each a 16-wide sinusoidal embedding, concatenated with the pooled text embedding
  and added to the timestep embedding (SDXL's design, Podell et al. 2.2 and the diffusers config).
- ``EulerDiscreteScheduler`` with SD's betas (SDXL-base's scheduler class).

The data carry what SDXL's micro-conditioning is about (``bench embedded train sdxl``, bench/recipes/sdxl.py):
plain 32x32 renders (original size 32, crop (0, 0)); small originals, down-sampled to 8-24 px and up-sampled back
(blurry; original size s); and random crops, a 32x32 window of the scene rendered at 48x48 (original size 48,
crop (top, left): objects cut by the window's edge). Caption dropout sets both text embeddings to zeros, the
unconditional branch the pipeline uses (``force_zeros_for_empty_prompt``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from bench.embedded.t2i import SD15_SCHEDULER_CONFIG, TEXT_CONFIG, UNET_CONFIG
from bench.embedded.tokenizer import load, write_tokenizer_files
from bench.embedded.tokenizer import train as convert_tokenizer

TEXT_WIDTH = 32
SDXL_TEXT_CONFIG = dict(TEXT_CONFIG, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, projection_dim=TEXT_WIDTH)
TIME_EMBED = 16  # per add_time_id (SDXL-base: 256)
SDXL_UNET_CONFIG = dict(
    UNET_CONFIG,
    cross_attention_dim=2 * TEXT_WIDTH,  # the two encoders' penultimate states, concatenated
    use_linear_projection=True,  # as SDXL-base's transformer blocks
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED,
    projection_class_embeddings_input_dim=6 * TIME_EMBED + TEXT_WIDTH,  # six time ids + the pooled embedding
)
# SDXL-base's scheduler: EulerDiscreteScheduler, SD's scaled-linear betas, "leading" spacing, steps_offset 1
SDXL_SCHEDULER_CONFIG = dict(SD15_SCHEDULER_CONFIG, timestep_spacing="leading", interpolation_type="linear",
                             use_karras_sigmas=False)
CROP_RESOLUTION = 48  # the larger render the random 32x32 crops are cut from
ORIGINAL_SIZES = (8, 12, 16, 24)  # the small originals, up-sampled to 32


def build_text_encoders(config: dict = SDXL_TEXT_CONFIG):
    return CLIPTextModel(CLIPTextConfig(**config)), CLIPTextModelWithProjection(CLIPTextConfig(**config))


def build_unet(config: dict = SDXL_UNET_CONFIG):
    return UNet2DConditionModel(**config)


def build_scheduler():
    return EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)


def encode(text_encoder, text_encoder_2, input_ids):
    """(prompt_embeds [B, 77, 64], pooled [B, 32]) exactly as ``StableDiffusionXLPipeline.encode_prompt`` makes them
    (clip_skip None: each encoder's penultimate hidden state; the second encoder's projected pooled output)."""
    import torch

    first = text_encoder(input_ids, output_hidden_states=True)
    second = text_encoder_2(input_ids, output_hidden_states=True)
    return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds


def save_pipeline(out_dir: Path, vae: AutoencoderKL, text_encoder, text_encoder_2, unet, scheduler=None) -> Path:
    """Write a StableDiffusionXLPipeline folder in SDXL-base's layout (tokenizers as vocab.json + merges.txt)."""
    out_dir = Path(out_dir)
    tok_dir = out_dir / "tokenizer"
    write_tokenizer_files(tok_dir)
    tokenizer = load(tok_dir)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=scheduler or build_scheduler())
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):  # transformers saves tokenizer.json; SDXL's folders hold vocab + merges
        shutil.rmtree(out_dir / name)
        convert_tokenizer(out_dir / name, progress=False)
    return out_dir
