"""Editing real images: SegaPipeline.invert against diffusers' LEditsPPPipelineStableDiffusion (oracle) and the
deprecated SemanticStableDiffusionPipeline driven by the same noise maps."""

import copy
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.pipelines.ledits_pp.pipeline_leditspp_stable_diffusion import LEditsPPPipelineStableDiffusion

from sega import EditConcept, SegaPipeline
from sega.inversion import inversion_key
from tests.tiny import tiny_components

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from diffusers.pipelines.deprecated.semantic_stable_diffusion.pipeline_semantic_stable_diffusion import (
        SemanticStableDiffusionPipeline,
    )

TOL = 1e-4
# Our schedule counts every step and skips a share of them; LEDITS++ counts the steps it performs and
# adds int(n * skip) on top: 10 steps with 2 skipped on both sides.
OURS = dict(num_inference_steps=10, skip=0.2)
LEDITS = dict(num_inversion_steps=8, skip=0.25)


def sd_ddim() -> DDIMScheduler:
    """Stable Diffusion's own DDIM settings (LEDITS++ forces steps_offset=1 and clip_sample=False too)."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         steps_offset=1, clip_sample=False, set_alpha_to_one=False)


def parts():
    return {**tiny_components("ddim"), "scheduler": sd_ddim()}


def ours_for(components) -> SegaPipeline:
    pipe = SegaPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ledits_for(components) -> LEditsPPPipelineStableDiffusion:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = LEditsPPPipelineStableDiffusion(**{**components, "scheduler": copy.deepcopy(components["scheduler"])},
                                               safety_checker=None, feature_extractor=None,
                                               requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    # diffusers 0.42.1: invert passes float timesteps (torch.Tensor([t])) to add_noise, which indexes with them.
    add_noise = pipe.scheduler.add_noise
    pipe.scheduler.add_noise = lambda x, noise, t: add_noise(x, noise, t.long())
    # ... and unpacks encode_prompt's (source prompt, empty prompt) as (uncond, text), so its guidance points
    # away from the source prompt. Swapped back here so both compute e_u + s (e_source - e_u).
    encode_prompt = pipe.encode_prompt

    def encode_in_invert_order(*args, **kwargs):
        edit, uncond, n = encode_prompt(*args, **kwargs)
        in_invert = "editing_prompt_embeds" not in kwargs  # __call__ passes it (None when unused)
        return (uncond, edit, n) if in_invert else (edit, uncond, n)

    pipe.encode_prompt = encode_in_invert_order
    return pipe


def photo(seed=0, size=32) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("source_prompt", ["", "a red circle"], ids=["no source prompt", "source prompt"])
def test_inversion_equals_ledits_pp(source_prompt):
    components = parts()
    ours, ledits = ours_for(components), ledits_for(components)
    inv = ours.invert(photo(), source_prompt=source_prompt, source_guidance_scale=3.5, generator=gen(), **OURS)
    ledits.invert(photo(), source_prompt=source_prompt, source_guidance_scale=3.5, generator=gen(), **LEDITS)
    assert torch.equal(inv.timesteps, ledits.inversion_steps)
    torch.testing.assert_close(inv.latents, ledits.init_latents, rtol=0, atol=TOL)
    torch.testing.assert_close(inv.noise_maps, ledits.zs, rtol=0, atol=TOL)
    # One UNet call per performed step, [u, p] each.
    assert (inv.unet_calls, inv.unet_samples) == (8, 16)


@pytest.mark.parametrize("source_prompt", ["", "a red circle"], ids=["no source prompt", "source prompt"])
def test_without_edits_the_image_comes_back(source_prompt):
    """Edit-friendly inversion reconstructs exactly: the image without edits is the input as the VAE sees it."""
    ours = ours_for(parts())
    inv = ours.invert(photo(1), source_prompt=source_prompt, generator=gen(), **OURS)
    alone = ours(source_prompt, inversion=inv, output_type="latent")
    torch.testing.assert_close(alone.images, inv.image_latents, rtol=0, atol=TOL)
    out = ours(source_prompt, inversion=inv, concepts=[EditConcept("blue", scale=6, warmup=2)], return_original=True,
               output_type="latent")
    torch.testing.assert_close(out.original_images, inv.image_latents, rtol=0, atol=TOL)
    assert (out.images - inv.image_latents).abs().max() > 1e-2  # the edit changed it
    # As pixels: the original is the VAE's decoding of the input's latents (the latents' round-off, ~1e-5,
    # grows through the decoder: within a quarter of one 8-bit level).
    pixels = ours(source_prompt, inversion=inv, concepts=[EditConcept("blue", warmup=2)], return_original=True,
                  output_type="pt").original_images
    want = ours.image_processor.postprocess(
        ours.vae.decode(inv.image_latents / ours.vae.config.scaling_factor).sample, output_type="pt")
    torch.testing.assert_close(pixels, want, rtol=0, atol=1e-3)


LEDITS_EDIT = dict(editing_prompt=["blue", "square", "large"], reverse_editing_direction=[False, True, False],
                   edit_guidance_scale=[4.0, 6.0, 3.0], edit_warmup_steps=1, edit_cooldown_steps=[100, 5, 100])


def test_edit_equals_ledits_pp_with_masks_off_where_the_methods_coincide():
    """Momentum 0, every concept warmed up at the same step, threshold 0 (nothing masked), no source prompt."""
    components = parts()
    ours, ledits = ours_for(components), ledits_for(components)
    inv = ours.invert(photo(2), generator=gen(), **OURS)
    ledits.invert(photo(2), generator=gen(), **LEDITS)
    want = ledits(**LEDITS_EDIT, edit_threshold=0.0, use_cross_attn_mask=False, use_intersect_mask=False,
                  output_type="latent").images
    got = ours("", inversion=inv, **LEDITS_EDIT, edit_threshold=0.0, edit_momentum_scale=0.0, output_type="latent")
    torch.testing.assert_close(got.images, want, rtol=0, atol=TOL)
    assert (got.images - inv.image_latents).abs().max() > 1e-2


def test_thresholds_differ_from_ledits_pp_by_design():
    """SEGA keeps the top (1 - threshold) of |psi| per channel; LEDITS++ (masks off) ranks positions by |psi|
    summed over channels and keeps the same positions in every channel."""
    components = parts()
    ours, ledits = ours_for(components), ledits_for(components)
    inv = ours.invert(photo(3), generator=gen(), **OURS)
    ledits.invert(photo(3), generator=gen(), **LEDITS)
    edit = dict(editing_prompt=["blue"], edit_guidance_scale=5.0, edit_warmup_steps=0, edit_threshold=0.75)
    ledits(**edit, use_cross_attn_mask=False, use_intersect_mask=False, output_type="latent")
    got = ours("", inversion=inv, **edit, edit_momentum_scale=0.0, return_sem_guidance=True, output_type="latent")
    theirs, mine = ledits.sem_guidance[0], got.sem_guidance[0]  # step 0: same latents, same estimates
    kept_theirs, kept_mine = theirs != 0, mine != 0
    assert all(torch.equal(kept_theirs[:, 0], kept_theirs[:, c]) for c in range(1, 4))  # one mask for all channels
    assert not all(torch.equal(kept_mine[:, 0], kept_mine[:, c]) for c in range(1, 4))
    share = kept_mine.float().mean(dim=(-1, -2))
    torch.testing.assert_close(share, torch.full_like(share, 0.25), rtol=0, atol=0.01)  # 25% of each channel
    both = kept_theirs & kept_mine
    assert both.any()
    torch.testing.assert_close(mine[both], theirs[both], rtol=0, atol=TOL)  # the same psi where both keep it


def test_partly_warmed_up_concepts_are_weighted_differently_from_ledits_pp():
    """While only some concepts are warmed up, SEGA normalises their weights to sum to 1 (the reference
    pipeline's rule); LEDITS++ adds them up. Once all are active both add them up (momentum 0)."""
    components = parts()
    ours, ledits = ours_for(components), ledits_for(components)
    inv = ours.invert(photo(4), generator=gen(), **OURS)
    ledits.invert(photo(4), generator=gen(), **LEDITS)
    edit = dict(editing_prompt=["blue", "square", "large"], edit_guidance_scale=[4.0, 5.0, 6.0],
                edit_warmup_steps=[0, 0, 3], edit_threshold=0.0)
    ledits(**edit, use_cross_attn_mask=False, use_intersect_mask=False, output_type="latent")
    got = ours("", inversion=inv, **edit, edit_momentum_scale=0.0, return_sem_guidance=True, output_type="latent")
    # Step 0, same inputs: ours is the mean of the two active directions, LEDITS++ their sum.
    torch.testing.assert_close(2 * got.sem_guidance[0], ledits.sem_guidance[0], rtol=0, atol=TOL)


def test_sega_on_an_inverted_image_equals_the_deprecated_pipeline_fed_the_noise_maps():
    """Momentum, warmups, cooldowns, weights and thresholds on an inverted image are SEGA's own: with skip 0,
    the deprecated pipeline started at the inversion's latents, with each DDIM step's variance noise taken
    from the noise maps, gives the same edit."""
    components = parts()
    ours = ours_for(components)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = SemanticStableDiffusionPipeline(**{**components, "scheduler": sd_ddim()}, safety_checker=None,
                                              feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    inv = ours.invert(photo(5), source_prompt="a red circle", source_guidance_scale=5.0, generator=gen(),
                      num_inference_steps=8, skip=0.0)
    step, calls = ref.scheduler.step, []

    def step_with_noise_map(model_output, timestep, sample, eta=0.0, generator=None, **kwargs):
        calls.append(timestep)
        return step(model_output, timestep, sample, eta=eta, variance_noise=inv.noise_maps[len(calls) - 1], **kwargs)

    ref.scheduler.step = step_with_noise_map
    edit = dict(editing_prompt=["blue", "square", "large"], reverse_editing_direction=[False, True, False],
                edit_guidance_scale=[5.0, 4.0, 6.0], edit_threshold=[0.9, 0.5, 0.8], edit_warmup_steps=[1, 2, 1],
                edit_cooldown_steps=[100, 6, 7], edit_weights=[1.0, 2.0, 0.5], edit_momentum_scale=0.5,
                edit_mom_beta=0.6)
    want = ref("a red circle", num_inference_steps=8, guidance_scale=5.0, eta=1.0, latents=inv.latents,
               output_type="latent", **edit).images
    got = ours("a red circle", inversion=inv, output_type="latent", **edit).images
    assert len(calls) == 8
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    no_momentum = ours("a red circle", inversion=inv, output_type="latent", **{**edit, "edit_momentum_scale": 0.0})
    assert (no_momentum.images - got).abs().max() > 1e-3


def test_a_reedit_reuses_the_inversion_from_the_cache():
    ours = ours_for(parts())
    first = ours.invert(photo(6), source_prompt="a red circle", generator=gen(), **OURS)
    assert not first.cache_hit and first.unet_samples > 0
    again = ours.invert(photo(6), source_prompt="a red circle", generator=gen(), **OURS)
    assert again.cache_hit and again.unet_calls == 0
    assert torch.equal(again.noise_maps, first.noise_maps) and torch.equal(again.latents, first.latents)
    # Anything else is a miss: other pixels, settings or seed; and use_cache=False neither reads nor fills it.
    assert not ours.invert(photo(7), source_prompt="a red circle", generator=gen(), **OURS).cache_hit
    assert not ours.invert(photo(6), source_prompt="a red circle", generator=gen(), num_inference_steps=10,
                           skip=0.3).cache_hit
    assert not ours.invert(photo(6), source_prompt="a red circle", generator=gen(1), **OURS).cache_hit
    entries = ours.inversion_cache.keys()
    off = ours.invert(photo(6), source_prompt="a red circle", generator=gen(), use_cache=False, **OURS)
    assert not off.cache_hit and ours.inversion_cache.keys() == entries
    assert len(ours.inversion_cache) <= ours.inversion_cache.max_entries
    # The edit says where its inversion came from, and re-edits give the same reconstruction.
    kw = dict(inversion=again, return_original=True, output_type="latent")
    out = ours("a red circle", concepts=[EditConcept("blue", warmup=2)], **kw)
    assert out.inversion_cache_hit
    other = ours("a red circle", concepts=[EditConcept("square", warmup=1)], **kw)
    torch.testing.assert_close(other.original_images, out.original_images, rtol=0, atol=TOL)


def test_bad_inversion_arguments_name_the_field():
    ours = ours_for(parts())
    with pytest.raises(ValueError, match="image"):
        ours.invert(photo(size=30), generator=gen())
    with pytest.raises(ValueError, match="image"):
        ours.invert(torch.full((3, 16, 16), 2.0), generator=gen())
    with pytest.raises(ValueError, match="skip"):
        ours.invert(photo(), skip=1.0, generator=gen())
    with pytest.raises(ValueError, match="source_guidance_scale"):
        ours.invert(photo(), source_guidance_scale=-1.0, generator=gen())
    inv = ours.invert(torch.zeros(3, 16, 16), generator=gen(), num_inference_steps=4, skip=0.0)
    assert inv.latents.shape[-2:] == (8, 8)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours("", inversion=inv, num_inference_steps=5)
    with pytest.raises(ValueError, match="latents"):
        ours("", inversion=inv, latents=inv.latents)
    with pytest.raises(ValueError, match="inversion holds 1"):
        ours(["", ""], inversion=inv)


def test_any_image_tensor_inverts_and_the_cache_keys_on_its_pixels():
    """Tensors that ``numpy()`` refuses (one that requires grad), non-contiguous ones and float16 ones invert;
    the same pixels hit the cache whatever tensor holds them."""
    ours = ours_for(parts())
    pixels = torch.rand(1, 3, 32, 32, generator=gen(8)) * 2 - 1
    first = ours.invert(pixels.clone().requires_grad_(True), generator=gen(), **OURS)
    assert not first.cache_hit
    strided = pixels.transpose(2, 3).contiguous().transpose(2, 3)
    assert not strided.is_contiguous()
    for same in (pixels, strided):
        assert ours.invert(same, generator=gen(), **OURS).cache_hit
    half = ours.invert(pixels.half(), generator=gen(), **OURS)
    assert half.latents.dtype == first.latents.dtype and torch.isfinite(half.latents).all()


class _OnAnotherDevice:
    """What the key sees of a CUDA tensor: ``numpy()`` raises until the pixels are copied to the CPU."""

    def __init__(self, pixels: torch.Tensor):
        self.pixels, self.shape = pixels, pixels.shape

    def numpy(self):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")

    def detach(self):
        return self

    def to(self, *args, **kwargs):
        return self.pixels.to(*args, **kwargs)

    def cpu(self):
        return self.pixels


def test_the_inversion_key_copies_pixels_from_another_device():
    pixels = torch.rand(1, 3, 8, 8, generator=gen())
    assert inversion_key(_OnAnotherDevice(pixels), gen(), "a prompt", 10) == inversion_key(pixels, gen(), "a prompt", 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_image_tensor_inverts():
    ours = ours_for(parts()).to("cuda")
    pixels = torch.rand(1, 3, 32, 32, generator=gen(8)) * 2 - 1
    on_gpu = ours.invert(pixels.cuda(), generator=gen(), **OURS)
    assert on_gpu.key == ours.invert(pixels, generator=gen(), use_cache=False, **OURS).key
