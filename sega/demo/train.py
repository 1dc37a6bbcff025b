"""Training of the bundled demo model: untrained components in Stable Diffusion layout, then VAE and UNet.

    python -m sega.demo train --out assets/shapes-model
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from .shapes import build_tokenizer, sample_batch


def build_components(seed: int = 0, resolution: int = 32):
    """Untrained VAE, UNet, text encoder, tokenizer and scheduler in Stable Diffusion layout."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=resolution,
    )
    unet = UNet2DConditionModel(
        sample_size=resolution // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        # The caption's attributes are global, so cross-attention at 8x8 and 4x4 is enough; leaving it out
        # at 16x16 makes a training step about a third cheaper than attention at 16x16 and 8x8.
        block_out_channels=(48, 96, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def train(
    out: str | Path,
    vae_steps: int = 600,
    unet_steps: int = 2400,
    batch_size: int = 64,
    lr: float = 1e-3,
    min_snr_gamma: float = 5.0,
    seed: int = 0,
    ema_decay: float = 0.995,
    log_every: int = 50,
    save_every: int = 0,
    save_fp16: bool = True,
    init_from: str | Path | None = None,
) -> Path:
    """Train the demo model: first the VAE, then UNet and text encoder jointly.

    ``init_from`` continues from a saved model (its VAE is kept; set ``vae_steps=0``).
    """
    import copy

    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from ..pipeline import SegaPipeline

    out = Path(out)
    rng = np.random.default_rng(seed)
    parts = build_components(seed)
    if init_from is not None:
        loaded = SegaPipeline.from_pretrained(init_from, torch_dtype=torch.float32)
        parts.update(vae=loaded.vae, unet=loaded.unet.train(), text_encoder=loaded.text_encoder.train(),
                     tokenizer=loaded.tokenizer)
    vae, unet, text_encoder, tokenizer = parts["vae"], parts["unet"], parts["text_encoder"], parts["tokenizer"]
    t0 = time.time()

    # 1. VAE: reconstruction plus a small KL term keeps the latent space smooth for diffusion.
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    vae_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / vae_steps)))
    for step in range(vae_steps):
        images, _ = sample_batch(rng, batch_size // 2)
        x = torch.from_numpy(images)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # L1 on top of MSE keeps the flat colours and the shape edges sharp.
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        vae_sched.step()
        if step % log_every == 0 or step == vae_steps - 1:
            print(f"vae step {step:5d} loss {loss.item():.5f} ({time.time() - t0:.0f}s)", flush=True)
    vae.eval().requires_grad_(False)
    if vae_steps:
        with torch.no_grad():
            batches = [torch.from_numpy(sample_batch(rng, 256)[0]) for _ in range(4)]
            lat = torch.cat([vae.encode(b).latent_dist.sample() for b in batches])
        vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    print(f"vae scaling_factor {vae.config.scaling_factor:.4f}", flush=True)

    # 2. UNet and text encoder, epsilon prediction on the SD noise schedule.
    noise_scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    alphas_cumprod = noise_scheduler.alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / unet_steps)))
    )
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)

    def save(path: Path) -> None:
        pipe = SegaPipeline(
            vae=vae, text_encoder=ema_text, tokenizer=tokenizer, unet=ema_unet, scheduler=parts["scheduler"]
        )
        if save_fp16:
            pipe = pipe.to(torch.float16)
        pipe.save_pretrained(path, safe_serialization=True)
        pipe.to(torch.float32)

    for step in range(unet_steps):
        images, captions = sample_batch(rng, batch_size)
        with torch.no_grad():
            latents = vae.encode(torch.from_numpy(images)).latent_dist.sample(gen) * vae.config.scaling_factor
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        # Min-SNR weighting (Hang et al. 2023): stops the easy low-noise steps from dominating the loss.
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        weight = snr.clamp(max=min_snr_gamma) / snr
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, model in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - decay)
        if step % log_every == 0 or step == unet_steps - 1:
            print(f"unet step {step:5d} loss {loss.item():.5f} ({time.time() - t0:.0f}s)", flush=True)
        if save_every and step and step % save_every == 0:
            save(out)
            print(f"saved checkpoint at step {step}", flush=True)
    save(out)
    info = {"seed": seed, "init_from": None if init_from is None else str(init_from), "vae_steps": vae_steps, "unet_steps": unet_steps, "batch_size": batch_size, "lr": lr,
            "min_snr_gamma": min_snr_gamma,
            "ema_decay": ema_decay, "train_seconds": round(time.time() - t0), "torch_threads": torch.get_num_threads()}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"done in {time.time() - t0:.0f}s -> {out}", flush=True)
    return out
