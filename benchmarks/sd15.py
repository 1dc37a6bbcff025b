"""Stable Diffusion 1.5's architecture with random weights, built offline, for benchmarks only.

Its images are noise: only its cost is real. The time and memory of a network do not depend on its weight
values, so this pipeline costs what SD 1.5 costs (UNet ~860M parameters, VAE ~84M, CLIP ViT-L/14 text
encoder ~123M) without any download. The configs in ``benchmarks/sd15_random/`` are SD 1.5's published
``config.json`` values (stable-diffusion-v1-5, subfolders unet, vae, text_encoder, scheduler), laid out as
on the hub. The tokenizer is the demo model's word-level one padded to CLIP's 77 tokens (same sequence
length, so the same cost); the scheduler is DDIM from SD's scheduler config, as the app samples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sega.demo.shapes import build_tokenizer
from sega.pipeline import SegaPipeline

CONFIG_DIR = Path(__file__).resolve().parent / "sd15_random"
MODEL_NAME = "sd15-random"
TOKENS = 77  # CLIP's context length, which sets the cross-attention cost



@contextlib.contextmanager
def built_in(dtype: torch.dtype, device: str | torch.device, seed: int) -> Iterator[None]:
    """Modules created inside are created on ``device`` in ``dtype`` directly, with weights seeded by ``seed``."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def sd15_components(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """SD 1.5's components with random weights, as keyword arguments for a pipeline.

    The modules are created on ``device`` in ``dtype`` directly (diffusers' and transformers' own
    initialisation, run there), so fp16 on a GPU never holds an fp32 copy and a CPU build of half precision
    needs half the memory.

    Args:
        dtype: the weights' dtype (float32 on a CPU; float16 on CUDA, as the app serves SD).
        device: where the weights are created.
        seed: seeds the random weights (the cost does not depend on it).
    """
    with built_in(dtype, device, seed):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG_DIR, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG_DIR, subfolder="vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(CONFIG_DIR / "text_encoder"))
    scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(CONFIG_DIR, subfolder="scheduler"))
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": build_tokenizer(max_length=TOKENS), "unet": unet,
            "scheduler": scheduler}


def sd15_pipeline(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0) -> SegaPipeline:
    """A :class:`SegaPipeline` on :func:`sd15_components` (no safety checker). Its images are noise."""
    return SegaPipeline(**sd15_components(dtype, device, seed), safety_checker=None, feature_extractor=None)
