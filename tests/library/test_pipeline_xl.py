"""SegaXLPipeline on tiny random SDXL components against diffusers' SDXL pipelines (oracles), fp32:

- no concepts: StableDiffusionXLPipeline, same seed, same latents and pixels;
- concepts: the deprecated SemanticStableDiffusionPipeline (the SD reference of SEGA's math, which
  tests/library/test_pipeline.py pins SegaPipeline to) driven by the SDXL UNet with SDXL's conditioning, and
  the recorded edit terms replayed into StableDiffusionXLPipeline;
- inversion and edit: LEditsPPPipelineStableDiffusionXL where the methods coincide.
"""

import copy
import threading
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from diffusers.pipelines.ledits_pp.pipeline_leditspp_stable_diffusion_xl import (
    LEditsPPPipelineStableDiffusionXL,
)

from sega import EditConcept, SegaXLPipeline, Stopped
from tests.tiny import tiny_xl_components

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from diffusers.pipelines.deprecated.semantic_stable_diffusion.pipeline_semantic_stable_diffusion import (
        SemanticStableDiffusionPipeline,
    )

TOL = 1e-4
STEPS = 4


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ours_for(components) -> SegaXLPipeline:
    pipe = SegaXLPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_for(components) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline(**{**components, "scheduler": copy.deepcopy(components["scheduler"])},
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler, size", [("ddim", (16, 16)), ("euler", (16, 24))],
                         ids=["ddim, square", "euler, non-square"])
def test_without_concepts_the_image_equals_stable_diffusion_xl(scheduler, size):
    components = tiny_xl_components(scheduler)
    ours, ref = ours_for(components), sdxl_for(components)
    height, width = size
    kw = dict(prompt="a red circle", num_inference_steps=STEPS, guidance_scale=6.0, height=height, width=width)
    want = ref(**kw, generator=gen(), output_type="latent").images
    got = ours(**kw, generator=gen(), output_type="latent")
    assert got.images.shape == want.shape == (1, 4, height // 2, width // 2)
    torch.testing.assert_close(got.images, want, rtol=0, atol=TOL)
    assert (got.unet_calls, got.unet_samples) == (STEPS, 2 * STEPS)
    # Pixels too (the VAE decode, SDXL's latent scaling), and the other prompt settings.
    extra = dict(negative_prompt="blue", num_images_per_prompt=2)
    want = ref(**kw, **extra, generator=gen(1), output_type="pt").images
    got = ours(**kw, **extra, generator=gen(1), output_type="pt").images
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)


def test_defaults_are_stable_diffusion_xl_s():
    """Native size from the UNet, guidance 5, zero unconditional embeddings without a negative prompt."""
    components = tiny_xl_components()
    ours, ref = ours_for(components), sdxl_for(components)
    want = ref("a red circle", num_inference_steps=2, generator=gen(), output_type="latent").images
    got = ours("a red circle", num_inference_steps=2, generator=gen(), output_type="latent").images
    assert got.shape[-2:] == (8, 8)  # sample_size 8: 16 px
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    # force_zeros_for_empty_prompt: no negative prompt is not the same as negative_prompt="".
    empty = ours("a red circle", negative_prompt="", num_inference_steps=2, generator=gen(), output_type="latent")
    assert (empty.images - got).abs().max() > 1e-3


def test_float16_vae_is_upcast_for_decoding_as_stable_diffusion_xl():
    components = tiny_xl_components()
    components["vae"] = components["vae"].to(torch.float16)
    ours, ref = ours_for(components), sdxl_for(components)
    latents = torch.randn(1, 4, 8, 8, generator=gen())
    want = ref(prompt="x", latents=latents, num_inference_steps=1, output_type="pt").images
    got = ours("x", latents=latents, num_inference_steps=1, output_type="pt").images
    assert components["vae"].dtype == torch.float16  # put back after decoding
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)


class XLConditioning:
    """Drives the deprecated SD pipeline with the SDXL UNet and SDXL's conditioning: its text encoder returns
    SDXL's concatenated penultimate hidden states (both tokenizers are the same word-level one, so the ids
    serve both encoders), and its UNet gets each row's pooled embedding (looked up from the rows the encoder
    produced) and the micro-conditioning time ids."""

    def __init__(self, components, height, width):
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        te1, te2, unet = components["text_encoder"], components["text_encoder_2"], components["unet"]
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)

        def encode(ids, *args, **kwargs):
            first = te1.__class__.forward(te1, ids, output_hidden_states=True)
            second = te2.__class__.forward(te2, ids, output_hidden_states=True)
            hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
            self.rows.extend(zip(hidden, second.text_embeds))
            return (hidden,)

        def unet_forward(sample, timestep, encoder_hidden_states, **kwargs):
            pooled = torch.stack([self.pooled(row) for row in encoder_hidden_states])
            added = {"text_embeds": pooled, "time_ids": time_ids.expand(len(pooled), -1)}
            return unet.__class__.forward(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs=added,
                                          **kwargs)

        te1.forward, unet.forward = encode, unet_forward

    def pooled(self, row: torch.Tensor) -> torch.Tensor:
        return next(p for h, p in self.rows if torch.equal(h, row))


THREE = dict(editing_prompt=["blue", "square", "large"], reverse_editing_direction=[False, True, False],
             edit_guidance_scale=[5.0, 4.0, 6.0], edit_threshold=[0.9, 0.5, 0.8])
CASES = {
    "three, warmups, cooldowns, weights": dict(THREE, edit_warmup_steps=[1, 1, 2], edit_cooldown_steps=[100, 3, 4],
                                               edit_weights=[1.0, 2.0, 0.5]),
    "momentum on, no warmup": dict(THREE, edit_warmup_steps=0, edit_momentum_scale=0.5, edit_mom_beta=0.6),
}


@pytest.mark.parametrize("case", list(CASES))
def test_concepts_follow_the_sega_reference_on_sdxl_conditioning(case):
    height, width = 16, 24
    ref_parts = tiny_xl_components()  # the same weights (same seed), patched for the reference only
    XLConditioning(ref_parts, height, width)
    ref = SemanticStableDiffusionPipeline(vae=ref_parts["vae"], text_encoder=ref_parts["text_encoder"],
                                          tokenizer=ref_parts["tokenizer"], unet=ref_parts["unet"],
                                          scheduler=ref_parts["scheduler"], safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ours = ours_for(tiny_xl_components())
    # The reference encodes "" for the unconditional estimate: ours does too with negative_prompt="".
    kw = dict(prompt="a red circle", negative_prompt="", num_inference_steps=STEPS, guidance_scale=6.0,
              height=height, width=width, output_type="latent", **CASES[case])
    want = ref(**kw, generator=gen()).images
    got = ours(**kw, generator=gen(), return_original=True)
    torch.testing.assert_close(got.images, want, rtol=0, atol=TOL)
    assert (got.images - got.original_images).abs().max() > 1e-3  # the concepts changed the image


def test_recorded_edit_replayed_into_stable_diffusion_xl_gives_the_same_latents():
    """The edit is added to exactly StableDiffusionXLPipeline's guided estimate: its scheduler step, given
    e + (the edit term ours recorded at that step), lands where ours does at every step."""
    components = tiny_xl_components()
    ours, ref = ours_for(components), sdxl_for(components)
    kw = dict(prompt="a red circle", num_inference_steps=STEPS, guidance_scale=6.0, height=16, width=24)
    edited = ours(**kw, generator=gen(), concepts=[EditConcept("blue", scale=6, threshold=0.8, warmup=1),
                                                   EditConcept("square", scale=4, reverse=True, warmup=2)],
                  edit_momentum_scale=0.3, edit_mom_beta=0.6, return_sem_guidance=True, output_type="latent")
    assert len(edited.sem_guidance) == STEPS and edited.sem_guidance[0].abs().max() == 0  # nothing before warmup
    step, calls, theirs = ref.scheduler.step, [], []

    def step_with_edit(model_output, timestep, sample, *args, **kwargs):
        calls.append(timestep)
        return step(model_output + edited.sem_guidance[len(calls) - 1], timestep, sample, *args, **kwargs)

    ref.scheduler.step = step_with_edit
    want = ref(**kw, generator=gen(), output_type="latent",
               callback_on_step_end=lambda p, i, t, d: theirs.append(d["latents"]) or {}).images
    mine = []
    ours(**kw, generator=gen(), concepts=[EditConcept("blue", scale=6, threshold=0.8, warmup=1),
                                          EditConcept("square", scale=4, reverse=True, warmup=2)],
         edit_momentum_scale=0.3, edit_mom_beta=0.6, output_type="latent",
         callback_on_step_end=lambda p, i, t, d: mine.append(d["latents"]) or {})
    assert len(calls) == len(theirs) == len(mine) == STEPS
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)
    torch.testing.assert_close(edited.images, want, rtol=0, atol=TOL)


# ---------------------------------------------------------------------------------------------------------
# Real images: LEditsPPPipelineStableDiffusionXL
# ---------------------------------------------------------------------------------------------------------

# As tests/library/test_inversion.py: 10 scheduled steps, 2 skipped, in both pipelines' counting.
OURS = dict(num_inference_steps=10, skip=0.2)
LEDITS = dict(num_inversion_steps=8, skip=0.25,
              # LEDITS++ XL zeroes the last 3 noise maps by default (num_zero_noise_steps=3); edit-friendly DDPM
              # inversion (and ours) keeps them all.
              num_zero_noise_steps=0)


def sd_ddim() -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         steps_offset=1, clip_sample=False, set_alpha_to_one=False)


def xl_parts():
    return {**tiny_xl_components(), "scheduler": sd_ddim()}


def ledits_for(components) -> LEditsPPPipelineStableDiffusionXL:
    pipe = LEditsPPPipelineStableDiffusionXL(**{**components, "scheduler": copy.deepcopy(components["scheduler"])},
                                             add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def photo(seed=0, size=32) -> PIL.Image.Image:
    """Square: LEDITS++ XL (diffusers 0.42.1) swaps height and width in its micro-conditioning (invert sets
    ``width = x0.shape[2] * f; height = x0.shape[3] * f``), so only square images compare."""
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "source_prompt, scale, ledits_negative",
    [
        # LEDITS++ inverts an empty source prompt on the unconditional estimate alone, from negative_prompt:
        # ours with guidance <= 1 uses the prompt's estimate alone, and "" encodes the same.
        ("", 1.0, ""),
        # With a source prompt both guide from the zero embeddings (force_zeros_for_empty_prompt).
        ("a red circle", 3.5, None),
    ],
    ids=["no source prompt", "source prompt"],
)
def test_inversion_equals_ledits_pp_xl(source_prompt, scale, ledits_negative):
    components = xl_parts()
    ours, ledits = ours_for(components), ledits_for(components)
    inv = ours.invert(photo(), source_prompt=source_prompt, source_guidance_scale=scale, generator=gen(), **OURS)
    ledits.invert(photo(), source_prompt=source_prompt, source_guidance_scale=scale, negative_prompt=ledits_negative,
                  generator=gen(), **LEDITS)
    assert torch.equal(inv.timesteps, ledits.inversion_steps)
    torch.testing.assert_close(inv.latents, ledits.init_latents, rtol=0, atol=TOL)
    torch.testing.assert_close(inv.noise_maps, ledits.zs, rtol=0, atol=TOL)
    # Without edits, the input comes back as the VAE sees it.
    alone = ours(source_prompt, inversion=inv, output_type="latent")
    torch.testing.assert_close(alone.images, inv.image_latents, rtol=0, atol=TOL)


LEDITS_EDIT = dict(editing_prompt=["blue", "square", "large"], reverse_editing_direction=[False, True, False],
                   edit_guidance_scale=[4.0, 6.0, 3.0], edit_warmup_steps=1, edit_cooldown_steps=[100, 5, 100])


def test_edit_equals_ledits_pp_xl_with_masks_off_where_the_methods_coincide():
    """Momentum 0, every concept warmed up at the same step, threshold 0, masks off, no source prompt.

    LEDITS++ edits from the unconditional estimate of ``negative_prompt`` alone; with negative_prompt="" and
    prompt "" our e_u + s (e_p - e_u) is that same estimate. Its concepts are given as text:
    ``editing_prompt_embeddings`` crashes in diffusers 0.42.1 (its encode_prompt then never sets the pooled
    embeddings). Its unused ``timestep_cond`` does not matter here: the tiny UNet has no ``time_cond_proj_dim``.
    """
    components = xl_parts()
    ours, ledits = ours_for(components), ledits_for(components)
    inv = ours.invert(photo(2), source_guidance_scale=1.0, generator=gen(), **OURS)
    ledits.invert(photo(2), negative_prompt="", generator=gen(), **LEDITS)
    want = ledits(**LEDITS_EDIT, negative_prompt="", edit_threshold=0.0, use_cross_attn_mask=False,
                  use_intersect_mask=False, output_type="latent").images
    got = ours("", negative_prompt="", guidance_scale=3.5, inversion=inv, **LEDITS_EDIT, edit_threshold=0.0,
               edit_momentum_scale=0.0, output_type="latent")
    torch.testing.assert_close(got.images, want, rtol=0, atol=TOL)
    assert (got.images - inv.image_latents).abs().max() > 1e-2
    # And as pixels, both decoding with SDXL's VAE settings.
    pixels = ours("", negative_prompt="", guidance_scale=3.5, inversion=inv, **LEDITS_EDIT, edit_threshold=0.0,
                  edit_momentum_scale=0.0, output_type="pt").images
    want_pixels = ledits(**LEDITS_EDIT, negative_prompt="", edit_threshold=0.0, use_cross_attn_mask=False,
                         use_intersect_mask=False, output_type="pt").images
    torch.testing.assert_close(pixels, want_pixels, rtol=0, atol=TOL)


def test_features_of_the_shared_loop_work_on_sdxl():
    """The pair, the inversion cache and a stop from a callback: the SD pipeline's loop."""
    ours = ours_for(tiny_xl_components())
    kw = dict(prompt="a red circle", num_inference_steps=4, guidance_scale=5.0, output_type="latent")
    plain = ours(**kw, generator=gen()).images
    first = ours(**kw, generator=gen(), concepts=[EditConcept("blue", warmup=1)], return_original=True)
    torch.testing.assert_close(first.original_images, plain, rtol=0, atol=TOL)
    again = ours(**kw, generator=gen(), concepts=[EditConcept("square", warmup=2)], return_original=True)
    torch.testing.assert_close(again.original_images, first.original_images, rtol=0, atol=TOL)
    # Shared until step 2 ([u, p, concept]: the concept feeds the momentum), then [plain u, p, edited u, p, concept].
    assert (again.unet_calls, again.unet_samples) == (4, 2 * 3 + 2 * 5)

    stop = threading.Event()
    calls = []

    def stop_at_step_1(pipe, i, t, tensors):
        calls.append(i)
        if i == 1:
            stop.set()
        return {}

    with pytest.raises(Stopped):
        ours(**kw, generator=gen(), concepts=[EditConcept("blue", warmup=1)], callback_on_step_end=stop_at_step_1,
             stop=stop)
    assert calls == [0, 1]
    inv = ours.invert(photo(3), source_prompt="a red circle", generator=gen(), num_inference_steps=4, skip=0.0)
    assert ours.invert(photo(3), source_prompt="a red circle", generator=gen(), num_inference_steps=4,
                       skip=0.0).cache_hit
    out = ours("a red circle", inversion=inv, concepts=[EditConcept("blue", warmup=1)], return_original=True,
               output_type="latent")
    torch.testing.assert_close(out.original_images, inv.image_latents, rtol=0, atol=TOL)


def test_bad_arguments_name_the_field():
    ours = ours_for(tiny_xl_components())
    with pytest.raises(ValueError, match="editing_prompt_embeddings"):
        ours("a red circle", num_inference_steps=1, editing_prompt_embeddings=torch.zeros(1, 77, 32))
    with pytest.raises(ValueError, match="height and width"):
        ours("a red circle", num_inference_steps=1, height=30)
