"""A tiny random StableDiffusionPipeline folder in the real layout (the embedded model's, at toy widths)."""

from __future__ import annotations

from pathlib import Path

TINY_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
)
TINY_TEXT = dict(
    vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=16, bos_token_id=49406, eos_token_id=49407,
    pad_token_id=49407,
)
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2,
    norm_num_groups=4,
)


def save_tiny_t2i(folder: Path, seed: int = 0) -> Path:
    import torch

    from bench.embedded.t2i import build_text_encoder, build_unet, build_vae, save_pipeline

    torch.manual_seed(seed)
    vae, text, unet = build_vae(TINY_VAE), build_text_encoder(TINY_TEXT), build_unet(TINY_UNET)
    with torch.no_grad():  # a random UNet's output is tiny; make guidance visibly matter
        for p in unet.conv_out.parameters():
            p.mul_(50)
    return save_pipeline(Path(folder), vae, text, unet)
