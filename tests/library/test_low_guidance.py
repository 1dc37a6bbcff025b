"""Guidance scale <= 1 with edit concepts: both images come from the prompt's estimate, the edited one plus the
edit term, so the pair stays "the same picture with and without edits" (tiny components)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from sega import EditConcept, SegaPipeline
from tests.tiny import tiny_components

STEPS = 5
SCALES = (0.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def pipe() -> SegaPipeline:
    pipe = SegaPipeline(**tiny_components("ddim"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, scale, concepts, **kwargs):
    return pipe("a red circle", num_inference_steps=STEPS, guidance_scale=scale, concepts=concepts, output_type="np",
                return_original=True, generator=torch.Generator().manual_seed(3), **kwargs)


@pytest.mark.parametrize("scale", SCALES)
def test_a_concept_that_never_applies_leaves_the_pair_identical(pipe, scale):
    never = [EditConcept("blue", scale=10, warmup=STEPS, threshold=0.5)]
    out = run(pipe, scale, never)
    assert np.array_equal(out.images, out.original_images)
    # ... and equal to a run without concepts at that scale: the prompt's estimate alone
    plain = run(pipe, scale, None)
    assert np.array_equal(out.original_images, plain.images)


def test_an_active_concept_adds_its_edit_term_to_the_prompts_estimate(pipe, monkeypatch):
    """At every step the estimate handed to the scheduler is e_p + s_c (e_c - e_u), at 0, 0.5 and 1 alike."""
    chunks, fed = [], []
    hook = pipe.unet.register_forward_hook(lambda module, args, out: chunks.append(out.sample.split(1)))
    real_step = DDIMScheduler.step

    def step(self, model_output, *args, **kwargs):
        fed.append(model_output)
        return real_step(self, model_output, *args, **kwargs)

    monkeypatch.setattr(DDIMScheduler, "step", step)
    scale_c = 6.0
    concept = [EditConcept("blue", scale=scale_c, warmup=0, threshold=0.0)]  # threshold 0 keeps every position
    results = []
    try:
        for scale in SCALES:
            chunks.clear()
            fed.clear()
            out = pipe("a red circle", num_inference_steps=STEPS, guidance_scale=scale, concepts=concept,
                       edit_momentum_scale=0.0, output_type="latent", generator=torch.Generator().manual_seed(3))
            assert len(chunks) == len(fed) == STEPS
            for (e_u, e_p, e_c), e in zip(chunks, fed):  # one UNet batch per step: [u, p, concept]
                torch.testing.assert_close(e, e_p + scale_c * (e_c - e_u), rtol=0, atol=1e-5)
                assert (e_c - e_u).abs().max() > 1e-4  # the edit term is not zero
            results.append(out.images)
    finally:
        hook.remove()
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=0)
