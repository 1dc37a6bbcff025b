"""Diffusers-format Stable Diffusion weights to ONE original (LDM/CompVis) single-file checkpoint.

The key mappings are those of diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py``
(https://github.com/huggingface/diffusers, Apache-2.0, Copyright The HuggingFace Team), generalised: the script
hard-codes SD 1.x's layout (4 blocks, 2 layers per down block, cross-attention in all but the last), here the
blocks, the layers per block and where the attentions and resamplers are come from the models' configs, so the
result is the exact inverse of what ``diffusers.loaders.single_file_utils`` (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``) applies in ``from_single_file``.
"""

from __future__ import annotations

import torch

# (stable-diffusion, HF Diffusers), as in the script.
UNET_MAP = [
    ("time_embed.0.weight", "time_embedding.linear_1.weight"),
    ("time_embed.0.bias", "time_embedding.linear_1.bias"),
    ("time_embed.2.weight", "time_embedding.linear_2.weight"),
    ("time_embed.2.bias", "time_embedding.linear_2.bias"),
    ("input_blocks.0.0.weight", "conv_in.weight"),
    ("input_blocks.0.0.bias", "conv_in.bias"),
    ("out.0.weight", "conv_norm_out.weight"),
    ("out.0.bias", "conv_norm_out.bias"),
    ("out.2.weight", "conv_out.weight"),
    ("out.2.bias", "conv_out.bias"),
]
UNET_RESNET_MAP = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]
VAE_ATTENTION_MAP = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_layer_map(config) -> list[tuple[str, str]]:
    """The script's ``unet_conversion_map_layer``, from the UNet's config instead of SD 1.x's constants."""
    layers = config["layers_per_block"]
    down, up = config["down_block_types"], config["up_block_types"]
    pairs = []
    for i, kind in enumerate(down):
        for j in range(layers):
            pairs.append((f"input_blocks.{(layers + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if "CrossAttn" in kind:
                pairs.append((f"input_blocks.{(layers + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < len(down) - 1:  # no downsample in the last down block
            pairs.append((f"input_blocks.{(layers + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
    for i, kind in enumerate(up):
        for j in range(layers + 1):
            pairs.append((f"output_blocks.{(layers + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if "CrossAttn" in kind:
                pairs.append((f"output_blocks.{(layers + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < len(up) - 1:  # no upsample in the last up block; it follows the attention where there is one
            slot = 2 if "CrossAttn" in kind else 1
            pairs.append((f"output_blocks.{(layers + 1) * i + layers}.{slot}.", f"up_blocks.{i}.upsamplers.0."))
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        pairs.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return pairs


def convert_unet_state_dict(state_dict: dict, config) -> dict:
    """The script's ``convert_unet_state_dict`` with :func:`unet_layer_map`."""
    mapping = {k: k for k in state_dict}
    for sd_name, hf_name in UNET_MAP:
        mapping[hf_name] = sd_name
    for k, v in mapping.items():
        if "resnets" in k:
            for sd_part, hf_part in UNET_RESNET_MAP:
                v = v.replace(hf_part, sd_part)
            mapping[k] = v
    layer_map = unet_layer_map(config)
    for k, v in mapping.items():
        for sd_part, hf_part in layer_map:
            if v.startswith(hf_part):
                v = sd_part + v[len(hf_part):]
                break
        mapping[k] = v
    return {v: state_dict[k] for k, v in mapping.items()}


def vae_map(config) -> list[tuple[str, str]]:
    """The script's ``vae_conversion_map``, from the VAE's config (the decoder has one more layer per block)."""
    blocks, layers = len(config["block_out_channels"]), config["layers_per_block"]
    pairs = []
    for i in range(blocks):
        for j in range(layers):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        for j in range(layers + 1):  # up blocks are numbered in reverse
            pairs.append((f"decoder.up.{blocks - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
        if i < blocks - 1:
            pairs.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0."))
            pairs.append((f"decoder.up.{blocks - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0."))
    for part in ("encoder", "decoder"):
        for i in range(2):
            pairs.append((f"{part}.mid.block_{i + 1}.", f"{part}.mid_block.resnets.{i}."))
        pairs.append((f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0."))
    return pairs


def convert_vae_state_dict(state_dict: dict, config) -> dict:
    """The script's ``convert_vae_state_dict``: renamed blocks, ``nin_shortcut``/``norm_out``, and the mid
    attention's linear projections as SD's 1x1 convolutions (``reshape_weight_for_sd``)."""
    prefixes = vae_map(config)
    out = {}
    for k, v in state_dict.items():
        new = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        for sd_part, hf_part in prefixes:
            if new.startswith(hf_part):
                new = sd_part + new[len(hf_part):]
                break
        if ".mid.attn_1." in new:
            head, _, tail = new.rpartition(".mid.attn_1.")
            name, _, param = tail.rpartition(".")
            new = f"{head}.mid.attn_1.{VAE_ATTENTION_MAP[name]}.{param}"
            if name != "group_norm" and v.ndim == 2:
                v = v.reshape(*v.shape, 1, 1)
        out[new] = v
    return out


def convert_text_encoder_state_dict(state_dict: dict) -> dict:
    """SD 1.x's CLIP text encoder is stored as transformers' ``CLIPTextModel`` (the script's
    ``convert_text_enc_state_dict`` is the identity), as laid out before transformers 5.6 flattened it: under
    ``text_model.``, which diffusers' loader takes off again for a flattened model."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state_dict.items()}


def to_single_file(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """One LDM checkpoint from diffusers' UNet, VAE and CLIP text encoder (the script's ``__main__``)."""
    checkpoint = {}
    for k, v in convert_unet_state_dict(unet.state_dict(), unet.config).items():
        checkpoint[f"model.diffusion_model.{k}"] = v
    for k, v in convert_vae_state_dict(vae.state_dict(), vae.config).items():
        checkpoint[f"first_stage_model.{k}"] = v
    for k, v in convert_text_encoder_state_dict(text_encoder.state_dict()).items():
        checkpoint[f"cond_stage_model.transformer.{k}"] = v
    return {k: v.detach().contiguous() for k, v in checkpoint.items()}
