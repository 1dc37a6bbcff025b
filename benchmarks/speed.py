"""Benchmark: SegaPipeline next to diffusers' deprecated SemanticStableDiffusionPipeline, in one run.

    python -m benchmarks.speed                      # bundled demo model on CPU (fp32)
    python -m benchmarks.speed --model stable-diffusion-v1-5/stable-diffusion-v1-5   # fp16 on CUDA

Both pipelines share the same components, seed and settings. Prints seconds (median of --repeats),
UNet evaluations (calls and samples), peak memory, and the ratio ours/reference for:
  (a) one edited image with 4 concepts;
  (b) the original + edited pair (1 concept, warmup 10 of 50) against two reference calls (plain + SEGA);
  (c) a re-edit of 1 concept (warmup 10 of 50) with the cache warm, against the same two reference calls;
and the share of a denoising step's time spent outside the UNet and the scheduler.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager

import psutil
import torch

from sega.concepts import EditConcept
from sega.pipeline import SegaPipeline

FACE_CONCEPTS = ["smiling, smile", "glasses, wearing glasses", "curls, wavy hair, curly hair", "beard, full beard"]
SHAPE_CONCEPTS = ["blue", "red", "square", "black background"]


class Counters:
    """Counts UNet calls/samples and times the UNet and scheduler.step (synchronising on CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.unet_calls = self.unet_samples = 0
        self.unet_s = self.sched_s = 0.0
        self.first = self.last = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def wrap(self, fn: Callable, kind: str) -> Callable:
        @functools.wraps(fn)  # keeps the signature, which pipelines inspect for eta/generator
        def timed(*args, **kwargs):
            self.sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            t1 = time.perf_counter()
            if kind == "unet":
                self.unet_calls += 1
                self.unet_samples += args[0].shape[0]
                self.unet_s += t1 - t0
                self.first = t0 if self.first is None else self.first
            else:
                self.sched_s += t1 - t0
                self.last = t1
            return out
        return timed


@contextmanager
def peak_memory(device: torch.device):
    """Peak memory during the block: CUDA allocator peak, or the process's peak RSS above the start."""
    result = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield result
        result["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return
    proc, stop, peak = psutil.Process(), threading.Event(), [0]
    base = proc.memory_info().rss

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss - base)
            time.sleep(0.002)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    yield result
    stop.set()
    th.join()
    result["peak_mb"] = peak[0] / 2**20


def measure(fn: Callable[[], object], device: torch.device, repeats: int, counters: Counters) -> dict:
    times, mem = [], 0.0
    for _ in range(repeats):
        counters.reset()
        with peak_memory(device) as m:
            counters.sync()
            t0 = time.perf_counter()
            fn()
            counters.sync()
            times.append(time.perf_counter() - t0)
        mem = max(mem, m["peak_mb"])
    return {"seconds": statistics.median(times), "unet_calls": counters.unet_calls,
            "unet_samples": counters.unet_samples, "peak_mb": mem}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or folder (default: the bundled demo model)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    from sega.demo.shapes import DEFAULT_MODEL_DIR

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = args.model or str(DEFAULT_MODEL_DIR)
    ours = SegaPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None, feature_extractor=None).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers.pipelines.deprecated.semantic_stable_diffusion.pipeline_semantic_stable_diffusion import (
            SemanticStableDiffusionPipeline,
        )
    ref = SemanticStableDiffusionPipeline(vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer,
                                          unet=ours.unet, scheduler=ours.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    counters = Counters(device)
    ours.unet.forward = counters.wrap(ours.unet.forward, "unet")
    sched_cls = type(ours.scheduler)
    sched_cls.step = counters.wrap(sched_cls.step, "scheduler")

    demo = args.model is None
    prompt = "a small red circle on a white background" if demo else "a photo of the face of a woman"
    texts = SHAPE_CONCEPTS if demo else FACE_CONCEPTS
    steps = args.steps
    common = dict(prompt=prompt, num_inference_steps=steps, guidance_scale=7.0, edit_momentum_scale=0.3,
                  edit_mom_beta=0.6, output_type="pil")

    def gen():
        return torch.Generator("cpu").manual_seed(0)

    four = dict(editing_prompt=texts, edit_guidance_scale=[5.0, 5.0, 5.0, 5.4], edit_threshold=[0.99, 0.975, 0.925, 0.96],
                edit_warmup_steps=10, reverse_editing_direction=[False, True, False, False])
    one = dict(editing_prompt=[texts[0]], edit_guidance_scale=5.0, edit_threshold=0.95, edit_warmup_steps=10)
    other = [EditConcept(texts[2], scale=5.0, threshold=0.95, warmup=10)]

    def ref_pair():
        ref(**common, generator=gen())
        ref(**common, generator=gen(), **one)

    def ours_reedit():
        ours(**common, generator=gen(), concepts=other, return_original=True)

    ours(**common, generator=gen(), **four)  # warm up kernels and allocator
    ref(**common, generator=gen(), **four)
    rows = []
    rows.append(("(a) 4 concepts, edited image", measure(lambda: ref(**common, generator=gen(), **four), device,
                                                         args.repeats, counters),
                 measure(lambda: ours(**common, generator=gen(), **four, use_cache=False), device, args.repeats,
                         counters)))
    rows.append(("(b) original + edited pair", measure(ref_pair, device, args.repeats, counters),
                 measure(lambda: ours(**common, generator=gen(), **one, return_original=True, use_cache=False),
                         device, args.repeats, counters)))
    ours(**common, generator=gen(), **one, return_original=True)  # warm the re-edit cache
    rows.append(("(c) re-edit, cache warm", measure(ref_pair, device, args.repeats, counters),
                 measure(ours_reedit, device, args.repeats, counters)))

    # Share of a denoising step spent outside the UNet and the scheduler (both pipelines, case (a)).
    shares = {}
    for name, fn in (("reference", lambda: ref(**common, generator=gen(), **four)),
                     ("ours", lambda: ours(**common, generator=gen(), **four, use_cache=False))):
        vals = []
        for _ in range(args.repeats):
            counters.reset()
            fn()
            loop = counters.last - counters.first
            vals.append((loop - counters.unet_s - counters.sched_s) / loop)
        shares[name] = statistics.median(vals)

    print(f"model: {model}  device: {device}  dtype: {dtype}  steps: {steps}  repeats: {args.repeats} (median)")
    if device.type == "cuda":
        print(f"gpu: {torch.cuda.get_device_name()}")
    print(f"{'case':32s} {'':9s} {'seconds':>8s} {'unet calls':>10s} {'samples':>8s} {'peak MB':>8s}")
    for label, r, o in rows:
        for who, m in (("reference", r), ("ours", o)):
            print(f"{label:32s} {who:9s} {m['seconds']:8.3f} {m['unet_calls']:10d} {m['unet_samples']:8d} "
                  f"{m['peak_mb']:8.1f}")
        print(f"{'':32s} {'ratio':9s} {o['seconds'] / r['seconds']:8.3f}   (ours / reference)")
    targets = {"(a)": 1.0, "(b)": 0.95, "(c)": 0.6}
    print("targets on CPU: (a) <= 1.0, (b) <= 0.95, (c) <= 0.6, outside-UNet share <= 3%")
    for label, r, o in rows:
        key = label[:3]
        ratio = o["seconds"] / r["seconds"]
        print(f"  {label:32s} ratio {ratio:.3f}  {'meets' if ratio <= targets[key] else 'MISSES'} <= {targets[key]}")
    print(f"  step time outside UNet and scheduler: ours {shares['ours']:.1%}, reference {shares['reference']:.1%}  "
          f"{'meets' if shares['ours'] <= 0.03 else 'MISSES'} <= 3%")


if __name__ == "__main__":
    main()
