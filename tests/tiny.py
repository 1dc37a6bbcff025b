"""Tiny random Stable Diffusion components, built in the test (no hub)."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sega.demo.shapes import build_tokenizer

SCHEDULERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}


def tiny_components(scheduler: str = "ddim", seed: int = 0) -> dict:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    ))
    sched = SCHEDULERS[scheduler](beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000)
    for m in (unet, vae, text_encoder):
        m.eval()
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet, "scheduler": sched}


def tiny_mask_components(scheduler: str = "ddim", seed: int = 0, vae_blocks: int = 2) -> dict:
    """Like :func:`tiny_components`, with a three-level UNet: cross-attention two downsamplings below the latent
    (``down_blocks.2``, ``up_blocks.0`` with two layers, as LEDITS++'s masks need) and one downsampling below
    (``down_blocks.1``, ``up_blocks.1``, which the masks must ignore); a VAE of ``vae_blocks`` levels."""
    parts = tiny_components(scheduler, seed)
    torch.manual_seed(seed + 1)
    parts["unet"] = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8,
    ).eval()
    if vae_blocks != 2:
        parts["vae"] = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * vae_blocks,
            up_block_types=("UpDecoderBlock2D",) * vae_blocks, block_out_channels=(8,) + (16,) * (vae_blocks - 1),
            layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16,
        ).eval()
    return parts


def tiny_xl_components(scheduler: str = "ddim", seed: int = 0) -> dict:
    """Tiny random SDXL components, shaped as diffusers' own SDXL tests build them: a UNet with
    ``addition_embed_type="text_time"``, a CLIPTextModel and a CLIPTextModelWithProjection (pooled output), two
    word-level tokenizers padded to CLIP's 77 tokens, a VAE with ``force_upcast`` as SDXL's."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(max_length=77)
    hidden, projection, time_dim = 16, 16, 4
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * hidden, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=6 * time_dim + projection,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=0.13025, force_upcast=True,
    )
    config = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=77, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                  projection_dim=projection)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    sched = SCHEDULERS[scheduler](beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000)
    for m in (unet, vae, text_encoder, text_encoder_2):
        m.eval()
    return {"vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "tokenizer": tokenizer,
            "tokenizer_2": build_tokenizer(max_length=77), "unet": unet, "scheduler": sched}
