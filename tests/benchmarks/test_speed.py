"""The speed benchmark runs, and its SD-1.5-scale pipeline builds from the repository's configs.

The SD 1.5 test builds the real architecture (UNet ~860M parameters) in float32 (about 4.8 GB peak RSS): on a
CPU, bfloat16 would halve the memory but run its two steps about six times slower (a 64x64 run: 45 s against 8 s
on one thread); the whole test takes about 20 s on one thread.
"""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks import speed
from benchmarks.sd15 import sd15_pipeline
from sega.concepts import EditConcept


def test_demo_benchmark_compares_both_cases(capsys):
    speed.main(["--steps", "3", "--edit-warmup", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    rows = {(m["case"], m["who"]): (int(m["calls"]), int(m["samples"])) for m in re.finditer(
        r"^\((?P<case>[ab])\) .+? (?P<who>reference|ours) +[\d.]+ +[\d.]+ +(?P<calls>\d+) +(?P<samples>\d+) ",
        out, re.M)}
    assert len(rows) == 4, out
    # (a) 4 concepts: the reference evaluates u, p and every concept at every step.
    assert rows["a", "reference"] == (3, 3 * 6)
    assert rows["a", "ours"][1] <= 3 * 6
    # (b) the reference's pair is two calls (plain, then SEGA): 3 * 2 + 3 * 3 samples. Ours is one pass: one
    # call per step, [u, p, concept] at the shared first step, then [plain u, p, edited u, p, concept].
    assert rows["b", "reference"] == (6, 3 * 2 + 3 * 3)
    assert rows["b", "ours"] == (3, 3 + 2 * 5)
    for case, name in speed.TARGET_NAMES.items():
        assert re.search(rf"^  \({case}\) .+ {re.escape(name)} \d+\.\d+ \(CPU time \d+\.\d+\)", out, re.M), out
    # Each case lists both sides' timings, repeat by repeat.
    assert len(re.findall(r"each repeat: reference [\d.]+, ours [\d.]+\)", out)) == 2, out


def test_sd15_random_defaults_to_a_cpu_run_of_reasonable_length_with_both_targets():
    args = speed.parse_args(["--model", "sd15-random"])
    assert (args.size, args.steps, args.concepts, args.cases, args.repeats) == (256, 6, [2], "ab", 3)
    assert speed.TARGETS["a"] == 1.0 and speed.TARGETS["b"] == 0.90
    assert (speed.parse_args([]).size, speed.parse_args([]).steps, speed.parse_args([]).cases) == (None, 50, "ab")


def test_per_sample_prints_the_gpu_duration_constant(capsys):
    speed.main(["--per-sample", "--repeats", "1"])
    out = capsys.readouterr().out
    assert len(re.findall(r"UNet batch \d: +[\d.]+ ms per call", out)) == 4, out
    assert re.search(r"gpu_duration constant \(server/service.py\): \d+\.\d+ s per 512x512 sample", out), out


def test_previews_benchmark_times_the_pair_with_and_without_previews(capsys):
    speed.main(["--previews", "--steps", "4", "--edit-warmup", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "previews per run: 3 (every 1 steps, latent-to-RGB: the demo VAE's fitted map)" in out, out  # steps 1 to 3: not the last one
    assert re.search(r"^time in the previews themselves: \d+\.\d+ ms per run \(\d+\.\d+ % of the pair", out, re.M), out
    assert re.search(r"^previews ratio \d+\.\d+ \(CPU time \d+\.\d+\)  (meets|MISSES) <= 1\.03$", out, re.M), out


def test_bad_arguments_name_the_option(capsys):
    for argv, name in ((["--steps", "0"], "--steps"), (["--concepts", "1,x"], "--concepts"),
                       (["--steps", "5", "--edit-warmup", "5"], "--edit-warmup"), (["--cases", "ax"], "--cases"),
                       (["--size", "30"], "--size")):
        with pytest.raises(SystemExit):
            speed.main(argv)
        assert f"error: {name} must" in capsys.readouterr().err


@pytest.mark.slow
def test_sd15_random_builds_from_the_configs_and_runs_through_sega_pipeline():
    pipe = sd15_pipeline(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    params = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("unet", "vae", "text_encoder")}
    # SD 1.5's published sizes: the configs describe its architecture, not a smaller one.
    assert params == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 768
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings == 77
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 512

    out = pipe("a small red circle on a white background", height=64, width=64, num_inference_steps=2,
               guidance_scale=7.0, concepts=[EditConcept("blue", scale=5.0, threshold=0.95, warmup=1)],
               return_original=True, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == out.original_images.shape == (1, 3, 64, 64)
    assert torch.isfinite(out.images).all() and torch.isfinite(out.original_images).all()
    assert not torch.equal(out.images, out.original_images)  # the concept was applied
    assert out.unet_calls >= 2


def test_masks_case_compares_masked_unmasked_and_ledits_pp(capsys):
    speed.main(["--masks", "--steps", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    rows = {m["who"]: (int(m["calls"]), int(m["samples"])) for m in re.finditer(
        r"^\(m\) masks, 2 concepts +(?P<who>ours, no masks|ours, intersect mask|LEDITS\+\+, intersect mask) +[\d.]+ "
        r"+[\d.]+ +(?P<calls>\d+) +(?P<samples>\d+) ", out, re.M)}
    # Ours evaluates u, p and both concepts per step, with or without masks; LEDITS++ u and the concepts.
    assert rows == {"ours, no masks": (2, 8), "ours, intersect mask": (2, 8), "LEDITS++, intersect mask": (2, 6)}, out
    assert re.search(r"masked / unmasked ratio \d+\.\d+ \(CPU time \d+\.\d+\)  (meets|MISSES) <= 1.15", out), out
    assert re.search(r"ours masked / LEDITS\+\+ masked \d+\.\d+", out), out
