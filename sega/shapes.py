"""The bundled demo model: flat coloured shapes, its training script, attribute reader and evaluation.

Captions follow one grammar, ``a {size} {color} {shape} on a {background} background``. Training also
uses partial captions ("a blue circle", "blue", "on a black background") and empty captions, so that
short SEGA concepts such as ``blue`` or ``black background`` mean something to the model.

Command line::

    python -m sega.shapes train --out assets/shapes-model      # 58 minutes on 2 CPU cores (measured)
    python -m sega.shapes sweep --model assets/shapes-model    # presets per edit kind, on tuning seeds
    python -m sega.shapes eval  --model assets/shapes-model    # prompt accuracy, edit success, IoU
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIZES = ("small", "large")
COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}
SIZE_RANGE = {"small": (0.25, 0.45), "large": (0.55, 0.80)}  # bounding box side / image side
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
VOCAB_WORDS = ("a", "on", "background", *SIZES, *COLORS, *SHAPES, *BACKGROUNDS)
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "shapes-model"


@dataclass(frozen=True)
class ShapeSpec:
    size: str
    color: str
    shape: str
    background: str

    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} on a {self.background} background"


def random_spec(rng: np.random.Generator) -> ShapeSpec:
    return ShapeSpec(
        size=SIZES[rng.integers(len(SIZES))],
        color=list(COLORS)[rng.integers(len(COLORS))],
        shape=SHAPES[rng.integers(len(SHAPES))],
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
    )


def partial_caption(spec: ShapeSpec, keep: dict[str, bool], bare_background: bool = False) -> str:
    """Caption with only the kept attributes: "a blue circle", "large", "on a black background"..."""
    noun = [getattr(spec, k) for k in ("size", "color", "shape") if keep[k]]
    words = []
    if noun:
        words += (["a"] if keep["shape"] else []) + noun
    if keep["background"]:
        if noun or not bare_background:
            words += ["on", "a"]
        words += [spec.background, "background"]
    return " ".join(words)


def training_caption(spec: ShapeSpec, rng: np.random.Generator) -> str:
    """10% empty (for classifier-free guidance), 40% full, 50% partial."""
    u = rng.random()
    if u < 0.10:
        return ""
    if u < 0.50:
        return spec.caption()
    keys = ("size", "color", "shape", "background")
    while True:
        keep = {k: bool(rng.random() < 0.5) for k in keys}
        if 0 < sum(keep.values()) < len(keys):
            break
    return partial_caption(spec, keep, bare_background=bool(rng.random() < 0.5))


def render(spec: ShapeSpec, rng: np.random.Generator, resolution: int = 32, supersample: int = 4) -> np.ndarray:
    """One HxWx3 uint8 image: a flat shape at a random position, anti-aliased by supersampling."""
    n = resolution * supersample
    lo, hi = SIZE_RANGE[spec.size]
    side = rng.uniform(lo, hi) * n
    x0 = rng.uniform(0, n - side)
    y0 = rng.uniform(0, n - side)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    if spec.shape == "square":
        inside = (xx >= x0) & (xx < x0 + side) & (yy >= y0) & (yy < y0 + side)
    elif spec.shape == "circle":
        r = side / 2
        inside = (xx - x0 - r) ** 2 + (yy - y0 - r) ** 2 <= r * r
    else:  # triangle pointing up, base == height == side
        rel_y = (yy - y0) / side  # 0 at apex, 1 at base
        half_width = rel_y * side / 2
        inside = (rel_y >= 0) & (rel_y <= 1) & (np.abs(xx - (x0 + side / 2)) <= half_width)
    fg = np.array(COLORS[spec.color], np.float32)
    bg = np.array(BACKGROUNDS[spec.background], np.float32)
    big = np.where(inside[..., None], fg, bg)
    img = big.reshape(resolution, supersample, resolution, supersample, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def sample_batch(rng: np.random.Generator, batch_size: int, resolution: int = 32):
    """Images in [-1, 1] as a float32 array (B, 3, H, W) and their training captions."""
    specs = [random_spec(rng) for _ in range(batch_size)]
    images = np.stack([render(s, rng, resolution) for s in specs]).astype(np.float32) / 127.5 - 1.0
    captions = [training_caption(s, rng) for s in specs]
    return images.transpose(0, 3, 1, 2), captions


# ----------------------------------------------------------------------------------------------
# Attribute reader (pure numpy)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Description:
    background: str
    color: str | None
    shape: str | None
    size: str | None
    mask: np.ndarray  # bool HxW, the foreground

    def attributes(self) -> dict[str, str | None]:
        return {"size": self.size, "color": self.color, "shape": self.shape, "background": self.background}


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    d = [np.linalg.norm(rgb - np.array(palette[n], np.float32)) for n in names]
    return names[int(np.argmin(d))]


def describe(image) -> Description:
    """Read background, colour, shape and size of a generated image (PIL image or HxWx3 array).

    Background: the palette background nearest to the median border pixel. Colour: the palette colour
    nearest to the median of pixels far (> 80 in RGB distance) from the background. Then a soft
    coverage alpha per pixel (its position between background and colour), so edges count by the share
    of the pixel they cover: width and height are the largest row and column sums of alpha, size is
    large when the larger of them exceeds half the image side, and the shape follows from the area
    over width x height (square 1, circle 0.79, triangle 0.5; cut at 0.9 and 0.7). The mask is alpha > 0.5.
    """
    img = np.asarray(image, dtype=np.float32)[..., :3]
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    background = _nearest(np.median(border, axis=0), BACKGROUNDS)
    bg = np.array(BACKGROUNDS[background], np.float32)
    far = np.linalg.norm(img - bg, axis=-1) > 80
    if far.sum() < max(4, 0.01 * h * w):
        return Description(background, None, None, None, far)
    color = _nearest(np.median(img[far], axis=0), COLORS)
    direction = np.array(COLORS[color], np.float32) - bg
    alpha = np.clip((img - bg) @ direction / float(direction @ direction), 0.0, 1.0)
    alpha[alpha < 0.15] = 0.0  # ignore faint noise far from the shape
    width, height = alpha.sum(axis=1).max(), alpha.sum(axis=0).max()
    size = "large" if max(width, height) / max(h, w) > 0.5 else "small"
    fill = alpha.sum() / max(width * height, 1e-6)
    shape = "square" if fill > 0.9 else "circle" if fill > 0.7 else "triangle"
    return Description(background, color, shape, size, alpha > 0.5)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


# ----------------------------------------------------------------------------------------------
# Model components and training
# ----------------------------------------------------------------------------------------------


def build_tokenizer(max_length: int = 16):
    """A word-level tokenizer over the grammar's words, as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *VOCAB_WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


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

    from .pipeline import SegaPipeline

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sega.shapes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train the demo model from scratch")
    p_train.add_argument("--out", default=str(DEFAULT_MODEL_DIR))
    p_train.add_argument("--vae-steps", type=int, default=600)
    p_train.add_argument("--unet-steps", type=int, default=2400)
    p_train.add_argument("--batch-size", type=int, default=64)
    p_train.add_argument("--lr", type=float, default=1e-3)
    p_train.add_argument("--seed", type=int, default=0)
    p_train.add_argument("--save-every", type=int, default=0)
    p_train.add_argument("--init-from", default=None, help="continue from a saved model (use with --vae-steps 0)")
    p_eval = sub.add_parser("eval", help="prompt accuracy, SEGA edit success and composition IoU")
    p_eval.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p_eval.add_argument("--seeds", type=int, default=24, help="seeds per edit kind")
    p_eval.add_argument("--first-seed", type=int, default=1000, help="evaluation seeds start here (tuning used 0..999)")
    p_sweep = sub.add_parser("sweep", help="choose (scale, threshold, warmup) per edit kind on tuning seeds")
    p_sweep.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p_sweep.add_argument("--seeds", type=int, default=8, help="tuning seeds per setting (from 0)")
    p_sweep.add_argument("--kinds", default="color,background,shape,size", help="comma-separated edit kinds")
    p_sweep.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args(argv)
    if args.command == "sweep":
        from .shapes_eval import load, sweep

        result = sweep(load(args.model), list(range(args.seeds)), kinds=args.kinds.split(","))
        print("best:", json.dumps(result["best"]))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    elif args.command == "train":
        train(args.out, vae_steps=args.vae_steps, unet_steps=args.unet_steps, batch_size=args.batch_size,
              lr=args.lr, seed=args.seed, save_every=args.save_every, init_from=args.init_from)
    else:
        from .shapes_eval import run_eval

        run_eval(args.model, n_seeds=args.seeds, first_seed=args.first_seed)


if __name__ == "__main__":
    main()
