"""The SDXL-scale benchmark: its configs describe SDXL base 1.0 (counted on the meta device, nothing allocated),
and its comparison runs (on tiny random SDXL components, so it stays fast)."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks import sdxl
from benchmarks.speed import Counters
from sega import SegaXLPipeline
from tests.tiny import tiny_xl_components


def test_configs_build_sdxl_base_architecture():
    components = sdxl.sdxl_components(device="meta")
    # SDXL base 1.0's published sizes: the configs describe its architecture, not a smaller one.
    assert sdxl.parameter_counts(components) == {"unet": 2_567_463_684, "vae": 83_653_863,
                                                 "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}
    unet, vae = components["unet"].config, components["vae"].config
    te1, te2 = components["text_encoder"].config, components["text_encoder_2"].config
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size == 2048
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim == 2816
    assert unet.addition_embed_type == "text_time" and list(unet.transformer_layers_per_block) == [1, 2, 10]
    assert vae.scaling_factor == 0.13025 and vae.force_upcast
    assert unet.sample_size * 2 ** (len(vae.block_out_channels) - 1) == 1024
    assert components["tokenizer"].model_max_length == te1.max_position_embeddings == 77
    assert type(components["scheduler"]).__name__ == "EulerDiscreteScheduler"


def test_comparison_prints_the_ratio_and_exactly_two_plus_k_samples(capsys, monkeypatch):
    parts = tiny_xl_components("euler")
    ours = SegaXLPipeline(**parts, add_watermarker=False)
    ours.set_progress_bar_config(disable=True)
    counters = Counters(torch.device("cpu"))
    ours.unet.forward = counters.wrap(ours.unet.forward, "unet")
    monkeypatch.setattr(type(ours.scheduler), "step", counters.wrap(type(ours.scheduler).step, "scheduler"))
    results = sdxl.compare(ours, torch.device("cpu"), size=16, steps=2, concepts=[1, 3], repeats=1, counters=counters)
    out = capsys.readouterr().out
    reference, mine = results["plain"]
    assert reference["unet_samples"] == mine["unet_samples"] == 2 * 2
    assert results[3]["unet_samples"] == (2 + 3) * 2 and results[3]["unet_calls"] == 2
    assert re.search(r"^no concepts: ratio \d+\.\d+ \(CPU time \d+\.\d+\)", out, re.M), out
    assert "1 concept(s): 3.0 UNet samples per step in 1.0 call(s)  exactly 2 + 1" in out
    assert "3 concept(s): 5.0 UNet samples per step in 1.0 call(s)  exactly 2 + 3" in out


def test_bad_arguments_name_the_option(capsys):
    for argv, name in ((["--steps", "0"], "--steps"), (["--concepts", "1,x"], "--concepts"),
                       (["--size", "30"], "--size")):
        with pytest.raises(SystemExit):
            sdxl.main(argv)
        assert f"error: {name} must" in capsys.readouterr().err
