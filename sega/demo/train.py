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


def _cosine(progress: float, floor: float) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


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
    decoder_steps: int = 0,
    caption_mix: str = "partial",
    warmup_steps: int = 100,
    lr_floor: float = 0.1,
    work_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    max_seconds: float | None = None,
    max_cpu_seconds: float | None = None,
    prior_seconds: float = 0.0,
) -> Path:
    """Train the demo model: the VAE (or only its decoder), then UNet and text encoder jointly.

    Args:
        out: folder for the finished model (diffusers layout, float16 safetensors when ``save_fp16``).
        vae_steps: steps of VAE training from scratch (0 keeps the VAE of ``init_from``).
        unet_steps: steps of UNet and text encoder training; fewer when ``max_seconds`` runs out first.
        batch_size: images per UNet step (the VAE stages use half).
        lr: peak learning rate of the UNet stage (linear warmup over ``warmup_steps``, cosine to
            ``lr_floor`` times it, following the larger of step and time progress).
        init_from: continue from a saved model: its VAE, UNet, text encoder and tokenizer.
        decoder_steps: steps of fine-tuning the VAE decoder alone (encoder frozen, so the latent space and
            the UNet stay valid) on slightly noisy latents, so that it decodes generated latents to flat colours.
        caption_mix: ``"partial"`` or ``"edit"``, see ``sega.demo.shapes.CAPTION_MIXES``.
        work_dir: resumable state (a checkpoint every ``checkpoint_every`` steps, outside git); a run started
            again with the same ``work_dir`` continues from its last checkpoint.
        max_seconds: the wall-clock budget of this run, resumed segments included; the UNet stage's schedule
            ends when it (or ``max_cpu_seconds``) runs out.
        max_cpu_seconds: the budget in CPU seconds of this process, all threads (2 cores busy for a minute
            are 120 CPU seconds): on a shared machine the wall clock says little about the compute spent.
        prior_seconds: training time already spent on ``init_from``, for the record in training.json.
    """
    import copy
    import os

    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from ..pipeline import SegaPipeline

    out = Path(out)
    work = Path(work_dir) if work_dir is not None else None
    state_path = work / "state.pt" if work is not None else None
    rng = np.random.default_rng(seed)
    parts = build_components(seed)
    if init_from is not None:
        loaded = SegaPipeline.from_pretrained(init_from, dtype=torch.float32)
        parts.update(vae=loaded.vae, unet=loaded.unet.train(), text_encoder=loaded.text_encoder.train(),
                     tokenizer=loaded.tokenizer)
    vae, unet, text_encoder, tokenizer = parts["vae"], parts["unet"], parts["text_encoder"], parts["tokenizer"]
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    unet_opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    done = {"vae": 0, "decoder": 0, "unet": 0}
    elapsed0, unet_t0, cpu0, unet_cpu0 = 0.0, None, 0.0, None
    if state_path is not None and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        for name, module in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder), ("ema_unet", ema_unet),
                             ("ema_text", ema_text)):
            module.load_state_dict(state[name])
        if "vae_scaling_factor" in state:
            vae.register_to_config(scaling_factor=state["vae_scaling_factor"])
        unet_opt.load_state_dict(state["unet_opt"])
        rng.bit_generator.state = state["rng"]
        gen.set_state(state["gen"])
        done, elapsed0, unet_t0 = state["done"], state["elapsed"], state["unet_t0"]
        cpu0, unet_cpu0 = state.get("cpu", 0.0), state.get("unet_cpu0")
        print(f"resumed from {state_path}: {done} after {elapsed0:.0f}s", flush=True)
    t0 = time.time() - elapsed0
    cpu_start = time.process_time() - cpu0

    def cpu() -> float:
        return time.process_time() - cpu_start

    def checkpoint(stage_opt=None) -> None:
        if state_path is None:
            return
        work.mkdir(parents=True, exist_ok=True)
        state = {"vae": vae.state_dict(), "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                 "ema_unet": ema_unet.state_dict(), "ema_text": ema_text.state_dict(),
                 "unet_opt": unet_opt.state_dict(), "rng": rng.bit_generator.state, "gen": gen.get_state(),
                 "done": dict(done), "elapsed": time.time() - t0, "unet_t0": unet_t0,
                 "cpu": cpu(), "unet_cpu0": unet_cpu0,
                 "vae_scaling_factor": vae.config.scaling_factor}
        torch.save(state, state_path.with_suffix(".tmp"))
        os.replace(state_path.with_suffix(".tmp"), state_path)  # never a half-written checkpoint

    # 1. VAE: reconstruction plus a small KL term keeps the latent space smooth for diffusion. An interrupted
    # VAE stage restarts from its beginning (it is short); the UNet stage resumes at its last checkpoint.
    if done["vae"] < vae_steps:
        opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
        for step in range(vae_steps):
            for g in opt.param_groups:
                g["lr"] = 2e-3 * _cosine(step / vae_steps, 0.05)
            images, _ = sample_batch(rng, batch_size // 2)
            x = torch.from_numpy(images)
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
            # L1 on top of MSE keeps the flat colours and the shape edges sharp.
            loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % log_every == 0 or step == vae_steps - 1:
                print(f"vae step {step:5d} loss {loss.item():.5f} ({time.time() - t0:.0f}s)", flush=True)
        with torch.no_grad():
            batches = [torch.from_numpy(sample_batch(rng, 256)[0]) for _ in range(4)]
            lat = torch.cat([vae.encode(b).latent_dist.sample() for b in batches])
        vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
        done["vae"] = vae_steps
        checkpoint()
    print(f"vae scaling_factor {vae.config.scaling_factor:.4f}", flush=True)

    # 1b. Decoder only: generated latents are a little off the encoder's, which shows as tinted fringes; noise
    # on the latents teaches the decoder to snap them to flat colours. The encoder (the latent space) is kept.
    if done["decoder"] < decoder_steps:
        vae.requires_grad_(False)
        decoder = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
        for p in decoder:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(decoder, lr=5e-4)
        for step in range(decoder_steps):
            for g in opt.param_groups:
                g["lr"] = 5e-4 * min(1.0, (step + 1) / 20) * _cosine(step / decoder_steps, 0.05)
            images, _ = sample_batch(rng, batch_size // 2)
            x = torch.from_numpy(images)
            with torch.no_grad():
                z = vae.encode(x).latent_dist.sample(gen)
                sigma = 0.15 * torch.rand((z.shape[0], 1, 1, 1), generator=gen) * z.std()
                z = z + sigma * torch.randn(z.shape, generator=gen)
            recon = vae.decode(z).sample
            loss = 0.5 * F.mse_loss(recon, x) + F.l1_loss(recon, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % log_every == 0 or step == decoder_steps - 1:
                print(f"decoder step {step:5d} loss {loss.item():.5f} ({time.time() - t0:.0f}s)", flush=True)
        done["decoder"] = decoder_steps
        checkpoint()
    vae.eval().requires_grad_(False)

    # 2. UNet and text encoder, epsilon prediction on the SD noise schedule.
    noise_scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    alphas_cumprod = noise_scheduler.alphas_cumprod
    if unet_t0 is None:
        unet_t0, unet_cpu0 = time.time() - t0, cpu()
    budget = None if max_seconds is None else max(1.0, max_seconds - unet_t0)
    cpu_budget = None if max_cpu_seconds is None else max(1.0, max_cpu_seconds - unet_cpu0)

    def save(path: Path) -> None:
        pipe = SegaPipeline(
            vae=vae, text_encoder=ema_text, tokenizer=tokenizer, unet=ema_unet, scheduler=parts["scheduler"]
        )
        if save_fp16:
            pipe = pipe.to(torch.float16)
        pipe.save_pretrained(path, safe_serialization=True)
        pipe.to(torch.float32)

    step = done["unet"]
    while step < unet_steps:
        progress = step / unet_steps
        if budget is not None:
            progress = max(progress, (time.time() - t0 - unet_t0) / budget)
        if cpu_budget is not None:
            progress = max(progress, (cpu() - unet_cpu0) / cpu_budget)
        if progress >= 1.0:
            print(f"time budget reached after {step} of {unet_steps} UNet steps", flush=True)
            break
        for g in unet_opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup_steps) * _cosine(progress, lr_floor)
        images, captions = sample_batch(rng, batch_size, caption_mix=caption_mix)
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
        unet_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        unet_opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, model in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - decay)
        if step % log_every == 0 or step == unet_steps - 1:
            print(f"unet step {step:5d} loss {loss.item():.5f} lr {unet_opt.param_groups[0]['lr']:.2e} "
                  f"({time.time() - t0:.0f}s, cpu {cpu():.0f}s)", flush=True)
        step += 1
        done["unet"] = step
        if checkpoint_every and step % checkpoint_every == 0:
            checkpoint()
        if save_every and step % save_every == 0:
            save(out)
            print(f"saved model at step {step}", flush=True)
    checkpoint()
    save(out)
    info = {"seed": seed, "init_from": None if init_from is None else str(init_from), "vae_steps": vae_steps,
            "decoder_steps": decoder_steps, "unet_steps": step, "unet_steps_planned": unet_steps,
            "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps, "lr_floor": lr_floor,
            "caption_mix": caption_mix, "min_snr_gamma": min_snr_gamma, "ema_decay": ema_decay,
            "train_seconds": round(time.time() - t0), "train_cpu_seconds": round(cpu()),
            "prior_seconds": round(prior_seconds),
            "torch_threads": torch.get_num_threads()}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"done in {time.time() - t0:.0f}s -> {out}", flush=True)
    return out
