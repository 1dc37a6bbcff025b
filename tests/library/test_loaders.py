"""The library as diffusers users use it: LoRAs, textual inversion and embeddings, against
StableDiffusionPipeline and StableDiffusionXLPipeline with the same components (oracles).

The LoRAs are made here with peft, as diffusers' own LoRA tests make them: random (non-zero) adapter weights on
the UNet's attention projections and the CLIP text encoder's, saved with diffusers' ``save_lora_weights``.
transformers 5's ``add_adapter`` asks for peft >= 0.22, which is not released; peft's
``inject_adapter_in_model`` adds the same layers without that check.
"""

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from sega import EditConcept, SegaPipeline, SegaXLPipeline
from tests.tiny import tiny_components, tiny_xl_components

TOL = 1e-4
STEPS = 3
PROMPT = "a red circle"


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_pair(components=None):
    components = components or tiny_components("ddim")
    ours = quiet(SegaPipeline(**copy.deepcopy(components)))
    ref = quiet(StableDiffusionPipeline(**copy.deepcopy(components), safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False))
    # StableDiffusionPipeline rewrites an old scheduler config (steps_offset=1, clip_sample=False): the same here.
    ours.scheduler = copy.deepcopy(ref.scheduler)
    return ours, ref


@pytest.fixture(scope="module")
def sd_lora(tmp_path_factory) -> str:
    """A folder with a random LoRA for the tiny SD components (UNet and text encoder), in diffusers' format."""
    folder = tmp_path_factory.mktemp("lora")
    parts = tiny_components("ddim")
    torch.manual_seed(1)
    parts["unet"].add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
                            parts["text_encoder"])
    StableDiffusionPipeline.save_lora_weights(
        str(folder), unet_lora_layers=get_peft_model_state_dict(parts["unet"]),
        text_encoder_lora_layers=get_peft_model_state_dict(parts["text_encoder"]), safe_serialization=True)
    return str(folder)


def latents_of(pipe, **kw):
    return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=7.0, output_type="latent", generator=gen(),
                **kw).images


def test_a_lora_gives_what_stable_diffusion_gives_with_it(sd_lora):
    ours, ref = sd_pair()
    plain = latents_of(ours)
    for pipe in (ours, ref):
        pipe.load_lora_weights(sd_lora)
    with_lora = latents_of(ours)
    torch.testing.assert_close(with_lora, latents_of(ref), rtol=0, atol=TOL)
    assert (with_lora - plain).abs().max() > 1e-3  # the LoRA changes the image, and the cache did not hide it
    half = {"cross_attention_kwargs": {"scale": 0.5}}
    torch.testing.assert_close(latents_of(ours, **half), latents_of(ref, **half), rtol=0, atol=TOL)
    assert (latents_of(ours, **half) - with_lora).abs().max() > 1e-4


def test_fuse_and_unload_give_what_stable_diffusion_gives(sd_lora):
    ours, ref = sd_pair()
    before = latents_of(ours)
    for pipe in (ours, ref):
        pipe.load_lora_weights(sd_lora, adapter_name="style")
        pipe.fuse_lora(lora_scale=0.7)
    torch.testing.assert_close(latents_of(ours), latents_of(ref), rtol=0, atol=TOL)
    for pipe in (ours, ref):
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
    torch.testing.assert_close(latents_of(ours), before, rtol=0, atol=TOL)
    torch.testing.assert_close(latents_of(ref), before, rtol=0, atol=TOL)


def test_set_adapters_weights_reach_the_image(sd_lora):
    ours, ref = sd_pair()
    for pipe in (ours, ref):
        pipe.load_lora_weights(sd_lora, adapter_name="style")
        pipe.set_adapters(["style"], adapter_weights=[0.3])
    torch.testing.assert_close(latents_of(ours), latents_of(ref), rtol=0, atol=TOL)


def test_the_concepts_go_through_the_lora_d_model_too(sd_lora):
    """With concepts, a LoRA changes the image with edits as it changes the image without edits."""
    ours, _ = sd_pair()
    kw = dict(concepts=[EditConcept("blue", scale=6, warmup=0, threshold=0.5)], return_original=True)
    out = ours(PROMPT, num_inference_steps=STEPS, output_type="latent", generator=gen(), **kw)
    ours.load_lora_weights(sd_lora)
    lora = ours(PROMPT, num_inference_steps=STEPS, output_type="latent", generator=gen(), **kw)
    # The original still equals a plain LoRA'd run (the shared pair), and both images changed.
    plain = ours(PROMPT, num_inference_steps=STEPS, output_type="latent", generator=gen()).images
    torch.testing.assert_close(lora.original_images, plain, rtol=0, atol=TOL)
    assert (lora.images - out.images).abs().max() > 1e-3
    assert (lora.original_images - out.original_images).abs().max() > 1e-3


def test_a_textual_inversion_token_works_as_in_stable_diffusion():
    ours, ref = sd_pair()
    dim = ours.text_encoder.config.hidden_size
    torch.manual_seed(3)
    embedding = {"<shiny>": torch.randn(dim)}
    for pipe in (ours, ref):
        pipe.load_textual_inversion(embedding, token="<shiny>")
    prompt = "a <shiny> circle"
    got = ours(prompt, num_inference_steps=STEPS, output_type="latent", generator=gen()).images
    want = ref(prompt, num_inference_steps=STEPS, output_type="latent", generator=gen()).images
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    # The token also works in a concept, and changes the edit.
    edit = [EditConcept("<shiny>", scale=6, warmup=0, threshold=0.5)]
    other = [EditConcept("blue", scale=6, warmup=0, threshold=0.5)]
    run = ours("a circle", num_inference_steps=STEPS, output_type="latent", generator=gen(), concepts=edit)
    baseline = ours("a circle", num_inference_steps=STEPS, output_type="latent", generator=gen(), concepts=other)
    assert (run.images - baseline.images).abs().max() > 1e-3


def test_prompt_embeds_and_negative_prompt_embeds_as_in_stable_diffusion():
    ours, ref = sd_pair()
    prompt_embeds, negative = ref.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="blue")
    kw = dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative, num_inference_steps=STEPS,
              guidance_scale=7.0, output_type="latent")  # latents_of's guidance scale
    want = ref(**kw, generator=gen()).images
    torch.testing.assert_close(ours(**kw, generator=gen()).images, want, rtol=0, atol=TOL)
    torch.testing.assert_close(latents_of(ours, negative_prompt="blue"), want, rtol=0, atol=TOL)


def test_guidance_rescale_as_in_stable_diffusion():
    ours, ref = sd_pair()
    kw = dict(guidance_rescale=0.7)
    torch.testing.assert_close(latents_of(ours, **kw), latents_of(ref, **kw), rtol=0, atol=TOL)
    assert (latents_of(ours, **kw) - latents_of(ours)).abs().max() > 1e-4


def test_clip_skip_takes_an_earlier_layer_of_the_text_encoder():
    """diffusers 0.42.1's own clip_skip reads text_encoder.text_model, which transformers 5's CLIPTextModel no
    longer has, so the oracle's prompt embeddings are made here as diffusers means them: the hidden states
    ``clip_skip`` layers before the last, through the final layer norm."""
    components = tiny_components("ddim")
    components["text_encoder"] = type(components["text_encoder"])(
        components["text_encoder"].config.__class__(**{**components["text_encoder"].config.to_dict(),
                                                        "num_hidden_layers": 3}))
    ours, ref = sd_pair(components)
    ids = ref.tokenizer([PROMPT, ""], padding="max_length", max_length=ref.tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = ref.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        embeds = ref.text_encoder.text_model.final_layer_norm(hidden) if hasattr(
            ref.text_encoder, "text_model") else ref.text_encoder.final_layer_norm(hidden)
    want = ref(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], num_inference_steps=STEPS,
               guidance_scale=7.0, output_type="latent", generator=gen()).images  # latents_of's guidance scale
    torch.testing.assert_close(latents_of(ours, clip_skip=1), want, rtol=0, atol=TOL)
    assert (latents_of(ours, clip_skip=1) - latents_of(ours)).abs().max() > 1e-4


def test_return_dict_false_keeps_the_images_without_edits():
    ours, _ = sd_pair()
    kw = dict(num_inference_steps=STEPS, output_type="latent", concepts=[EditConcept("blue", warmup=1)])
    out = ours(PROMPT, generator=gen(), return_original=True, **kw)
    images, nsfw, originals, original_nsfw = ours(PROMPT, generator=gen(), return_original=True,
                                                  return_dict=False, **kw)
    torch.testing.assert_close(images, out.images, rtol=0, atol=0)
    torch.testing.assert_close(originals, out.original_images, rtol=0, atol=0)
    images, nsfw = ours(PROMPT, generator=gen(), return_dict=False, **kw)  # diffusers' pair without originals
    # Without return_original the UNet batches hold fewer rows (other float rounding): compare the same call.
    torch.testing.assert_close(images, ours(PROMPT, generator=gen(), **kw).images, rtol=0, atol=0)


def test_sdxl_with_a_lora_and_pooled_embeds_as_stable_diffusion_xl(tmp_path):
    components = tiny_xl_components("ddim")
    ours = quiet(SegaXLPipeline(**copy.deepcopy(components)))
    ref = quiet(StableDiffusionXLPipeline(**copy.deepcopy(components), add_watermarker=False))
    parts = copy.deepcopy(components)
    torch.manual_seed(2)
    parts["unet"].add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionXLPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=get_peft_model_state_dict(
        parts["unet"]), safe_serialization=True)
    kw = dict(num_inference_steps=STEPS, guidance_scale=5.0, height=16, width=16, output_type="latent")
    for pipe in (ours, ref):
        pipe.load_lora_weights(str(tmp_path))
    want = ref(PROMPT, **kw, generator=gen()).images
    torch.testing.assert_close(ours(PROMPT, **kw, generator=gen()).images, want, rtol=0, atol=TOL)
    embeds = ref.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    got = ours(**dict(zip(names, embeds)), **kw, generator=gen()).images
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)


def test_max_samples_per_call_splits_the_unet_batch_without_changing_the_images():
    ours, _ = sd_pair()
    kw = dict(num_inference_steps=STEPS, output_type="latent", return_original=True,
              concepts=[EditConcept("blue", warmup=1), EditConcept("square", warmup=1, reverse=True)])
    whole = ours(PROMPT, generator=gen(), **kw)
    calls = []
    handle = ours.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        split = ours(PROMPT, generator=gen(), max_samples_per_call=3, **kw)
    finally:
        handle.remove()
    assert max(calls) <= 3 and sum(calls) == whole.unet_samples
    # Other batch sizes round differently in the UNet's matrix products (measured up to 2.2e-5 here): the
    # library's float32 tolerance.
    torch.testing.assert_close(split.images, whole.images, rtol=0, atol=TOL)
    torch.testing.assert_close(split.original_images, whole.original_images, rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="max_samples_per_call"):
        ours(PROMPT, generator=gen(), max_samples_per_call=0, **kw)


def test_a_lora_load_makes_the_next_inversion_a_miss(sd_lora):
    ours, _ = sd_pair()
    image = torch.zeros(1, 3, 16, 16)
    kw = dict(source_prompt=PROMPT, num_inference_steps=4, skip=0.0)
    first = ours.invert(image, generator=gen(), **kw)
    assert ours.invert(image, generator=gen(), **kw).cache_hit
    ours.load_lora_weights(sd_lora)
    after = ours.invert(image, generator=gen(), **kw)
    assert not after.cache_hit and (after.noise_maps - first.noise_maps).abs().max() > 1e-4
    assert not ours.invert(image, generator=gen(), cross_attention_kwargs={"scale": 0.5}, **kw).cache_hit
    ours.fuse_lora()
    assert not ours.invert(image, generator=gen(), **kw).cache_hit
    ours.unet = copy.deepcopy(ours.unet)  # a component swapped
    assert not ours.invert(image, generator=gen(), **kw).cache_hit


def test_max_samples_per_call_with_cross_attention_masks():
    """The masks' cross-attention maps are gathered over the split UNet calls."""
    from tests.tiny import tiny_mask_components

    ours = quiet(SegaPipeline(**tiny_mask_components("ddim")))
    kw = dict(num_inference_steps=STEPS, output_type="latent", height=32, width=32, use_intersect_mask=True,
              concepts=[EditConcept("blue", warmup=1), EditConcept("square", warmup=1, reverse=True)])
    whole = ours(PROMPT, generator=gen(), **kw)
    for limit in (1, 3, 5):
        split = ours(PROMPT, generator=gen(), max_samples_per_call=limit, **kw)
        torch.testing.assert_close(split.edit_masks, whole.edit_masks, rtol=0, atol=0)
        torch.testing.assert_close(split.images, whole.images, rtol=0, atol=TOL)


def test_flux_with_a_lora_gives_what_flux_pipeline_gives(tmp_path):
    """``SegaFluxPipeline`` inherits ``FluxPipeline``'s loaders; the LoRA scale (``joint_attention_kwargs``) reaches
    every transformer call, the concepts' included."""
    from diffusers import FluxPipeline

    from sega import SegaFluxPipeline
    from tests.tiny_flux import T5_TOKENS, tiny_flux_components

    parts = tiny_flux_components(guidance_embeds=True)
    ours, ref = quiet(SegaFluxPipeline(**copy.deepcopy(parts))), quiet(FluxPipeline(**copy.deepcopy(parts)))
    lora = copy.deepcopy(parts["transformer"])
    torch.manual_seed(4)
    lora.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    FluxPipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=get_peft_model_state_dict(lora),
                                   safe_serialization=True)
    kw = dict(height=32, width=16, num_inference_steps=STEPS, max_sequence_length=T5_TOKENS, output_type="latent")
    plain = ours(PROMPT, generator=gen(), **kw).images
    for pipe in (ours, ref):
        pipe.load_lora_weights(str(tmp_path))
    for scale in ({}, {"joint_attention_kwargs": {"scale": 0.5}}):
        want = ref(PROMPT, generator=gen(), **kw, **scale).images
        torch.testing.assert_close(ours(PROMPT, generator=gen(), **kw, **scale).images, want, rtol=0, atol=TOL)
    assert (ours(PROMPT, generator=gen(), **kw).images - plain).abs().max() > 1e-3
    edited = ours(PROMPT, generator=gen(), **kw, concepts=[EditConcept("blue", scale=5, warmup=0)],
                  joint_attention_kwargs={"scale": 0.5}, return_original=True)
    torch.testing.assert_close(edited.original_images, ref(PROMPT, generator=gen(), **kw,
                                                           joint_attention_kwargs={"scale": 0.5}).images,
                               rtol=0, atol=TOL)
