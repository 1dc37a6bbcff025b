"""Benchmark at FLUX.1's width with random weights: SegaFluxPipeline with concepts next to diffusers' FluxPipeline.

    python -m benchmarks.flux                                   # CPU: float32, 256x256, 4 steps, 128 T5 tokens
    python -m benchmarks.flux --size 512 --steps 8 --tokens 512 --repeats 3
    python -m benchmarks.flux --device cuda --double-blocks 19 --single-blocks 38 --dtype bfloat16   # full depth

The transformer is FLUX.1 [dev]'s at full width (hidden size 3072 = 24 heads x 128, T5 context 4096, pooled
768, 64 packed latent features, guidance embedding) but, by default, only 1 double-stream and 1 single-stream
block of the real 19 and 38, so that it fits and runs on a small CPU machine (~0.5 B parameters, 2 GB in
float32). A sample's cost is about linear in the number of blocks, so the ratios below hold at full depth.
The text encoders are one-layer stand-ins of the real widths (CLIP 768, T5 4096) and the VAE a tiny one with
FLUX's 16 latent channels and 8x downsampling; the images are noise (``output_type="latent"``: no decoding),
only the denoising cost is real. Every text is padded to ``--tokens`` T5 tokens (FLUX [dev] uses 512).

Prints, in one run on the same components, repeats alternating which side goes first:
  the plain image (FluxPipeline, no concepts) and the edited image (SegaFluxPipeline, k concepts, warmup 0):
  seconds, CPU seconds, transformer calls and samples, samples per step, seconds per step, and the ratio
  edited / plain (target: k = 2 costs <= 3.0 times the plain image: 1 + k samples per step in one call).
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import date

import psutil
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from sega.concepts import EditConcept
from sega.demo.shapes import build_tokenizer
from sega.pipeline_flux import SegaFluxPipeline

from .sd15 import built_in
from .speed import DTYPES

PROMPT = "a large red circle on white background"
CONCEPTS = ["blue square", "black background", "small yellow triangle", "green circle"]
RATIO_TARGET = 3.0  # edited with 2 concepts / plain


def flux_components(double_blocks: int = 1, single_blocks: int = 1, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """FLUX.1 [dev]-width components with random weights and ``double_blocks`` + ``single_blocks`` blocks."""
    with built_in(dtype, device, seed):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=double_blocks, num_single_layers=single_blocks,
            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
            guidance_embeds=True, axes_dims_rope=(16, 56, 56),
        )
        tokenizer, tokenizer_2 = build_tokenizer(max_length=77), build_tokenizer(max_length=512)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=256, num_hidden_layers=1,
            num_attention_heads=12, max_position_embeddings=77, pad_token_id=0, bos_token_id=2, eos_token_id=3))
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=4096, d_ff=256, d_kv=64, num_heads=8, num_layers=1,
            pad_token_id=0, eos_token_id=3, decoder_start_token_id=0))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=8, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
            use_post_quant_conv=False)
    for module in (transformer, text_encoder, text_encoder_2, vae):
        module.eval().requires_grad_(False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return {"scheduler": scheduler, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2, "transformer": transformer}


class TransformerCounter:
    """Counts the transformer's calls and samples (batch rows), and the seconds spent in it."""

    def __init__(self, transformer, device: torch.device):
        self.device = device
        self.calls = self.samples = 0
        self.seconds = 0.0
        forward = transformer.forward

        def counted(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            out = forward(*args, **kwargs)
            self.sync()
            self.seconds += time.perf_counter() - start
            self.calls += 1
            self.samples += kwargs["hidden_states"].shape[0]
            return out

        transformer.forward = counted

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset(self) -> None:
        self.calls = self.samples = 0
        self.seconds = 0.0


def measure(sides: dict, counter: TransformerCounter, repeats: int) -> dict:
    """Each side's callable ``repeats`` times, alternating which goes first: medians and counts per side."""
    times = {name: {"seconds": [], "cpu_seconds": [], "transformer_seconds": []} for name in sides}
    counts = {}
    names = list(sides)
    for k in range(repeats):
        for name in names if k % 2 == 0 else names[::-1]:
            counter.reset()
            counter.sync()
            wall, cpu = time.perf_counter(), time.process_time()
            sides[name]()
            counter.sync()
            times[name]["seconds"].append(time.perf_counter() - wall)
            times[name]["cpu_seconds"].append(time.process_time() - cpu)
            times[name]["transformer_seconds"].append(counter.seconds)
            counts[name] = (counter.calls, counter.samples)
    return {name: {**{key: statistics.median(values) for key, values in times[name].items()},
                   "calls": counts[name][0], "samples": counts[name][1]} for name in names}


def compare(ours: SegaFluxPipeline, counter: TransformerCounter, size: int, steps: int, tokens: int,
            concepts: int, repeats: int) -> dict:
    """Runs the plain image and the edited one, prints the table; returns the measurements (for tests)."""
    reference = FluxPipeline(**{name: getattr(ours, name) for name in (
        "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")})
    reference.set_progress_bar_config(disable=True)
    common = dict(prompt=PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=3.5,
                  max_sequence_length=tokens, output_type="latent")
    edits = [EditConcept(CONCEPTS[i % len(CONCEPTS)], scale=5.0, threshold=0.9, warmup=0) for i in range(concepts)]

    def seed():
        return torch.Generator("cpu").manual_seed(0)

    sides = {"plain (FluxPipeline)": lambda: reference(**common, generator=seed()),
             f"{concepts} concepts (ours)": lambda: ours(**common, generator=seed(), concepts=edits)}
    # Warm-up: one step of each, not timed (allocator, kernels).
    for side in (reference, ours):
        side(**{**common, "num_inference_steps": 1}, generator=seed())
    results = measure(sides, counter, repeats)

    print("\n| case | seconds | CPU s | transformer calls | samples | samples / step | s / step "
          "| transformer s / step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in results.items():
        print(f"| {name} | {m['seconds']:.2f} | {m['cpu_seconds']:.2f} | {m['calls']} | {m['samples']} | "
              f"{m['samples'] / steps:.1f} | {m['seconds'] / steps:.2f} | {m['transformer_seconds'] / steps:.2f} |")
    plain, edited = results.values()
    ratio, cpu_ratio = edited["seconds"] / plain["seconds"], edited["cpu_seconds"] / plain["cpu_seconds"]
    results["ratio"], results["cpu_ratio"] = ratio, cpu_ratio
    print(f"\nedited / plain: {ratio:.2f} (CPU time {cpu_ratio:.2f}); samples per step {edited['samples'] / steps:.1f} "
          f"in {edited['calls'] / steps:.1f} call(s) per step (1 + {concepts} = {1 + concepts})")
    if concepts == 2:
        print(f"target <= {RATIO_TARGET}: {'meets' if ratio <= RATIO_TARGET else 'MISSES'}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flux", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--size", type=int, default=256, help="image size in px, a multiple of 16 (default 256)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    parser.add_argument("--tokens", type=int, default=128, help="T5 tokens per text, <= 512 (default 128)")
    parser.add_argument("--concepts", type=int, default=2, help="edit concepts (default 2)")
    parser.add_argument("--repeats", type=int, default=1, help="median of this many runs per side (default 1)")
    parser.add_argument("--double-blocks", type=int, default=1, help="double-stream blocks (FLUX.1: 19)")
    parser.add_argument("--single-blocks", type=int, default=1, help="single-stream blocks (FLUX.1: 38)")
    args = parser.parse_args(argv)
    if args.size < 16 or args.size % 16:
        parser.error(f"--size must be a positive multiple of 16, got {args.size}")
    for name in ("steps", "concepts", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if not 1 <= args.tokens <= 512:
        parser.error(f"--tokens must be in [1, 512], got {args.tokens}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ours = SegaFluxPipeline(**flux_components(args.double_blocks, args.single_blocks, DTYPES[args.dtype], device))
    ours.set_progress_bar_config(disable=True)
    params = sum(p.numel() for p in ours.transformer.parameters())
    print(f"FLUX.1 [dev] width, random weights: transformer {args.double_blocks} double + {args.single_blocks} "
          f"single blocks ({params:,} params; the real one has 19 + 38)")
    machine = (torch.cuda.get_device_name() if device.type == "cuda"
               else f"CPU, {psutil.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"{date.today()}  {machine}  dtype {args.dtype}  {args.size}x{args.size} px "
          f"({(args.size // 16) ** 2} image tokens)  {args.tokens} T5 tokens  {args.steps} steps  "
          f"repeats {args.repeats} (median)")
    compare(ours, TransformerCounter(ours.transformer, device), args.size, args.steps, args.tokens,
            args.concepts, args.repeats)


if __name__ == "__main__":
    main()
