"""Tiny SD1.5-style and SDXL-style diffusers pipelines built from configs, for tests and smoke runs.

Same classes, key names and conditioning paths as the real models (the SDXL one has two text encoders
and the size/crop embedding), with the real CLIP tokenizer; only the widths are small. No download.
"""

from __future__ import annotations

from typing import Literal

import torch

from .clip_tokenizer import VOCAB_SIZE, load_clip_tokenizer

TinyBase = Literal["sd15", "sdxl"]

TEXT_HIDDEN = 32
BOS_TOKEN_ID, EOS_TOKEN_ID = 49406, 49407


def sd_scheduler_config() -> dict:
    """Stable Diffusion's training schedule as diffusers scheduler kwargs (SD1.5 and SDXL share it)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def tiny_unet_config(base: TinyBase) -> dict:
    if base == "sd15":
        # SD1.5's pattern: cross-attention at every level but the innermost, depth-1 transformers.
        return dict(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=8,
        )
    elif base == "sdxl":
        # SDXL's pattern: no attention at the first level, deeper transformers, text_time size/crop conditioning.
        return dict(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
            cross_attention_dim=2 * TEXT_HIDDEN, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + TEXT_HIDDEN, norm_num_groups=8,
        )
    else:
        raise ValueError(f"unknown tiny base {base!r}; expected 'sd15' or 'sdxl'")


def build_tiny_unet(base: TinyBase = "sd15", seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**tiny_unet_config(base), **overrides}).eval()


def _text_config(**kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=TEXT_HIDDEN, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=TEXT_HIDDEN, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
        pad_token_id=EOS_TOKEN_ID, **kw,
    )


def build_tiny_vae(seed: int = 0):
    """A 3-level AutoencoderKL: 32x32 RGB -> 8x8x4 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
        sample_size=32,
    ).eval()


def build_tiny_pipeline(base: TinyBase = "sd15", seed: int = 0):
    """A complete tiny StableDiffusionPipeline / StableDiffusionXLPipeline with a DDIM scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = build_tiny_unet(base, seed)
    vae = build_tiny_vae(seed + 1)
    scheduler = DDIMScheduler(**sd_scheduler_config(), clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    tokenizer = load_clip_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config()).eval()
    if base == "sd15":
        return StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    text_encoder_2 = CLIPTextModelWithProjection(_text_config()).eval()
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet, scheduler=scheduler,
    )
