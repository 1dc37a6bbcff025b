"""Benchmark at SDXL's real scale with random weights: SegaXLPipeline next to diffusers' StableDiffusionXLPipeline.

    python -m benchmarks.sdxl                                    # CPU: bfloat16, 128x128, 2 steps
    python -m benchmarks.sdxl --device cuda                      # GPU: float16, 1024x1024, 50 steps
    python -m benchmarks.sdxl --device cuda --concepts 1,2,4 --repeats 3 [--compile]

Stable Diffusion XL base 1.0's architecture, built offline from ``benchmarks/sdxl_random/`` (its published
``config.json`` values: UNet 2,567,463,684 parameters, CLIP ViT-L and OpenCLIP bigG text encoders, the SDXL VAE
with ``scaling_factor`` 0.13025 and ``force_upcast``, Euler scheduler). The weights are random: the images are
noise, only the cost is real (a network's time and memory do not depend on its weight values). The tokenizers
are the demo model's word-level one padded to CLIP's 77 tokens (the same sequence length, so the same cost).

Prints, in one run on the same components:
  (1) no concepts: ours against StableDiffusionXLPipeline (same seed, size, steps): seconds, UNet calls and
      samples, peak memory, and the ratio ours / reference (target <= 1.02);
  (2) with k concepts (each of --concepts, warmup 0): UNet samples per step, which must be exactly 2 + k (one
      batched call: unconditional, prompt, one per concept), seconds and ms per UNet sample;
  and the seconds per UNet sample at 1024x1024 equivalent (by area) that a GPU duration estimate can use.
Peak memory: CUDA max allocated above the level before the call, or the process's RSS above it on a CPU.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import psutil
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sega.concepts import EditConcept
from sega.demo.shapes import build_tokenizer
from sega.pipeline_xl import SegaXLPipeline

from .sd15 import built_in
from .speed import DTYPES, Counters, Timing, measure_interleaved

CONFIG_DIR = Path(__file__).resolve().parent / "sdxl_random"
MODEL_NAME = "sdxl-random"
TOKENS = 77  # CLIP's context length, which sets the cross-attention cost
CONCEPTS = ["smiling, smile", "glasses, wearing glasses", "curls, wavy hair, curly hair", "beard, full beard"]
RATIO_TARGET = 1.02
NATIVE = 1024


def sdxl_components(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """SDXL base 1.0's components with random weights, as keyword arguments for a pipeline.

    Created on ``device`` in ``dtype`` directly (as benchmarks/sd15.py does): a float16 GPU build never holds a
    float32 copy; ``device="meta"`` builds the architecture without allocating any weights.
    """
    with built_in(dtype, device, seed):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG_DIR, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG_DIR, subfolder="vae"))
        # The configs say float16 (as published); transformers then casts some activations to it, so the
        # config's dtype must be the one the weights are built in.
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(CONFIG_DIR / "text_encoder", dtype=dtype))
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(CONFIG_DIR / "text_encoder_2", dtype=dtype))
    scheduler = EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(CONFIG_DIR, subfolder="scheduler"))
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval().requires_grad_(False)
    return {"vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": build_tokenizer(max_length=TOKENS), "tokenizer_2": build_tokenizer(max_length=TOKENS),
            "unet": unet, "scheduler": scheduler}


def sdxl_pipeline(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0) -> SegaXLPipeline:
    """A :class:`SegaXLPipeline` on :func:`sdxl_components`. Its images are noise."""
    return SegaXLPipeline(**sdxl_components(dtype, device, seed), add_watermarker=False)


def parameter_counts(components: dict) -> dict[str, int]:
    return {name: sum(p.numel() for p in components[name].parameters())
            for name in ("unet", "vae", "text_encoder", "text_encoder_2")}


def compare(ours: SegaXLPipeline, device: torch.device, size: int, steps: int, concepts: list[int], repeats: int,
            counters: Counters) -> dict:
    """Runs the cases and prints the table; returns the measurements (for tests)."""
    ref = StableDiffusionXLPipeline(vae=ours.vae, text_encoder=ours.text_encoder, text_encoder_2=ours.text_encoder_2,
                                    tokenizer=ours.tokenizer, tokenizer_2=ours.tokenizer_2, unet=ours.unet,
                                    scheduler=ours.scheduler, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    common = dict(prompt="a photo of the face of a woman", height=size, width=size, num_inference_steps=steps,
                  guidance_scale=5.0, output_type="pil")

    def gen():
        return torch.Generator("cpu").manual_seed(0)

    # Warm-up: one short call of each (kernels, allocator), not timed.
    ref(**{**common, "num_inference_steps": 1}, generator=gen())
    ours(**{**common, "num_inference_steps": 1}, generator=gen())

    results = {}
    # Interleaved (alternating which goes first), so that a slow spell of a shared machine hits both.
    r, o = measure_interleaved(lambda: ref(**common, generator=gen()),
                               lambda: ours(**common, generator=gen()), device, repeats, counters)
    results["plain"] = (r, o)
    print(f"  done: no concepts, reference {r['seconds']:.2f} s, ours {o['seconds']:.2f} s", flush=True)
    for k in concepts:
        edits = [EditConcept(CONCEPTS[i % len(CONCEPTS)], scale=5.0, threshold=0.95, warmup=0) for i in range(k)]
        timing = Timing()
        for _ in range(repeats):
            timing.run(lambda edits=edits: ours(**common, generator=gen(), concepts=edits,
                                                edit_momentum_scale=0.3, edit_mom_beta=0.6), device, counters)
        results[k] = timing.summary()
        print(f"  done: {k} concept(s), {results[k]['seconds']:.2f} s", flush=True)

    print()
    kind = "CUDA max allocated" if device.type == "cuda" else "CPU RSS"
    print(f"{'case':24s} {'':9s} {'seconds':>8s} {'CPU s':>8s} {'unet calls':>10s} {'samples':>8s} "
          f"{'per step':>8s} {'ms/sample':>9s} {'peak MB':>8s}   (peak: {kind} above the level before the call)")

    def row(label, who, m):
        print(f"{label:24s} {who:9s} {m['seconds']:8.2f} {m['cpu_seconds']:8.2f} {m['unet_calls']:10d} "
              f"{m['unet_samples']:8d} {m['unet_samples'] / steps:8.1f} {m['ms_per_sample']:9.1f} {m['peak_mb']:8.0f}")

    row("no concepts", "reference", r)
    row("no concepts", "ours", o)
    ratio, cpu_ratio = o["seconds"] / r["seconds"], o["cpu_seconds"] / r["cpu_seconds"]
    print(f"{'':24s} {'ratio':9s} {ratio:8.3f} {cpu_ratio:8.3f}   (ours / StableDiffusionXLPipeline: wall, CPU time)")
    for k in concepts:
        row(f"{k} concept(s), warmup 0", "ours", results[k])
    print(f"no concepts: ratio {ratio:.3f} (CPU time {cpu_ratio:.3f})  "
          f"{'meets' if ratio <= RATIO_TARGET else 'MISSES'} <= {RATIO_TARGET}")
    for k in concepts:
        m = results[k]
        exact = m["unet_calls"] == steps and m["unet_samples"] == (2 + k) * steps
        print(f"{k} concept(s): {m['unet_samples'] / steps:.1f} UNet samples per step in {m['unet_calls'] / steps:.1f} "
              f"call(s)  {'exactly' if exact else 'NOT'} 2 + {k}")
    worst = max(m["ms_per_sample"] for m in (o, *(results[k] for k in concepts)))
    per_native = worst / 1000 * (NATIVE / size) ** 2
    print(f"per UNet sample: {worst:.1f} ms at {size}x{size} (worst case), {per_native:.3f} s per {NATIVE}x{NATIVE} "
          "sample by area")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sdxl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default float16 on CUDA (as SDXL is served), bfloat16 on a CPU (half the memory)")
    parser.add_argument("--size", type=int, default=None, help="image size in px (default 1024 on CUDA, 128 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="default 50 on CUDA, 2 on a CPU")
    parser.add_argument("--concepts", default="1,2", help="comma-separated concept counts (default 1,2)")
    parser.add_argument("--repeats", type=int, default=None, help="median of this many runs (default 3 on CUDA, 1 CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if cuda else torch.bfloat16)
    size = (NATIVE if cuda else 128) if args.size is None else args.size
    steps = (50 if cuda else 2) if args.steps is None else args.steps
    repeats = (3 if cuda else 1) if args.repeats is None else args.repeats
    if size < 8 or size % 8:
        parser.error(f"--size must be a positive multiple of 8, got {size}")
    if steps < 1:
        parser.error(f"--steps must be >= 1, got {steps}")
    if repeats < 1:
        parser.error(f"--repeats must be >= 1, got {repeats}")
    try:
        concepts = [int(n) for n in args.concepts.split(",")]
    except ValueError:
        parser.error(f"--concepts must be comma-separated integers, got {args.concepts!r}")
    if any(n < 1 for n in concepts):
        parser.error(f"--concepts: each count must be >= 1, got {concepts}")

    rss0 = psutil.Process().memory_info().rss
    ours = sdxl_pipeline(dtype, device)
    ours.set_progress_bar_config(disable=True)
    gc.collect()
    params = parameter_counts(ours.components)
    held = (torch.cuda.memory_allocated() if cuda else psutil.Process().memory_info().rss - rss0) / 2**20
    print(f"{MODEL_NAME}: SDXL base 1.0's architecture with random weights (images are noise; only the cost is real): "
          + ", ".join(f"{k} {v:,} params" for k, v in params.items()))
    print(f"device: {device}  dtype: {str(dtype).removeprefix('torch.')}  size: {size}x{size}  steps: {steps}  "
          f"repeats: {repeats} (median)  torch.compile: {args.compile}  weights held: {held:.0f} MB")
    if cuda:
        print(f"gpu: {torch.cuda.get_device_name()}")
    else:
        print(f"cpu: {psutil.cpu_count()} cores, torch threads {torch.get_num_threads()}, load average "
              f"{' '.join(f'{x:.1f}' for x in psutil.getloadavg())}")
    counters = Counters(device)
    forward = torch.compile(ours.unet.forward, dynamic=False) if args.compile else ours.unet.forward
    ours.unet.forward = counters.wrap(forward, "unet")
    sched_cls = type(ours.scheduler)
    sched_cls.step = counters.wrap(sched_cls.step, "scheduler")
    compare(ours, device, size, steps, concepts, repeats, counters)


if __name__ == "__main__":
    main()
