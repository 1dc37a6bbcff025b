"""The FLUX benchmark: its components have FLUX.1's width (counted on the meta device, nothing allocated), and its
comparison runs (on tiny random FLUX components, so it stays fast)."""

from __future__ import annotations

import torch

from benchmarks import flux
from sega import SegaFluxPipeline
from tests.tiny_flux import tiny_flux_components


def test_components_have_flux_width():
    parts = flux.flux_components(double_blocks=1, single_blocks=2, device="meta")
    config = parts["transformer"].config
    assert config.num_attention_heads * config.attention_head_dim == 3072
    assert (config.joint_attention_dim, config.pooled_projection_dim, config.in_channels) == (4096, 768, 64)
    assert (config.num_layers, config.num_single_layers, config.guidance_embeds) == (1, 2, True)
    assert parts["text_encoder"].config.hidden_size == 768 and parts["text_encoder_2"].config.d_model == 4096
    assert parts["vae"].config.latent_channels * 4 == config.in_channels


def test_comparison_counts_one_call_per_step_and_one_plus_k_samples(capsys):
    ours = SegaFluxPipeline(**tiny_flux_components(guidance_embeds=True))
    ours.set_progress_bar_config(disable=True)
    counter = flux.TransformerCounter(ours.transformer, torch.device("cpu"))
    results = flux.compare(ours, counter, size=16, steps=2, tokens=8, concepts=2, repeats=1)
    plain, edited = results["plain (FluxPipeline)"], results["2 concepts (ours)"]
    assert (plain["calls"], plain["samples"]) == (2, 2)
    assert (edited["calls"], edited["samples"]) == (2, 2 * 3)
    assert results["ratio"] > 0
    out = capsys.readouterr().out
    assert "| 2 concepts (ours) |" in out and "edited / plain:" in out
