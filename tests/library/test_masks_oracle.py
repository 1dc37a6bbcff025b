"""Implicit masks against diffusers' LEditsPPPipelineStableDiffusion (the oracle), on the same tiny components.

Where the methods coincide: fp32, batch 1, momentum 0, every concept warmed up from step 0, weights equal, no
cooldown; with a cross-attention or intersect mask (which replace SEGA's per-channel threshold in both), or with
a user mask alone at threshold 0 (without implicit masks LEDITS++ ranks |psi| summed over channels and SEGA
ranks each channel on its own: the same only when nothing is dropped). Then, per step, our ``edit_masks`` equal
its ``activation_mask``, our edit term its ``sem_guidance``, and the final latents agree within 1e-4.

Known differences, handled here and in the README:
- diffusers 0.42.1 counts a concept's tokens with the tokenizer's ``length``, which transformers 5's fast
  tokenizers report *after* padding: every concept's map sums every position up to the end, padding
  included (:func:`test_the_oracle_counts_padding_as_concept_tokens`). That is a bug; :func:`ledits_for_masks`
  patches the oracle to count the concept's own tokens, as we do.
- its ``guidance_rescale > 0`` crashes (a tuple where a tensor is expected), so it is not compared; we have
  no ``guidance_rescale``.
- duplicate concept texts share the first one's map (``list.index``); the UNet rows of identical texts are
  identical, so their maps are the same anyway: no observable difference.
- at batch > 1 its attention store splits the batch across images (the maps mix images); ours are per image
  (tests/library/test_masks.py: a batch of two equals each image alone).
- its store finds no map when the latent is not a multiple of 4 (it compares query lengths with (H/4)(W/4));
  ours takes the layer two downsamplings below, ceil(ceil(H/2)/2) (tests/library/test_masks.py).
"""

import pytest
import torch

from sega import SegaPipeline
from tests.library.test_inversion import gen, ledits_for, photo, sd_ddim
from tests.tiny import tiny_mask_components

TOL = 1e-4
# 8 performed steps from t = 876 (skip 0): step 0 is above t = 800, where the intersect mask is the
# cross-attention mask alone; the others below.
OURS = dict(num_inference_steps=8, skip=0.0)
LEDITS = dict(num_inversion_steps=8, skip=0.0)
# Concepts of 1 and 2 tokens (a 16-token tokenizer: 14 positions between start and end).
# Moderate scales: the latents stay near 3, where the float rounding of two UNet implementations (classic
# attention there, SDPA here) stays near 5e-5 after 8 steps (scales 5 and 4: about 1e-4).
EDIT = dict(editing_prompt=["blue", "large square"], edit_guidance_scale=[3.0, 2.0], edit_threshold=[0.7, 0.5],
            reverse_editing_direction=[False, True], edit_warmup_steps=0)


def parts():
    return {**tiny_mask_components("ddim"), "scheduler": sd_ddim()}


def concept_tokens(tokenizer, texts):
    return torch.tensor([len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts])


def ledits_for_masks(components):
    """The oracle, with its token count fixed: the concept's own tokens, not the padded length."""
    pipe = ledits_for(components)
    encode_prompt = pipe.encode_prompt

    def encode_with_token_counts(*args, **kwargs):
        edit, uncond, n = encode_prompt(*args, **kwargs)
        if n is not None:
            n = concept_tokens(pipe.tokenizer, kwargs["editing_prompt"])
        return edit, uncond, n

    pipe.encode_prompt = encode_with_token_counts
    return pipe


def user_mask():
    """A soft latent-sized mask: the top half full, a diagonal band at 0.5, the rest off."""
    m = torch.zeros(1, 1, 16, 16)
    m[..., :8, :] = 1.0
    idx = torch.arange(16)
    m[0, 0, idx, idx] = torch.maximum(m[0, 0, idx, idx], torch.tensor(0.5))
    return m


MODES = {
    "cross-attention": dict(use_cross_attn_mask=True, use_intersect_mask=False),
    "intersect": dict(use_cross_attn_mask=False, use_intersect_mask=True),
    "user mask and cross-attention": dict(use_cross_attn_mask=True, use_intersect_mask=False, user_mask=True),
    "user mask and intersect": dict(use_intersect_mask=True, user_mask=True),
    "user mask alone, threshold 0": dict(use_cross_attn_mask=False, use_intersect_mask=False, user_mask=True,
                                         edit_threshold=0.0),
}


@pytest.mark.parametrize("concepts", [1, 2], ids=["one concept", "two concepts"])
@pytest.mark.parametrize("mode", list(MODES))
def test_masks_and_edits_equal_ledits_pp_step_by_step(mode, concepts):
    settings = dict(MODES[mode])
    if settings.pop("user_mask", False):
        settings["user_mask"] = user_mask()
    edit = {k: v[:concepts] if isinstance(v, list) else v for k, v in EDIT.items()}
    edit.update({k: settings.pop(k)[:concepts] if isinstance(settings[k], list) else settings.pop(k)
                 for k in ("edit_threshold", "edit_guidance_scale") if k in settings})
    components = parts()
    ours, ledits = SegaPipeline(**components), ledits_for_masks(components)
    ours.set_progress_bar_config(disable=True)
    inv = ours.invert(photo(8), generator=gen(), **OURS)
    ledits.invert(photo(8), generator=gen(), **LEDITS)
    want = ledits(**edit, **settings, output_type="latent").images
    got = ours("", inversion=inv, **edit, **settings, edit_momentum_scale=0.0, return_sem_guidance=True,
               output_type="latent")

    steps = len(inv.timesteps)
    assert ledits.sem_guidance.shape[0] == steps == len(got.sem_guidance)
    for i in range(steps):
        torch.testing.assert_close(got.sem_guidance[i], ledits.sem_guidance[i], rtol=0, atol=TOL,
                                   msg=lambda m, i=i: f"step {i}: {m}")
    implicit = settings.get("use_cross_attn_mask") or settings.get("use_intersect_mask")
    if implicit:
        theirs = ledits.activation_mask  # (steps, C, B, ch, H, W), the same for every channel
        assert got.edit_masks.shape == (steps, concepts, 1, 16, 16)
        for ch in range(theirs.shape[3]):
            assert torch.equal(got.edit_masks, theirs[:, :, :, ch]), f"channel {ch}"
        kept = got.edit_masks.mean(dim=(-1, -2))
        assert (kept > 0).all() and (kept < 1).all()  # a real mask at every step
        if settings.get("use_intersect_mask"):
            # Above t = 800 the cross-attention mask alone (a multiple of 4x4 cells); below it intersected.
            assert inv.timesteps[0] > 800 >= inv.timesteps[1]
            cells = got.edit_masks[0].unflatten(-1, (4, 4)).unflatten(-3, (4, 4))
            assert torch.equal(cells.amin(dim=(-1, -3)), cells.amax(dim=(-1, -3)))
            assert (kept[1:] < kept[0]).any()
    else:
        assert got.edit_masks is None
    torch.testing.assert_close(got.images, want, rtol=0, atol=TOL)
    assert (got.images - inv.image_latents).abs().max() > 1e-2  # the edit changed the image


def test_the_oracle_counts_padding_as_concept_tokens():
    """Why ledits_for_masks patches the oracle: diffusers 0.42.1 takes ``text_inputs.length - 2`` as a
    concept's token count, and transformers 5's fast tokenizer counts the padding in ``length``."""
    components = parts()
    ledits = ledits_for(components)
    ledits.batch_size = 1  # what invert sets
    _, _, n = ledits.encode_prompt(editing_prompt=["blue", "large square"], device="cpu", num_images_per_prompt=1,
                                   enable_edit_guidance=True, editing_prompt_embeds=None)
    limit = components["tokenizer"].model_max_length - 2
    assert n.tolist() == [limit, limit]  # every position up to the end, padding included
    assert concept_tokens(components["tokenizer"], ["blue", "large square"]).tolist() == [1, 2]


def test_the_oracle_crashes_with_guidance_rescale():
    """Not compared: diffusers 0.42.1's LEDITS++ takes the mean of a tuple of estimates for guidance_rescale."""
    components = parts()
    ledits = ledits_for_masks(components)
    ledits.invert(photo(8), generator=gen(), num_inversion_steps=2, skip=0.0)
    with pytest.raises(AttributeError, match="tuple"):
        ledits(editing_prompt=["blue"], edit_warmup_steps=0, guidance_rescale=0.5, output_type="latent")
