"""SegaFluxPipeline against diffusers' FluxPipeline on tiny random FLUX components (fp32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

import sega.pipeline_flux as pipeline_flux
from sega import EditConcept, SegaFluxPipeline, Stopped
from tests.tiny_flux import PROMPT, T5_TOKENS, save_tiny_flux, tiny_flux_components

HEIGHT, WIDTH = 32, 16  # pixels; the tiny VAE does not downsample: latents 32 x 16, 8 x 16 packed tokens
STEPS = 3
SIZE = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, max_sequence_length=T5_TOKENS)


def seed(value: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(value)


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def pipes(request) -> tuple[FluxPipeline, SegaFluxPipeline]:
    parts = tiny_flux_components(guidance_embeds=request.param)
    reference, ours = FluxPipeline(**parts), SegaFluxPipeline(**parts)
    for pipe in (reference, ours):
        pipe.set_progress_bar_config(disable=True)
    return reference, ours


@pytest.fixture(scope="module")
def ours_schnell() -> SegaFluxPipeline:
    pipe = SegaFluxPipeline(**tiny_flux_components(guidance_embeds=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class TransformerRows:
    """Counts the transformer's calls and the batch rows they evaluate (a forward hook)."""

    def __init__(self, transformer):
        self.calls, self.rows = [], 0
        self.handle = transformer.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        self.calls.append(kwargs["hidden_states"].shape[0])

    def close(self):
        self.handle.remove()


def test_no_concepts_equals_flux_pipeline(pipes):
    reference, ours = pipes
    expected = reference(PROMPT, generator=seed(), output_type="np", **SIZE).images
    out = ours(PROMPT, generator=seed(), output_type="np", **SIZE)
    assert out.images.shape == expected.shape == (1, HEIGHT, WIDTH, 3)
    np.testing.assert_allclose(out.images, expected, atol=1e-5, rtol=0)
    assert (out.unet_calls, out.unet_samples) == (STEPS, STEPS)


@pytest.mark.parametrize("reverse", [False, True])
def test_one_concept_equals_flux_with_composed_velocity(pipes, monkeypatch, reverse):
    """Threshold 0, warmup 0, no momentum: v = v_p + s (v_c - v_p) (minus for reverse); the oracle composes it
    from two separate transformer calls inside an unmodified FluxPipeline."""
    reference, ours = pipes
    scale, concept = 3.0, "blue square"
    out = ours(PROMPT, generator=seed(), output_type="latent", editing_prompt=concept, edit_guidance_scale=scale,
               edit_threshold=0.0, edit_warmup_steps=0, edit_momentum_scale=0.0,
               reverse_editing_direction=reverse, **SIZE).images
    plain = reference(PROMPT, generator=seed(), output_type="latent", **SIZE).images
    concept_embeds, concept_pooled, _ = reference.encode_prompt(concept, max_sequence_length=T5_TOKENS)
    transformer, forward = reference.transformer, reference.transformer.forward
    signed = -scale if reverse else scale

    def composed(hidden_states, timestep, guidance, pooled_projections, encoder_hidden_states, txt_ids, img_ids,
                 joint_attention_kwargs=None, return_dict=True):
        common = dict(hidden_states=hidden_states, timestep=timestep, guidance=guidance, txt_ids=txt_ids,
                      img_ids=img_ids, return_dict=False)
        prompt = forward(pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                         **common)[0]
        edit = forward(pooled_projections=concept_pooled, encoder_hidden_states=concept_embeds, **common)[0]
        return (prompt + signed * (edit - prompt),)

    monkeypatch.setattr(transformer, "forward", composed)
    expected = reference(PROMPT, generator=seed(), output_type="latent", **SIZE).images
    monkeypatch.undo()
    assert (expected - plain).abs().max() > 1e-2  # the edit changes the result
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_true_cfg_edits_are_taken_against_the_negative_estimate(pipes, monkeypatch):
    """With true CFG: v = v_n + t (v_p - v_n) + s (v_c - v_n). FluxPipeline calls the transformer for the prompt
    and for the negative prompt; the oracle returns v_p + s / t (v_c - v_n) for the prompt's call."""
    reference, ours = pipes
    scale, true_cfg, concept, negative = 3.0, 2.5, "blue square", "black square"
    cfg = dict(true_cfg_scale=true_cfg, negative_prompt=negative)
    out = ours(PROMPT, generator=seed(), output_type="latent", editing_prompt=concept, edit_guidance_scale=scale,
               edit_threshold=0.0, edit_warmup_steps=0, edit_momentum_scale=0.0, **cfg, **SIZE).images
    plain = reference(PROMPT, generator=seed(), output_type="latent", **cfg, **SIZE).images
    concept_embeds, concept_pooled, _ = reference.encode_prompt(concept, max_sequence_length=T5_TOKENS)
    negative_embeds, negative_pooled, _ = reference.encode_prompt(negative, max_sequence_length=T5_TOKENS)
    transformer, forward = reference.transformer, reference.transformer.forward

    def composed(hidden_states, timestep, guidance, pooled_projections, encoder_hidden_states, txt_ids, img_ids,
                 joint_attention_kwargs=None, return_dict=True):
        common = dict(hidden_states=hidden_states, timestep=timestep, guidance=guidance, txt_ids=txt_ids,
                      img_ids=img_ids, return_dict=False)
        velocity = forward(pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                           **common)[0]
        if torch.allclose(encoder_hidden_states, negative_embeds, atol=1e-4):  # grad mode changes the last bits
            return (velocity,)
        v_negative = forward(pooled_projections=negative_pooled, encoder_hidden_states=negative_embeds, **common)[0]
        v_concept = forward(pooled_projections=concept_pooled, encoder_hidden_states=concept_embeds, **common)[0]
        return (velocity + scale / true_cfg * (v_concept - v_negative),)

    monkeypatch.setattr(transformer, "forward", composed)
    expected = reference(PROMPT, generator=seed(), output_type="latent", **cfg, **SIZE).images
    monkeypatch.undo()
    assert (expected - plain).abs().max() > 1e-2
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_threshold_is_per_latent_channel_over_positions_on_plain_tensors():
    torch.manual_seed(0)
    batch, channels, height, width = 2, 4, 16, 8  # vae_scale_factor 1: latents 16 x 8, 32 tokens of 16 features
    base = torch.randn(batch, height * width // 4, channels * 4)
    concepts = torch.randn(2, *base.shape)
    thresholds = torch.tensor([0.9, 0.5])
    psi = pipeline_flux.flux_concept_directions(base, concepts, torch.tensor([2.0, -1.0]), thresholds, height,
                                                width, vae_scale_factor=1)
    assert psi.shape == (2, batch, channels, height, width)
    full = pipeline_flux.unpack(concepts - base, height, width, 1) * torch.tensor([2.0, -1.0])[:, None, None, None,
                                                                                                None]
    kept = psi != 0
    torch.testing.assert_close(psi[kept], full[kept])
    share = kept.flatten(start_dim=3).float().mean(-1)  # (C, B, ch)
    positions = height * width
    expected = (1 - thresholds)[:, None, None].expand_as(share)
    assert (share - expected).abs().max() <= 1 / positions
    # Large values on one of the four 2x2 sub-grids of channel 0: a per-channel threshold at 0.75 keeps exactly
    # that sub-grid (one packed feature, all its tokens); a per-feature or per-token one would not.
    direction = torch.rand(1, batch, channels, height, width) * 0.1
    direction[:, :, 0, 0::2, 0::2] += 10
    packed = FluxPipeline._pack_latents(direction[0], batch, channels, height, width)
    psi = pipeline_flux.flux_concept_directions(torch.zeros_like(packed), packed[None], torch.tensor([1.0]),
                                                torch.tensor([0.75]), height, width, vae_scale_factor=1)
    mask = torch.zeros(batch, channels, height, width, dtype=torch.bool)
    mask[:, 0, 0::2, 0::2] = True
    assert torch.equal(psi[0, :, 0] != 0, mask[:, 0])


def test_threshold_edits_one_minus_threshold_of_each_channel_in_the_pipeline(ours_schnell, monkeypatch):
    recorded = []
    directions = pipeline_flux.flux_concept_directions

    def recording(*args, **kwargs):
        recorded.append(directions(*args, **kwargs))
        return recorded[-1]

    monkeypatch.setattr(pipeline_flux, "flux_concept_directions", recording)
    thresholds = [0.8, 0.95]
    out = ours_schnell(PROMPT, generator=seed(), output_type="latent", num_images_per_prompt=2,
                       concepts=[EditConcept("blue square", scale=4, threshold=thresholds[0], warmup=0),
                                 EditConcept("black background", scale=2, threshold=thresholds[1], warmup=0)],
                       edit_momentum_scale=0.0, **SIZE)
    assert out.images.shape == (2, HEIGHT * WIDTH // 4, 4)
    assert len(recorded) == STEPS
    positions = HEIGHT * WIDTH
    for psi in recorded:
        assert psi.shape == (2, 2, 1, HEIGHT, WIDTH)  # (concepts, images, latent channels, H, W)
        share = (psi != 0).flatten(start_dim=3).float().mean(-1)
        for c, threshold in enumerate(thresholds):
            assert (share[c] - (1 - threshold)).abs().max() <= 1 / positions


@pytest.mark.parametrize("momentum, true_cfg", [(0.0, False), (0.1, False), (0.0, True)])
def test_one_transformer_call_per_step_and_the_pair_shares_steps_before_warmup(ours_schnell, momentum, true_cfg):
    steps, warmup, n_concepts = 4, 2, 3
    cfg = dict(true_cfg_scale=2.0, negative_prompt="black square") if true_cfg else {}
    rows = TransformerRows(ours_schnell.transformer)
    try:
        out = ours_schnell(PROMPT, generator=seed(), output_type="latent", return_original=True,
                           editing_prompt=["blue square", "black background", "small triangle"],
                           edit_warmup_steps=warmup, edit_momentum_scale=momentum,
                           **{**SIZE, "num_inference_steps": steps}, **cfg)
    finally:
        rows.close()
    base = 2 if true_cfg else 1  # prompt (+ negative) rows per run
    # Before warmup both runs are one; concepts only ride along when momentum accumulates there.
    shared = base + (n_concepts if momentum else 0)
    edited = base + base + n_concepts  # run without edits, edited run, concepts
    assert rows.calls == [shared] * warmup + [edited] * (steps - warmup)
    assert (out.unet_calls, out.unet_samples) == (steps, sum(rows.calls))
    assert not torch.equal(out.images, out.original_images)


def test_return_original_equals_the_run_without_concepts(pipes):
    _, ours = pipes
    plain = ours(PROMPT, generator=seed(), output_type="np", **SIZE).images
    out = ours(PROMPT, generator=seed(), output_type="np", return_original=True, editing_prompt=["blue square"],
               edit_warmup_steps=1, edit_threshold=0.5, **SIZE)
    np.testing.assert_allclose(out.original_images, plain, atol=1e-5, rtol=0)
    assert np.abs(out.images - plain).max() > 1e-3
    images, original = ours(PROMPT, generator=seed(), output_type="np", return_original=True, return_dict=False,
                            **SIZE)
    np.testing.assert_allclose(images, plain, atol=1e-5, rtol=0)
    assert original is images


def test_true_cfg_without_concepts_equals_flux_pipeline(pipes):
    reference, ours = pipes
    cfg = dict(true_cfg_scale=3.0, negative_prompt="black square")
    expected = reference(PROMPT, generator=seed(), output_type="np", **cfg, **SIZE).images
    out = ours(PROMPT, generator=seed(), output_type="np", **cfg, **SIZE)
    without = ours(PROMPT, generator=seed(), output_type="np", **SIZE).images
    assert np.abs(expected - without).max() > 1e-3
    np.testing.assert_allclose(out.images, expected, atol=1e-5, rtol=0)
    assert (out.unet_calls, out.unet_samples) == (STEPS, 2 * STEPS)


def test_stop_raises_stopped_at_a_step_boundary(ours_schnell):
    class StopAfter:
        def __init__(self, checks: int):
            self.checks = checks

        def is_set(self) -> bool:
            self.checks -= 1
            return self.checks < 0

    rows = TransformerRows(ours_schnell.transformer)
    try:
        with pytest.raises(Stopped):
            ours_schnell(PROMPT, generator=seed(), output_type="latent", stop=StopAfter(2), **SIZE)
        out = ours_schnell(PROMPT, generator=seed(), output_type="latent", stop=StopAfter(STEPS), **SIZE)
    finally:
        rows.close()
    assert len(rows.calls) == 2 + STEPS  # the stopped call ran two steps; a stop never set stops nothing
    assert out.unet_calls == STEPS


def test_from_pretrained_loads_a_saved_folder(tmp_path):
    folder = save_tiny_flux(tmp_path / "tiny-flux", guidance_embeds=True)
    ours = SegaFluxPipeline.from_pretrained(folder)
    reference = FluxPipeline.from_pretrained(folder)
    assert isinstance(ours, SegaFluxPipeline) and ours.transformer.config.guidance_embeds
    for pipe in (ours, reference):
        pipe.set_progress_bar_config(disable=True)
    expected = reference(PROMPT, generator=seed(), output_type="np", **SIZE).images
    np.testing.assert_allclose(ours(PROMPT, generator=seed(), output_type="np", **SIZE).images, expected,
                               atol=1e-5, rtol=0)


def test_invalid_arguments_are_refused(ours_schnell):
    with pytest.raises(ValueError, match="multiples of 2"):
        ours_schnell(PROMPT, **{**SIZE, "height": 31})
    with pytest.raises(ValueError, match="edit_threshold|threshold"):
        ours_schnell(PROMPT, editing_prompt="blue square", edit_threshold=1.0, **SIZE)
    with pytest.raises(ValueError, match="2 entries"):
        ours_schnell(PROMPT, editing_prompt="blue square", edit_guidance_scale=[1.0, 2.0], **SIZE)
    with pytest.raises(ValueError, match="not both"):
        ours_schnell(PROMPT, editing_prompt="blue square", concepts=[EditConcept("red")], **SIZE)


def test_default_warmup_edits_on_four_steps(ours_schnell):
    out = ours_schnell(PROMPT, generator=seed(), output_type="latent", return_original=True,
                       editing_prompt="blue square", edit_momentum_scale=0.0, **{**SIZE, "num_inference_steps": 4})
    # 15% of 4 steps rounds to warmup 1: the runs share step 0, then the edits apply on steps 1 to 3.
    assert out.unet_samples == 1 + 3 * 3
    assert not torch.equal(out.images, out.original_images)


def test_editing_prompt_embeds_equal_editing_prompt(ours_schnell):
    edits = dict(edit_guidance_scale=[3.0, 2.0], edit_warmup_steps=1, edit_threshold=0.7,
                 reverse_editing_direction=[False, True])
    by_text = ours_schnell(PROMPT, generator=seed(), output_type="latent",
                           editing_prompt=["blue square", "black background"], **edits, **SIZE).images
    embeds, pooled, _ = ours_schnell.encode_prompt(["blue square", "black background"],
                                                   max_sequence_length=T5_TOKENS)
    by_embeds = ours_schnell(PROMPT, generator=seed(), output_type="latent", editing_prompt_embeds=embeds,
                             pooled_editing_prompt_embeds=pooled, **edits, **SIZE).images
    torch.testing.assert_close(by_embeds, by_text, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="go together"):
        ours_schnell(PROMPT, editing_prompt_embeds=embeds, **SIZE)
