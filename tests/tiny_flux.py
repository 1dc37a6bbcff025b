"""Tiny random FLUX components, built in code (no hub), at diffusers' own FLUX fast-test sizes."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from sega.demo.shapes import build_tokenizer

T5_TOKENS = 16  # max_sequence_length for the tests: the T5 tokenizer pads every text to it
PROMPT = "a large red circle on white background"


def tiny_flux_components(guidance_embeds: bool, seed: int = 0, latent_channels: int = 1) -> dict:
    """FluxPipeline's components with random weights: [dev]-like with ``guidance_embeds``, else [schnell]-like.

    ``latent_channels``: the VAE's (FLUX.1 has 16: the app's tests take that many, so that FLUX's latent-to-RGB
    preview factors apply); the transformer sees 4 times as many, packed 2x2.

    The tokenizers are the demo model's word-level one (CLIP's 77 tokens for the first; the second pads to the
    call's ``max_sequence_length``), so prompts must use its words (see ``sega.demo.shapes``).
    """
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )
    tokenizer = build_tokenizer(max_length=77)
    tokenizer_2 = build_tokenizer(max_length=512)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4,
        projection_dim=32, max_position_embeddings=77, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        hidden_act="gelu", layer_norm_eps=1e-5,
    ))
    torch.manual_seed(seed)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=5,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0,
    ))
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )
    for module in (transformer, text_encoder, text_encoder_2, vae):
        module.eval()
    return {"scheduler": FlowMatchEulerDiscreteScheduler(), "vae": vae, "text_encoder": text_encoder,
            "tokenizer": tokenizer, "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2,
            "transformer": transformer}


def save_tiny_flux(folder: str | Path, guidance_embeds: bool, seed: int = 0, latent_channels: int = 1) -> Path:
    """Save the tiny components as a diffusers pipeline folder (model_index.json and one folder each)."""
    FluxPipeline(**tiny_flux_components(guidance_embeds, seed, latent_channels)).save_pretrained(folder)
    return Path(folder)
