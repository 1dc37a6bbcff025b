"""SegaPipeline against the deprecated SemanticStableDiffusionPipeline and StableDiffusionPipeline (oracles)."""

import logging
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from sega import EditConcept, SegaPipeline, Stopped
from tests.tiny import tiny_components

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from diffusers.pipelines.deprecated.semantic_stable_diffusion.pipeline_semantic_stable_diffusion import (
        SemanticStableDiffusionPipeline,
    )

TOL = 1e-4
STEPS = 6


def pipes(scheduler="ddim"):
    parts = tiny_components(scheduler)
    ref = SemanticStableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    ours = SegaPipeline(**parts)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    return ref, ours


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


THREE = dict(
    editing_prompt=["blue", "square", "large"],
    reverse_editing_direction=[False, True, False],
    edit_guidance_scale=[5.0, 4.0, 6.0],
    edit_threshold=[0.9, 0.5, 0.8],
)

CASES = {
    "no concepts": {},
    "one concept": dict(editing_prompt="blue", edit_guidance_scale=6.0, edit_warmup_steps=2, edit_threshold=0.8),
    "three, mixed warmups": dict(THREE, edit_warmup_steps=[2, 3, 1]),
    "three, cooldowns and weights": dict(THREE, edit_warmup_steps=[1, 1, 2], edit_cooldown_steps=[100, 4, 5],
                                         edit_weights=[1.0, 2.0, 0.5]),
    "momentum off": dict(THREE, edit_warmup_steps=[2, 3, 1], edit_momentum_scale=0.0),
    "momentum on, no warmup": dict(THREE, edit_warmup_steps=0, edit_momentum_scale=0.5, edit_mom_beta=0.6),
    "reverse all": dict(editing_prompt=["red", "circle"], reverse_editing_direction=True, edit_warmup_steps=1),
    "negative weight": dict(THREE, edit_warmup_steps=[1, 2, 2], edit_weights=[1.0, -1.0, 2.0]),
}


# The fast tier checks every case on DDIM; the multistep and Euler schedulers run in the whole suite.
EVERY_SCHEDULER = ["ddim", pytest.param("dpm", marks=pytest.mark.slow), pytest.param("euler", marks=pytest.mark.slow)]


@pytest.mark.parametrize("scheduler", EVERY_SCHEDULER)
@pytest.mark.parametrize("case", list(CASES))
def test_latents_match_deprecated_pipeline(scheduler, case):
    ref, ours = pipes(scheduler)
    kw = dict(prompt="a red circle", num_inference_steps=STEPS, guidance_scale=7.0, output_type="latent", **CASES[case])
    want = ref(**kw, generator=gen()).images
    got = ours(**kw, generator=gen()).images
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    # The same run with the original computed alongside gives the same edited latents.
    both = ours(**kw, generator=gen(), return_original=True)
    torch.testing.assert_close(both.images, want, rtol=0, atol=TOL)


@pytest.mark.parametrize(
    "extra",
    [
        dict(num_images_per_prompt=2),
        dict(prompt=["a red circle", "a small green square"]),
        dict(negative_prompt="black background"),
        dict(prompt=["a red circle", "a green square"], negative_prompt=["white", "large"], num_images_per_prompt=2),
    ],
    ids=["2 images per prompt", "two prompts", "negative prompt", "all of them"],
)
def test_batching_matches_deprecated_pipeline(extra):
    ref, ours = pipes("dpm")
    kw = dict(prompt="a red circle", num_inference_steps=STEPS, guidance_scale=6.0, output_type="latent",
              **dict(THREE, edit_warmup_steps=[1, 2, 1]))
    kw.update(extra)
    want = ref(**kw, generator=gen(3)).images
    got = ours(**kw, generator=gen(3)).images
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)


def test_sem_guidance_replay_matches_deprecated_pipeline():
    ref, ours = pipes("ddim")
    kw = dict(prompt="a red circle", num_inference_steps=STEPS, guidance_scale=7.0, output_type="latent")
    ref(**kw, generator=gen(), editing_prompt="blue", edit_warmup_steps=1)
    recorded = list(ref.sem_guidance[:STEPS])
    want = ref(**kw, generator=gen(), sem_guidance=recorded).images
    got = ours(**kw, generator=gen(), sem_guidance=recorded).images
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    # Our own recorded guidance replays to the edited image.
    edited = ours(**kw, generator=gen(), editing_prompt="blue", edit_warmup_steps=1, return_sem_guidance=True)
    replay = ours(**kw, generator=gen(), sem_guidance=edited.sem_guidance).images
    torch.testing.assert_close(replay, edited.images, rtol=0, atol=TOL)


def test_editing_prompt_embeddings_match():
    ref, ours = pipes("euler")
    emb = ours.encode_text(["blue", "square"])
    kw = dict(prompt="a red circle", num_inference_steps=STEPS, guidance_scale=7.0, output_type="latent",
              editing_prompt_embeddings=emb, edit_warmup_steps=1, reverse_editing_direction=[False, True])
    torch.testing.assert_close(ours(**kw, generator=gen()).images, ref(**kw, generator=gen()).images,
                               rtol=0, atol=TOL)


def test_edit_concepts_equal_keyword_api():
    _, ours = pipes("ddim")
    kw = dict(prompt="a red circle", num_inference_steps=STEPS, guidance_scale=7.0, output_type="latent")
    by_keywords = ours(**kw, generator=gen(), editing_prompt=["blue", "square"], reverse_editing_direction=[False, True],
                       edit_guidance_scale=[5.0, 3.0], edit_threshold=[0.9, 0.7], edit_warmup_steps=[1, 2],
                       edit_cooldown_steps=[100, 5], edit_weights=[1.0, 0.5]).images
    concepts = [EditConcept("blue", scale=5.0, threshold=0.9, warmup=1),
                EditConcept("square", scale=3.0, threshold=0.7, warmup=2, cooldown=5, reverse=True, weight=0.5)]
    by_concepts = ours(**kw, generator=gen(), concepts=concepts).images
    assert torch.equal(by_keywords, by_concepts)
    dicts = ours(**kw, generator=gen(), concepts=[vars(c) for c in concepts]).images
    assert torch.equal(dicts, by_concepts)


@pytest.mark.parametrize("scheduler", EVERY_SCHEDULER)
def test_original_equals_plain_stable_diffusion(scheduler):
    parts = tiny_components(scheduler)
    sd = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    ours = SegaPipeline(**parts)
    kw = dict(prompt="a red circle", num_inference_steps=STEPS, guidance_scale=7.0, output_type="np",
              negative_prompt="white")
    plain = sd(**kw, generator=gen(5)).images
    out = ours(**kw, generator=gen(5), concepts=[EditConcept("blue", scale=8, threshold=0.5, warmup=2)],
               return_original=True)
    np.testing.assert_allclose(out.original_images, plain, rtol=0, atol=TOL)
    assert np.abs(out.images - plain).max() > 1e-3  # the edit changed the image
    # One UNet call per step; the pair shares it until warmup: 2 steps of [u, p, concept] (momentum
    # builds up), then [u, p] for each run + the concept.
    assert out.unet_calls == STEPS
    assert out.unet_samples == 2 * 3 + (STEPS - 2) * 5


def test_stochastic_scheduler_original_is_a_separate_run():
    """With eta > 0 the plain run gets its own copy of the random stream at the split."""
    parts = tiny_components("ddim")
    sd = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    ours = SegaPipeline(**parts)
    kw = dict(prompt="a red circle", num_inference_steps=STEPS, guidance_scale=7.0, output_type="np", eta=1.0)
    out = ours(**kw, generator=gen(2), concepts=[EditConcept("blue", warmup=2)], return_original=True)
    np.testing.assert_allclose(out.original_images, sd(**kw, generator=gen(2)).images, rtol=0, atol=TOL)


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_the_same_pair_call_gives_the_same_bits_whatever_ran_before(scheduler):
    """``return_original=True``: one UNet call per step for both images, and the same call gives the very same
    pair, bit for bit, cold and after other calls filled the caches (another prompt and seed; the same prompt
    and seed with other concepts)."""
    _, ours = pipes(scheduler)
    base = dict(prompt="a red circle", num_inference_steps=STEPS, guidance_scale=7.0, output_type="np",
                edit_momentum_scale=0.3)
    pair = dict(base, return_original=True)
    concepts = [EditConcept("blue", scale=6, warmup=2), EditConcept("red", reverse=True, warmup=3)]

    cold = ours(**pair, generator=gen(4), concepts=concepts)
    assert cold.unet_calls == STEPS  # one pass: both images in one UNet call per step
    # [u, p] + both concepts while the edits warm up (momentum needs them), then the run without edits too.
    assert cold.unet_samples == 2 * 4 + (STEPS - 2) * 6
    assert np.abs(cold.images - cold.original_images).max() > 1e-3  # the edit really changed something

    ours(**{**pair, "prompt": "a blue square"}, generator=gen(5), concepts=[EditConcept("large", warmup=1)])
    other = ours(**pair, generator=gen(4), concepts=concepts)
    ours(**pair, generator=gen(4), concepts=[EditConcept("square", warmup=1)])
    same_prompt = ours(**pair, generator=gen(4), concepts=concepts)
    for warm in (other, same_prompt):
        assert warm.unet_calls == cold.unet_calls and warm.unet_samples == cold.unet_samples
        np.testing.assert_array_equal(warm.images, cold.images)
        np.testing.assert_array_equal(warm.original_images, cold.original_images)

    # The same meaning as the edited image alone and the plain run (to float round-off: other batch sizes).
    alone = ours(**base, generator=gen(4), concepts=concepts)
    plain = ours(**base, generator=gen(4))
    np.testing.assert_allclose(cold.images, alone.images, atol=TOL)
    np.testing.assert_allclose(cold.original_images, plain.images, atol=TOL)


def test_an_empty_concept_list_is_a_plain_run():
    _, ours = pipes("ddim")
    kw = dict(prompt="a red circle", num_inference_steps=STEPS, guidance_scale=7.0, output_type="latent")
    out = ours(**kw, generator=gen(), concepts=[], return_original=True)
    torch.testing.assert_close(out.images, ours(**kw, generator=gen()).images, rtol=0, atol=0)
    torch.testing.assert_close(out.original_images, out.images, rtol=0, atol=0)


def test_a_half_precision_text_encoder_with_a_float32_unet():
    """transformers keeps a checkpoint's float16 where diffusers loads float32: the call still works."""
    _, ours = pipes("ddim")
    kw = dict(prompt="a red circle", num_inference_steps=STEPS, guidance_scale=7.0, output_type="latent",
              concepts=[EditConcept("blue", warmup=1)])
    full = ours(**kw, generator=gen()).images
    ours.text_encoder.to(torch.float16)
    half = ours(**kw, generator=gen()).images
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0, atol=5e-2)


def test_guidance_scale_one_applies_edits_with_a_warning(caplog):
    _, ours = pipes("ddim")
    kw = dict(prompt="a red circle", num_inference_steps=STEPS, guidance_scale=1.0, output_type="latent")
    plain = ours(**kw, generator=gen()).images
    with caplog.at_level(logging.WARNING):
        edited = ours(**kw, generator=gen(), concepts=[EditConcept("blue", scale=10, warmup=0)]).images
    assert (edited - plain).abs().max() > 1e-3
    assert "guidance_scale" in caplog.text


def test_callbacks_and_stop():
    _, ours = pipes("euler")
    seen, legacy = [], []
    stop = threading.Event()

    def on_step_end(pipe, i, t, tensors):
        seen.append((i, tensors["latents"].shape))
        if i == 2:
            stop.set()
        return {}

    with pytest.raises(Stopped, match="after 3 of"):
        ours("a red circle", num_inference_steps=STEPS, output_type="latent", generator=gen(), stop=stop,
             callback_on_step_end=on_step_end, callback=lambda i, t, z: legacy.append(i), callback_steps=2)
    assert [i for i, _ in seen] == [0, 1, 2]
    assert legacy == [0, 2]


def test_two_concurrent_calls_stop_independently():
    """A stop is per call: stopping one call on a pipeline leaves another call on it running."""
    _, ours = pipes("ddim")
    stop_a, stop_b, both_started = threading.Event(), threading.Event(), threading.Barrier(2)
    results = {}

    def run(name, stop):
        def on_step_end(pipe, i, t, tensors):
            if i == 0:
                both_started.wait(timeout=30)
                if name == "a":
                    stop_a.set()
            return {}

        try:
            results[name] = ours("a red circle", num_inference_steps=STEPS, output_type="latent", generator=gen(),
                                 stop=stop, callback_on_step_end=on_step_end).images
        except Stopped as exc:
            results[name] = exc

    threads = [threading.Thread(target=run, args=args) for args in (("a", stop_a), ("b", stop_b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert isinstance(results["a"], Stopped)
    alone = ours("a red circle", num_inference_steps=STEPS, output_type="latent", generator=gen()).images
    torch.testing.assert_close(results["b"], alone)


def test_threads_tokenizing_at_once_each_get_their_own_padding():
    """transformers' fast tokenizers set padding per call on the shared tokenizer: without the library's lock,
    threads switching every microsecond got unpadded rows here about one call in ten (the app's concurrent
    requests failed with "Sizes of tensors must match")."""
    from sega.attention import concept_token_counts

    _, ours = pipes("ddim")
    texts = ["blue", "a large red circle on a white background", "red", "green square"]
    expected = {t: (ours.token_ids(t, ours.tokenizer), concept_token_counts(ours.tokenizer, [t])) for t in texts}
    wrong = []

    def work(text):
        for _ in range(150):
            ids, count = ours.token_ids(text, ours.tokenizer), concept_token_counts(ours.tokenizer, [text])
            if not torch.equal(ids, expected[text][0]) or count != expected[text][1]:
                wrong.append(text)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(t,)) for t in texts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert wrong == []


def test_save_and_load_local_folder(tmp_path):
    _, ours = pipes("ddim")
    ours.save_pretrained(tmp_path / "model")
    loaded = SegaPipeline.from_pretrained(tmp_path / "model", dtype=torch.float32)
    loaded.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red circle", num_inference_steps=3, output_type="latent", concepts=[EditConcept("blue", warmup=1)])
    assert torch.equal(loaded(**kw, generator=gen()).images, ours(**kw, generator=gen()).images)


def test_bad_arguments_name_the_field():
    _, ours = pipes("ddim")
    with pytest.raises(ValueError, match="height and width"):
        ours("x", height=30, num_inference_steps=2)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours("x", num_inference_steps=0)
    with pytest.raises(ValueError, match="edit_guidance_scale"):
        ours("x", num_inference_steps=2, editing_prompt=["a", "b"], edit_guidance_scale=[1.0])
    with pytest.raises(ValueError, match="threshold"):
        ours("x", num_inference_steps=2, concepts=[{"prompt": "blue", "threshold": 1.5}])


def _halve_at_step_1(pipe, i, t, tensors):
    return {"latents": tensors["latents"] * 0.5} if i == 1 else tensors


def test_a_callback_that_replaces_latents_changes_only_the_edited_run():
    """Before the runs split (warmup 3), a callback's latents must not leak into the run without edits."""
    _, ours = pipes("ddim")
    kw = dict(prompt="a red circle", num_inference_steps=STEPS, guidance_scale=7.0, output_type="latent",
              return_original=True)
    blue = [EditConcept("blue", warmup=3)]
    clean = ours(**kw, generator=gen(), concepts=blue)
    changed = ours(**kw, generator=gen(), concepts=blue, callback_on_step_end=_halve_at_step_1)
    assert (changed.images - clean.images).abs().max() > 1e-2  # the callback did change the edited run
    torch.testing.assert_close(changed.original_images, clean.original_images, rtol=0, atol=TOL)
    alone = ours(**{**kw, "return_original": False}, generator=gen())
    torch.testing.assert_close(changed.original_images, alone.images, rtol=0, atol=TOL)


def test_the_pair_calls_the_callbacks_once_per_step_with_the_edited_run():
    _, ours = pipes("ddim")
    kw = dict(prompt="a red circle", num_inference_steps=STEPS, guidance_scale=7.0, output_type="latent",
              return_original=True, concepts=[EditConcept("blue", warmup=2)])
    steps, latents, legacy = [], [], []

    def on_step_end(pipe, i, t, tensors):
        steps.append(i)
        latents.append(tensors["latents"])
        return tensors

    out = ours(**kw, generator=gen(), callback_on_step_end=on_step_end, callback=lambda i, t, z: legacy.append(i))
    assert steps == list(range(STEPS)) and legacy == list(range(STEPS))
    assert torch.equal(latents[-1], out.images)  # the callbacks see the edited run


def test_a_stop_ends_a_pair_call_after_the_runs_split():
    _, ours = pipes("ddim")
    steps = []
    stop = threading.Event()

    def stop_after_two(pipe, i, t, tensors):
        steps.append(i)
        if i == 1:
            stop.set()
        return tensors

    kw = dict(prompt="a red circle", num_inference_steps=STEPS, guidance_scale=7.0, output_type="latent",
              return_original=True, concepts=[EditConcept("blue", warmup=1)])
    with pytest.raises(Stopped, match="after 2 of"):
        ours(**kw, generator=gen(), callback_on_step_end=stop_after_two, stop=stop)
    assert steps == [0, 1]
