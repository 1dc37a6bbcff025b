"""Implicit masks: the mask math on plain tensors, the attention store, and the pipeline with masks (restored
processors, per-call stores across threads, per-image masks, sizes, errors)."""

import threading

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from sega import EditConcept, SegaPipeline, Stopped
from sega.attention import (
    _ACTIVE_STORE,
    AttentionStore,
    MapRecordingProcessor,
    concept_token_counts,
    quarter_resolution_layers,
    recording_attention,
)
from sega.guidance import concept_directions, keep_top_per_channel
from sega.masks import (
    attention_resolution,
    cross_attention_mask,
    gaussian_kernel_3x3,
    gaussian_smoothing,
    latent_user_mask,
    masked_concept_directions,
    mean_masks,
    noise_mask,
    noise_mask_applies,
    quantile_mask,
    upsample_nearest,
)
from tests.tiny import tiny_components, tiny_mask_components


class AlreadySet:
    def is_set(self) -> bool:
        return True


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Mask math on plain tensors
# ---------------------------------------------------------------------------------------------


def test_attention_resolution_is_two_downsamplings():
    assert attention_resolution(64, 64) == (16, 16)  # SD 1.5 at 512 px
    assert attention_resolution(16, 24) == (4, 6)
    assert attention_resolution(15, 6) == (4, 2)  # 15 -> 8 -> 4, 6 -> 3 -> 2


def test_gaussian_kernel_is_ledits_pp_3x3():
    k = gaussian_kernel_3x3()
    axis = torch.tensor([0.2119, 0.5761, 0.2119])
    torch.testing.assert_close(k[0, 0], axis[:, None] * axis[None, :], rtol=0, atol=1e-4)
    torch.testing.assert_close(k.sum(), torch.tensor(1.0))


def test_gaussian_smoothing_spreads_an_impulse_and_keeps_constants():
    maps = torch.zeros(2, 3, 5, 6)
    maps[1, 2, 2, 3] = 1.0
    out = gaussian_smoothing(maps)
    assert out.shape == maps.shape
    torch.testing.assert_close(out[1, 2, 1:4, 2:5], gaussian_kernel_3x3()[0, 0])
    assert out[0].abs().max() == 0 and out[1, :2].abs().max() == 0  # maps are smoothed independently
    torch.testing.assert_close(gaussian_smoothing(torch.full((1, 4, 4), 3.0)), torch.full((1, 4, 4), 3.0))
    # Reflect padding at the border: a corner impulse keeps the kernel's centre weight and mirrors it.
    corner = torch.zeros(1, 4, 4)
    corner[0, 0, 0] = 1.0
    assert gaussian_smoothing(corner)[0, 0, 0] == pytest.approx(0.5761 ** 2, abs=1e-4)
    # A side of length 1 cannot be reflected: replicated, and a single cell stays as it is.
    torch.testing.assert_close(gaussian_smoothing(torch.full((1, 1, 1), 2.0)), torch.full((1, 1, 1), 2.0))


def test_quantile_mask_keeps_the_top_share_of_each_map():
    values = randn(2, 3, 8, 8)
    mask = quantile_mask(values, torch.tensor([0.75, 0.5]))
    share = mask.mean(dim=(-1, -2))
    torch.testing.assert_close(share[0], torch.full((3,), 0.25), rtol=0, atol=1 / 64)
    torch.testing.assert_close(share[1], torch.full((3,), 0.5), rtol=0, atol=1 / 64)
    for c in range(2):
        for b in range(3):
            kept = mask[c, b].bool()
            assert values[c, b][kept].min() >= values[c, b][~kept].max()
            q = torch.quantile(values[c, b].flatten(), [0.75, 0.5][c])
            assert torch.equal(kept, values[c, b] >= q)
    assert quantile_mask(values, torch.tensor([0.0, 0.0])).min() == 1  # threshold 0 keeps everything


def test_upsample_nearest_repeats_cells():
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).expand(2, 3, 2, 2)
    up = upsample_nearest(mask, (4, 6))
    assert up.shape == (2, 3, 4, 6)
    assert torch.equal(up[0, 0], torch.tensor([[1.0] * 3 + [0.0] * 3] * 2 + [[0.0] * 3 + [1.0] * 3] * 2))


def test_noise_mask_ranks_positions_by_the_channel_sum():
    psi = randn(2, 1, 4, 8, 8)
    mask = noise_mask(psi, torch.tensor([0.9, 0.5]))
    assert mask.shape == (2, 1, 8, 8)
    assert torch.equal(mask, quantile_mask(psi.abs().sum(dim=2), torch.tensor([0.9, 0.5])))


def test_masked_directions_edit_only_inside_the_masks():
    uncond, concepts = randn(2, 4, 8, 8, seed=1), randn(2, 2, 4, 8, 8, seed=2)
    scales, thresholds = torch.tensor([3.0, -2.0]), torch.tensor([0.75, 0.5])
    maps = randn(2, 2, 4, 4, seed=3).abs()
    raw = (concepts - uncond) * scales.view(2, 1, 1, 1, 1)
    psi, mask = masked_concept_directions(uncond, concepts, scales, thresholds, attention_maps=maps)
    assert torch.equal(mask, cross_attention_mask(maps, thresholds, (8, 8)))
    assert torch.equal(psi, raw * mask[:, :, None])  # all channels kept inside, nothing outside
    share = mask.mean(dim=(-1, -2))
    torch.testing.assert_close(share, torch.tensor([[0.25, 0.25], [0.5, 0.5]]), rtol=0, atol=1 / 16)
    # Intersect: inside the attention mask and where the channel-summed |psi| reaches its quantile.
    psi_i, mask_i = masked_concept_directions(uncond, concepts, scales, thresholds, attention_maps=maps,
                                              intersect=True)
    assert torch.equal(mask_i, noise_mask(raw, thresholds) * mask)
    assert (mask_i <= mask).all() and mask_i.sum() < mask.sum()
    assert torch.equal(psi_i, raw * mask_i[:, :, None])
    # While t > 800 the intersect mask is the attention mask alone.
    _, mask_early = masked_concept_directions(uncond, concepts, scales, thresholds, attention_maps=maps,
                                              intersect=True, use_noise_mask=False)
    assert torch.equal(mask_early, mask)
    assert noise_mask_applies(800, 1000) and not noise_mask_applies(801, 1000)


def test_without_attention_maps_the_threshold_is_segas_and_the_user_mask_comes_first():
    uncond, concepts = randn(1, 4, 8, 8, seed=4), randn(2, 1, 4, 8, 8, seed=5)
    scales, thresholds = torch.tensor([3.0, -2.0]), torch.tensor([0.9, 0.5])
    psi, mask = masked_concept_directions(uncond, concepts, scales, thresholds)
    assert mask is None
    assert torch.equal(psi, concept_directions(uncond, concepts, scales, thresholds))
    user = torch.zeros(1, 1, 8, 8)
    user[..., :4] = 1.0
    user[..., 4] = 0.5
    psi_u, _ = masked_concept_directions(uncond, concepts, scales, thresholds, user_mask=user)
    raw = (concepts - uncond) * scales.view(2, 1, 1, 1, 1)
    assert torch.equal(psi_u, keep_top_per_channel(raw * user, thresholds))
    assert psi_u[..., 5:].abs().max() == 0 and psi_u[..., :4].abs().max() > 0


def test_user_masks_at_latent_or_image_size():
    blocks = torch.zeros(1, 8, 8)
    blocks[:, :4, 2:6] = 1.0
    latent = latent_user_mask(blocks, 2, (8, 8), (16, 16))
    assert latent.shape == (2, 1, 8, 8) and torch.equal(latent[1, 0], blocks[0])
    image = blocks.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)  # the same mask at 16x16
    assert torch.equal(latent_user_mask(image, 2, (8, 8), (16, 16)), latent)
    pil = PIL.Image.fromarray((image[0].numpy() * 255).astype(np.uint8))
    assert torch.equal(latent_user_mask(pil, 1, (8, 8), (16, 16)), latent[:1])
    soft = latent_user_mask(np.eye(16, dtype=np.float32), 1, (8, 8), (16, 16))
    torch.testing.assert_close(soft[0, 0], torch.eye(8) * 0.5)  # area-averaged, stays in [0, 1]
    for bad, why in [(torch.ones(3, 8, 8), "B 1 or 2"), (torch.ones(8, 9), "shape"),
                     (torch.full((8, 8), 2.0), "values"), ("everywhere", "str")]:
        with pytest.raises(ValueError, match="user_mask") as err:
            latent_user_mask(bad, 2, (8, 8), (16, 16))
        assert why in str(err.value)


# ---------------------------------------------------------------------------------------------
# The attention store and processor
# ---------------------------------------------------------------------------------------------


def test_token_counts_leave_out_start_end_and_padding():
    tokenizer = tiny_components()["tokenizer"]
    assert concept_token_counts(tokenizer, ["blue", "large blue square", " ".join(["red"] * 40)]) == [1, 3, 14]


def test_the_store_records_the_concepts_own_token_maps_and_the_output_is_the_processors():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=16, heads=2, dim_head=8).eval()
    attn.set_processor(AttnProcessor2_0())
    hidden, context = randn(6, 16, 16, seed=1), randn(6, 10, 16, seed=2)  # segments u, p, c0, c1 of 1 image...
    store = AttentionStore([1, 3], sequence_length=10, latent_size=(16, 16))  # maps at 4x4 = 16 queries
    store.expect(("u", "p", 1, 0, "u", "p"), batch=1)
    wrapped = MapRecordingProcessor(attn.processor)
    with torch.no_grad():
        token = _ACTIVE_STORE.set(store)  # what recording_attention does for the call's thread
        try:
            out = wrapped(attn, hidden, context)
        finally:
            _ACTIVE_STORE.reset(token)
        assert torch.equal(out, AttnProcessor2_0()(attn, hidden, context))  # the layer's own output
        # Classic attention, materialised: (rows * heads, queries, keys).
        q, k = attn.head_to_batch_dim(attn.to_q(hidden)), attn.head_to_batch_dim(attn.to_k(context))
        probs = attn.get_attention_scores(q, k).view(6, 2, 16, 10)
    maps = store.maps([1, 0])
    assert maps.shape == (2, 1, 4, 4)
    torch.testing.assert_close(maps[0, 0].flatten(), probs[2, :, :, 1:4].sum(-1).mean(0))  # concept 1: 3 tokens
    torch.testing.assert_close(maps[1, 0].flatten(), probs[3, :, :, 1:2].sum(-1).mean(0))  # concept 0: 1 token
    with pytest.raises(RuntimeError, match="no cross-attention maps"):
        store.maps([0, 1])  # not this call's concepts
    # Without a store in this context the wrapper is the processor alone, and nothing is recorded.
    store.expect((0,), batch=1)
    assert torch.equal(wrapped(attn, hidden[:1], context[:1]), out[:1])
    with pytest.raises(RuntimeError):
        store.maps([0])


def test_only_the_quarter_size_cross_attention_layers_record():
    unet = tiny_mask_components()["unet"]
    layers = quarter_resolution_layers(unet)
    assert layers == ["down_blocks.2.attentions.0.transformer_blocks.0.attn2.processor",
                      "up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor",
                      "up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor"]
    own = dict(unet.attn_processors)
    with recording_attention(unet, AttentionStore([1], 16, (16, 16))):
        during = unet.attn_processors
        for name, proc in during.items():
            if name in layers:
                assert isinstance(proc, MapRecordingProcessor) and proc.processor is own[name]
            else:
                assert proc is own[name]  # SDPA everywhere else, untouched
    assert all(unet.attn_processors[name] is proc for name, proc in own.items())
    assert quarter_resolution_layers(tiny_components()["unet"]) == []  # two levels: no quarter-size layer


# ---------------------------------------------------------------------------------------------
# The pipeline with masks
# ---------------------------------------------------------------------------------------------


def pipe_for(**kwargs) -> SegaPipeline:
    pipe = SegaPipeline(**tiny_mask_components(**kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


RUN = dict(num_inference_steps=4, height=32, width=32, output_type="latent")
BLUE = [EditConcept("blue", scale=5.0, threshold=0.7, warmup=0), EditConcept("large square", scale=4.0,
                                                                            threshold=0.5, warmup=1)]


def processors(pipe):
    return dict(pipe.unet.attn_processors)


def same_processors(pipe, before):
    return all(pipe.unet.attn_processors[name] is proc for name, proc in before.items())


@pytest.mark.parametrize("mode", ["cross-attention", "intersect"])
def test_generated_images_are_edited_only_inside_the_masks(mode):
    pipe = pipe_for()
    flags = dict(use_cross_attn_mask=mode == "cross-attention", use_intersect_mask=mode == "intersect")
    before = processors(pipe)
    out = pipe("a red circle", concepts=BLUE, **RUN, **flags, edit_momentum_scale=0.0, return_sem_guidance=True,
               generator=gen())
    assert same_processors(pipe, before)
    masks = out.edit_masks
    assert masks.shape == (4, 2, 1, 16, 16)
    assert masks[0, 1].sum() == 0  # concept 1 warms up at step 1: with momentum 0 it is not evaluated at step 0
    for i in range(1, 4):
        union = (masks[i].sum(dim=0) > 0)[:, None].expand(-1, 4, -1, -1)
        edit = out.sem_guidance[i]
        assert edit[~union].abs().max() == 0 and edit[union].abs().max() > 0
        assert 0 < masks[i].mean() < 1
    plain = pipe("a red circle", concepts=BLUE, **RUN, edit_momentum_scale=0.0, generator=gen())
    assert plain.edit_masks is None
    assert (plain.images - out.images).abs().max() > 1e-3  # masks change the edit


def test_masks_work_with_momentum_warmup_and_weights():
    pipe = pipe_for()
    concepts = [EditConcept("blue", scale=5.0, threshold=0.7, warmup=2, weight=2.0),
                EditConcept("square", scale=3.0, threshold=0.6, warmup=2, weight=0.5)]
    kw = dict(concepts=concepts, **RUN, use_intersect_mask=True, return_sem_guidance=True)
    out = pipe("a red circle", generator=gen(), edit_momentum_scale=0.5, edit_mom_beta=0.6, **kw)
    assert out.sem_guidance[0].abs().max() == 0 and out.sem_guidance[1].abs().max() == 0  # warmup
    assert out.edit_masks[:2].sum() > 0  # masks computed during warmup: the momentum builds up from masked edits
    no_momentum = pipe("a red circle", generator=gen(), edit_momentum_scale=0.0, **kw)
    assert (no_momentum.sem_guidance[2] - out.sem_guidance[2]).abs().max() > 1e-4
    # With momentum 0 and every concept warmed up, the edit is the weighted sum of the masked directions:
    # zero outside the union of the masks.
    union = (no_momentum.edit_masks[3].sum(dim=0) > 0)[:, None].expand(-1, 4, -1, -1)
    assert no_momentum.sem_guidance[3][~union].abs().max() == 0


def test_masks_off_keywords_change_nothing_and_the_original_is_the_plain_run():
    pipe = pipe_for()
    kw = dict(concepts=BLUE, **RUN, generator=None)
    a = pipe("a red circle", **{**kw, "generator": gen()}, return_original=True)
    b = pipe("a red circle", **{**kw, "generator": gen()}, return_original=True, use_cross_attn_mask=False,
             use_intersect_mask=False, user_mask=None)
    assert torch.equal(a.images, b.images) and b.edit_masks is None
    c = pipe("a red circle", **{**kw, "generator": gen()}, return_original=True, use_intersect_mask=True)
    assert torch.equal(c.original_images, a.original_images)  # masks touch only the edited run


def test_a_batch_of_two_has_each_images_own_masks():
    """diffusers' LEDITS++ store splits a batch > 1 across images; ours equals each image run alone."""
    pipe = pipe_for()
    latents = randn(2, 4, 16, 16, seed=7)
    kw = dict(concepts=BLUE, **RUN, use_intersect_mask=True, edit_momentum_scale=0.0)
    both = pipe(["a red circle", "a blue triangle"], latents=latents, **kw)
    for b, prompt in enumerate(["a red circle", "a blue triangle"]):
        alone = pipe(prompt, latents=latents[b : b + 1], **kw)
        # UNet kernels round differently at batch 1 and 2, which can flip a position sitting on a quantile:
        # the masks agree almost everywhere, and far more than the two images' masks agree with each other.
        agree = (both.edit_masks[:, :, b] == alone.edit_masks[:, :, 0]).float().mean()
        assert agree > 0.98, agree
        # ... and a flipped position changes the edit there, not the image as a whole.
        assert (both.images[b : b + 1] - alone.images).abs().mean() < 0.01
    assert (both.edit_masks[:, :, 0] == both.edit_masks[:, :, 1]).float().mean() < 0.9


def test_a_latent_that_is_not_a_multiple_of_4():
    """24 px with a 4x VAE: a 6x6 latent, whose quarter-size layer is 2x2 (diffusers' LEDITS++ finds none)."""
    pipe = pipe_for(vae_blocks=3)
    out = pipe("a red circle", concepts=BLUE[:1], **{**RUN, "height": 24, "width": 24}, use_cross_attn_mask=True,
               generator=gen())
    assert out.images.shape == (1, 4, 6, 6) and out.edit_masks.shape == (4, 1, 1, 6, 6)
    cells = out.edit_masks[1, 0, 0]
    assert torch.equal(cells[:3, :3], cells[:1, :1].expand(3, 3))  # 2x2 cells, nearest-upsampled to 6x6
    assert 0 < cells.mean() < 1


def test_an_image_sized_user_mask_equals_the_latent_sized_one():
    pipe = pipe_for()
    latent = torch.zeros(1, 16, 16)
    latent[:, 4:12, :8] = 1.0
    image = latent.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    kw = dict(concepts=BLUE, **RUN, edit_momentum_scale=0.0, return_sem_guidance=True)
    a = pipe("a red circle", generator=gen(), user_mask=latent, **kw)
    b = pipe("a red circle", generator=gen(), user_mask=image, **kw)
    assert torch.equal(a.images, b.images)
    for g in a.sem_guidance:
        assert g[..., latent[0] == 0].abs().max() == 0  # nothing outside the user's mask
    assert a.sem_guidance[-1].abs().max() > 0


def test_processors_come_back_when_the_call_fails_or_is_stopped():
    pipe = pipe_for()
    before = processors(pipe)
    seen = []

    def fail(p, i, t, tensors):
        seen.append(sum(isinstance(x, MapRecordingProcessor) for x in p.unet.attn_processors.values()))
        raise KeyboardInterrupt("stopped by the user")

    with pytest.raises(KeyboardInterrupt):
        pipe("a red circle", concepts=BLUE, **RUN, use_cross_attn_mask=True, callback_on_step_end=fail,
             generator=gen())
    assert seen == [3] and same_processors(pipe, before)

    with pytest.raises(Stopped):
        pipe("a red circle", concepts=BLUE, **RUN, use_intersect_mask=True, stop=AlreadySet(), generator=gen())
    assert same_processors(pipe, before)
    # A user's own processors are kept (and wrapped on the recording layers only during the call).
    pipe.unet.set_attn_processor(AttnProcessor())
    classic = processors(pipe)
    pipe("a red circle", concepts=BLUE, **RUN, use_cross_attn_mask=True, generator=gen())
    assert same_processors(pipe, classic)


def test_bad_mask_arguments_name_the_field():
    pipe = pipe_for()
    with pytest.raises(ValueError, match="use_cross_attn_mask"):
        pipe("a red circle", editing_prompt_embeddings=randn(1, 16, 16), **RUN, use_cross_attn_mask=True)
    with pytest.raises(ValueError, match="use_intersect_mask"):
        pipe("a red circle", concepts=BLUE, **RUN, use_intersect_mask="yes")
    with pytest.raises(ValueError, match="user_mask"):
        pipe("a red circle", concepts=BLUE, **RUN, user_mask=torch.ones(1, 5, 5))
    flat = SegaPipeline(**tiny_components())
    flat.set_progress_bar_config(disable=True)
    before = processors(flat)
    with pytest.raises(ValueError, match="use_cross_attn_mask .*quarter|two downsamplings"):
        flat("a red circle", concepts=BLUE, **{**RUN, "height": 16, "width": 16}, use_cross_attn_mask=True)
    assert same_processors(flat, before)


@pytest.mark.parametrize("second", ["intersect", "none"], ids=["both masked", "one masked"])
def test_concurrent_calls_do_not_share_maps(second):
    """Two calls in two threads on one pipeline, interleaved by construction: after each UNet call a barrier
    waits for the other thread's UNet call, so both have run their UNet before either computes its masks (a
    shared store would hand one call the other's maps). The short call (3 steps) ends first; the long one's
    4th step waits for it, so its last steps run after the first call has left (its maps must still come)."""
    pipe = pipe_for()
    a_kw = dict(concepts=[EditConcept("blue", scale=5.0, threshold=0.7, warmup=0)], use_cross_attn_mask=True,
                **{**RUN, "num_inference_steps": 3}, edit_momentum_scale=0.0)
    b_kw = dict(concepts=[EditConcept("large", scale=4.0, threshold=0.5, warmup=0),
                          EditConcept("green", scale=3.0, threshold=0.8, warmup=0)],
                use_intersect_mask=second == "intersect", **{**RUN, "num_inference_steps": 5})
    a_alone = pipe("a red circle", generator=gen(1), **a_kw)
    b_alone = pipe("a blue triangle on white background", generator=gen(2), **b_kw)
    before = processors(pipe)

    barrier, a_done, calls, results = threading.Barrier(2, timeout=120), threading.Event(), threading.local(), {}

    def after_unet(module, args, output):
        calls.n = getattr(calls, "n", 0) + 1
        if calls.n <= 3:
            barrier.wait()
        elif calls.n == 4:
            assert a_done.wait(timeout=120)

    def run(name, prompt, seed, kw):
        try:
            results[name] = pipe(prompt, generator=gen(seed), **kw)
        except BaseException as e:  # noqa: BLE001 - reported below
            results[name] = e
            barrier.abort()
        finally:
            if name == "a":
                a_done.set()

    hook = pipe.unet.register_forward_hook(after_unet)
    try:
        threads = [threading.Thread(target=run, args=("a", "a red circle", 1, a_kw)),
                   threading.Thread(target=run, args=("b", "a blue triangle on white background", 2, b_kw))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        hook.remove()
    assert not isinstance(results["a"], BaseException), results["a"]
    assert not isinstance(results["b"], BaseException), results["b"]
    assert torch.equal(results["a"].edit_masks, a_alone.edit_masks)
    torch.testing.assert_close(results["a"].images, a_alone.images, rtol=0, atol=1e-6)
    if second == "intersect":
        assert torch.equal(results["b"].edit_masks, b_alone.edit_masks)
    else:
        assert results["b"].edit_masks is None
    torch.testing.assert_close(results["b"].images, b_alone.images, rtol=0, atol=1e-6)
    assert same_processors(pipe, before)


def test_mean_masks_average_the_steps_each_concept_is_applied():
    masks = torch.zeros(5, 2, 1, 2, 2)
    masks[:, 0, 0, 0, 0] = 1.0  # concept 0: always this cell
    masks[1:3, 1, 0, 1, 1] = 1.0  # concept 1: this cell at steps 1 and 2
    masks[4, 1] = 1.0  # ... and everything at step 4, after its cooldown

    mean = mean_masks(masks, warmup=[0, 1], cooldown=[None, 4])
    assert torch.equal(mean[0, 0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(mean[1, 0], torch.tensor([[0.0, 0.0], [0.0, 2 / 3]]))
    assert mean_masks(masks, warmup=[5, 9], cooldown=[None, None]).abs().max() == 0  # never applied
