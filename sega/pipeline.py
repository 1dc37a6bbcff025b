"""SegaPipeline: semantic guidance on Stable Diffusion 1.x/2.x, the successor of diffusers'
deprecated ``SemanticStableDiffusionPipeline``.

Same keywords, same images (latents within 1e-4 in fp32), plus:
- ``concepts=[EditConcept(...)]``, a validated alternative to the per-keyword lists;
- ``return_original=True``: the image without edits for the same seed in the same call, sharing every
  UNet evaluation until the first step at which an edit is applied (:mod:`sega.denoising`);
- real images: :meth:`invert` (:mod:`sega.inversion`), then ``inversion=``; implicit masks (:mod:`sega.masks`);
- no device-to-host copies in the denoising loop, concept thresholds vectorised across concepts.

The parts live in their own modules, mixed in: prompt encoding (:mod:`sega.prompts`), the denoising loop
(:mod:`sega.denoising`), inversion (:mod:`sega.inversion`); the math is in :mod:`sega.guidance`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import FromSingleFileMixin, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel

from .attention import AttentionStore, EditMasks, concept_token_counts
from .caching import LRUCache
from .concepts import ConceptSettings, EditConcept, resolve_concepts
from .denoising import Denoising, DenoisingMixin, plan_edits, step_kwargs
from .inversion import InversionMixin, SegaInversion
from .loaders import WeightsVersionMixin, counts_weight_changes
from .masks import latent_user_mask
from .prompts import PromptEncoderMixin
from .stopping import StopFlag

logger = logging.get_logger(__name__)


@dataclass
class SegaPipelineOutput(BaseOutput):
    """Output of :class:`SegaPipeline`.

    Args:
        images: the images with edits (PIL images, a numpy array, or latents for ``output_type="latent"``).
        nsfw_content_detected: per image, whether the safety checker flagged it (None without a checker).
        original_images: with ``return_original=True``, the images without edits for the same seed.
        original_nsfw_content_detected: safety flags of ``original_images``.
        sem_guidance: with ``return_sem_guidance=True``, the per-step edit terms, to replay with ``sem_guidance=``.
        unet_calls, unet_samples: UNet calls of this call and the samples they evaluated.
        inversion_cache_hit: with ``inversion=``, whether that inversion came from ``inversion_cache``.
        edit_masks: with ``use_cross_attn_mask`` or ``use_intersect_mask``, the implicit mask each concept's edit
            was multiplied by at each step, (steps, concepts, images, latent H, latent W), 1.0 = edited (zeros at
            steps where a concept's estimate was not evaluated).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None
    original_images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None
    original_nsfw_content_detected: list[bool] | None = None
    sem_guidance: list[torch.Tensor] | None = None
    unet_calls: int = 0
    unet_samples: int = 0
    inversion_cache_hit: bool | None = None
    edit_masks: torch.Tensor | None = None


def check_call_options(guidance_rescale: float, cross_attention_kwargs: dict | None,
                       max_samples_per_call: int | None) -> None:
    """Validate the diffusers-style options of a call."""
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
    if cross_attention_kwargs is not None and not isinstance(cross_attention_kwargs, dict):
        raise ValueError(f"cross_attention_kwargs must be a dict, got {type(cross_attention_kwargs).__name__}")
    if max_samples_per_call is not None and (not isinstance(max_samples_per_call, int) or max_samples_per_call < 1):
        raise ValueError(f"max_samples_per_call must be an integer >= 1 (or None), got {max_samples_per_call!r}")


@counts_weight_changes
class SegaPipeline(WeightsVersionMixin, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin,
                   FromSingleFileMixin, PromptEncoderMixin, DenoisingMixin, InversionMixin, DiffusionPipeline,
                   StableDiffusionMixin):
    r"""Text-to-image generation with semantic guidance (SEGA, Brack et al. 2023, arXiv 2301.12247).

    Built on diffusers components; load any Stable Diffusion 1.x/2.x checkpoint in diffusers format with
    ``SegaPipeline.from_pretrained(hub_id_or_folder, dtype=...)``, a single-file checkpoint with
    ``SegaPipeline.from_single_file(path_or_url, config=diffusers_folder_or_hub_id)``, or pass the components.
    diffusers' loaders work as on ``StableDiffusionPipeline``: ``load_lora_weights``, ``fuse_lora``,
    ``set_adapters``, ``unload_lora_weights``, ``load_textual_inversion``; the prompt and the concepts go through
    the same LoRA'd models, and ``cross_attention_kwargs={"scale": s}`` scales the LoRAs per call::

        pipe = SegaPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", dtype=torch.float16)
        pipe.load_lora_weights("path/or/hub_id", adapter_name="style")
        out = pipe("a photo of a cat", concepts=[EditConcept("sunglasses", scale=6, warmup=5)],
                   cross_attention_kwargs={"scale": 0.8}, return_original=True)

    Changing the weights (any of those loaders, or assigning a component) clears the inversion cache.

    Args:
        vae: the variational auto-encoder that maps images to latents and back.
        text_encoder: a CLIP text encoder.
        tokenizer: its tokenizer.
        unet: the conditional UNet that predicts noise.
        scheduler: any diffusers scheduler (DDIM, DPM-Solver++, Euler...).
        safety_checker: optional; flags NSFW images, which are then blacked out.
        feature_extractor: the safety checker's image processor (required with a safety checker).
        inversion_cache_size: how many image inversions (:meth:`invert`) are kept (0 turns it off).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor"]
    _exclude_from_cpu_offload = ["safety_checker"]
    _callback_tensor_inputs = ["latents", "pred_original_sample"]
    default_guidance_scale = 7.5  # StableDiffusionPipeline's

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker: bool = False,
        inversion_cache_size: int = 4,
    ):
        super().__init__()
        if safety_checker is not None and feature_extractor is None:
            raise ValueError("a safety_checker needs its feature_extractor; pass both or neither")
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.register_to_config(requires_safety_checker=requires_safety_checker)
        self.inversion_cache = LRUCache(inversion_cache_size)

    # ------------------------------------------------------------------------------------------
    # Steps of a call
    # ------------------------------------------------------------------------------------------

    def check_inputs(self, prompt, negative_prompt, height: int, width: int, num_inference_steps, callback_steps,
                     callback_on_step_end_tensor_inputs, prompt_embeds: torch.Tensor | None = None,
                     negative_prompt_embeds: torch.Tensor | None = None) -> tuple[list[str] | None, list[str]]:
        """Validate the arguments; returns the prompts (None with ``prompt_embeds``) and one negative prompt per
        prompt."""
        if height % 8 or width % 8:
            raise ValueError(f"height and width must be multiples of 8, got {height} and {width}")
        if callback_steps is not None and (not isinstance(callback_steps, int) or callback_steps <= 0):
            raise ValueError(f"callback_steps must be a positive integer, got {callback_steps!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs may only name {self._callback_tensor_inputs}")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass either prompt or prompt_embeds")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
        if prompt_embeds is not None and negative_prompt_embeds is not None \
                and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                             f"{tuple(negative_prompt_embeds.shape)} must have the same shape")
        prompts = None if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        count = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        if negative_prompt is None:
            return prompts, [""] * count
        if isinstance(negative_prompt, str):
            return prompts, [negative_prompt] * count
        if len(negative_prompt) != count:
            raise ValueError(f"negative_prompt has {len(negative_prompt)} entries but there are {count} prompts")
        return prompts, list(negative_prompt)

    def check_inversion_inputs(self, inversion: SegaInversion | None, height, width, num_inference_steps,
                               guidance_scale, latents, scheduler, eta) -> tuple[int, int, int, float]:
        """Defaults for size, steps and guidance (the inversion's when editing one) and the arguments an
        inversion fixes; returns (height, width, num_inference_steps, guidance_scale)."""
        if inversion is None:
            native = self.unet.config.sample_size * self.vae_scale_factor
            return (height or native, width or native, 50 if num_inference_steps is None else num_inference_steps,
                    self.default_guidance_scale if guidance_scale is None else guidance_scale)
        if not isinstance(inversion, SegaInversion):
            raise ValueError(f"inversion must come from SegaPipeline.invert, got {type(inversion).__name__}")
        for name, value in (("latents", latents), ("scheduler", scheduler)):
            if value is not None:
                raise ValueError(f"{name} cannot be set with inversion: the inversion fixes it")
        if eta:
            raise ValueError("eta cannot be set with inversion: an inverted image is edited at eta 1")
        for name, value, fixed in (("height", height, inversion.height), ("width", width, inversion.width),
                                   ("num_inference_steps", num_inference_steps, inversion.num_inference_steps)):
            if value is not None and value != fixed:
                raise ValueError(f"{name}={value} differs from the inversion's {fixed}; leave it out")
        scale = inversion.source_guidance_scale if guidance_scale is None else guidance_scale
        return inversion.height, inversion.width, inversion.num_inference_steps, scale

    def prepare_timesteps_and_latents(self, inversion: SegaInversion | None, scheduler, num_inference_steps: int,
                                      batch: int, height: int, width: int, dtype, generator, latents):
        """A copy of the scheduler with its timesteps set, the initial latents, and an inversion's noise maps."""
        device = self._execution_device
        if inversion is not None:
            # In float32 whatever the UNet's dtype: the reconstruction relies on exact scheduler arithmetic
            scheduler = copy.deepcopy(inversion.scheduler)
            return scheduler, inversion.latents.to(device, torch.float32), inversion.noise_maps.to(device, torch.float32)
        scheduler = copy.deepcopy(scheduler if scheduler is not None else self.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(batch, self.unet.config.in_channels, height, width, dtype, device, generator,
                                       latents, scheduler.init_noise_sigma)
        return scheduler, latents, None

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator,
                        latents=None, init_noise_sigma: float = 1.0):
        shape = (batch_size, num_channels_latents, int(height) // self.vae_scale_factor,
                 int(width) // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"generator: got a list of {len(generator)} generators for a batch of {batch_size} images")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device)
        return latents * init_noise_sigma

    def prepare_masks(self, concepts: ConceptSettings, use_cross_attn_mask: bool, use_intersect_mask: bool, user_mask,
                      latents: torch.Tensor, height: int, width: int, scheduler, timesteps) -> EditMasks | None:
        """The call's implicit masks and user mask, checked; None when no mask is asked for (or no concept)."""
        for name, value in (("use_cross_attn_mask", use_cross_attn_mask), ("use_intersect_mask", use_intersect_mask)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        cross_attention = use_cross_attn_mask or use_intersect_mask
        if not len(concepts) or not (cross_attention or user_mask is not None):
            return None
        batch, size = latents.shape[0], tuple(latents.shape[-2:])
        mask = None if user_mask is None else latent_user_mask(user_mask, batch, size, (height, width),
                                                               latents.device, latents.dtype)
        store = None
        if cross_attention:
            if concepts.prompts is None:
                raise ValueError("use_cross_attn_mask / use_intersect_mask need the concepts' texts (editing_prompt "
                                 "or concepts), not editing_prompt_embeddings: the masks follow the texts' tokens")
            store = AttentionStore(concept_token_counts(self.tokenizer, concepts.prompts),
                                   self.tokenizer.model_max_length, size)
        return EditMasks(len(concepts), cross_attention, use_intersect_mask, mask, store,
                         scheduler.config.num_train_timesteps, timesteps.tolist())

    def run_safety_checker(self, image: torch.Tensor, device, dtype):
        if self.safety_checker is None:
            return image, None
        pil = self.image_processor.postprocess(image, output_type="pil")
        clip_input = self.feature_extractor(pil, return_tensors="pt").to(device)
        return self.safety_checker(images=image, clip_input=clip_input.pixel_values.to(dtype))

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled VAE latents (the distribution's mode) of images in [-1, 1]."""
        x0 = self.vae.encode(pixels.to(device=self._execution_device, dtype=self.vae.dtype)).latent_dist.mode()
        return x0 * self.vae.config.scaling_factor

    def _decode(self, latents: torch.Tensor, dtype):
        image = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype), return_dict=False)[0]
        return self.run_safety_checker(image, self._execution_device, dtype)

    def _postprocess(self, image, nsfw, output_type):
        if output_type == "latent":
            return image
        denormalize = [True] * image.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)

    def decode_pair(self, latents: torch.Tensor, original_latents: torch.Tensor | None, dtype):
        """Decode the edited latents and the plain run's (None: not asked for) in one VAE batch and run the safety
        checker: (image, nsfw, original image or None, its nsfw)."""
        if original_latents is None or original_latents is latents:
            image, nsfw = self._decode(latents, dtype)
            return image, nsfw, (None if original_latents is None else image), nsfw
        batch = latents.shape[0]
        decoded, flags = self._decode(torch.cat([latents, original_latents]), dtype)
        nsfw, original_nsfw = (None, None) if flags is None else (list(flags[:batch]), list(flags[batch:]))
        return decoded[:batch], nsfw, decoded[batch:], original_nsfw

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        callback_steps: int = 1,
        editing_prompt: str | list[str] | None = None,
        editing_prompt_embeddings: torch.Tensor | None = None,
        reverse_editing_direction: bool | list[bool] = False,
        edit_guidance_scale: float | list[float] = 5,
        edit_warmup_steps: int | list[int] = 10,
        edit_cooldown_steps: int | list[int | None] | None = None,
        edit_threshold: float | list[float] = 0.9,
        edit_momentum_scale: float = 0.1,
        edit_mom_beta: float = 0.4,
        edit_weights: list[float] | None = None,
        sem_guidance: list[torch.Tensor] | None = None,
        concepts: Sequence[EditConcept | dict] | None = None,
        return_original: bool = False,
        return_sem_guidance: bool = False,
        use_cross_attn_mask: bool = False,
        use_intersect_mask: bool = False,
        user_mask: torch.Tensor | np.ndarray | PIL.Image.Image | list[PIL.Image.Image] | None = None,
        inversion: SegaInversion | None = None,
        scheduler=None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        stop: StopFlag | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        guidance_rescale: float = 0.0,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        max_samples_per_call: int | None = None,
    ):
        r"""Generate images, steered by edit concepts.

        Args:
            prompt: the prompt or prompts (a list makes a batch); or ``prompt_embeds``.
            height, width: image size in pixels, multiples of 8; default the UNet's native size (or the
                inversion's).
            num_inference_steps: denoising steps, >= 1, default 50. More is slower and usually finer.
                With ``inversion``, the inversion's (leave it out).
            guidance_scale: classifier-free guidance s_g, default 7.5 (with ``inversion``, its
                ``source_guidance_scale``). <= 1 turns it off: both images then follow the prompt's estimate
                e_p, the edited one plus the edit term (the deprecated pipeline dropped the edits; this warns).
            negative_prompt: replaces the empty prompt of the unconditional estimate.
            num_images_per_prompt: images per prompt, >= 1.
            eta: DDIM eta in [0, 1]; only for schedulers that take it.
            generator: torch generator(s) for reproducibility.
            latents: initial noise instead of drawing it from ``generator``.
            output_type: "pil", "np", "pt" or "latent".
            return_dict: return a :class:`SegaPipelineOutput`; False: the tuple ``(images, nsfw)`` as diffusers,
                with ``return_original`` ``(images, nsfw, original_images, original_nsfw)``.
            callback, callback_steps: legacy ``callback(step, t, latents)`` every ``callback_steps`` steps, with
                the edited run's latents.
            editing_prompt: concept text(s); each is one semantic direction.
            editing_prompt_embeddings: precomputed concept embeddings (C, seq, dim) instead of text.
            reverse_editing_direction: per concept (or for all): True removes the concept instead of adding it.
            edit_guidance_scale: per concept edit scale s_c, >= 0; SD typical 3 to 10.
            edit_warmup_steps: per concept, the first step index at which it is applied (momentum builds
                up before). SD typical 5 to 10 of 50.
            edit_cooldown_steps: per concept, the step index at which it stops; None for never.
            edit_threshold: per concept lambda_c in [0, 1): the share of latent positions per channel left
                untouched. SD typical 0.9 to 0.99.
            edit_momentum_scale: s_m >= 0, how much accumulated momentum is added to the edit term.
            edit_mom_beta: beta in [0, 1), the momentum's memory.
            edit_weights: relative weight per concept (negatives count as 0).
            sem_guidance: per-step edit terms recorded from another run (``return_sem_guidance``), added here.
            concepts: :class:`EditConcept` objects (or dicts of their fields) instead of the ``editing_prompt`` /
                ``edit_*`` lists; momentum still comes from the two keywords above.
            return_original: also return the image without edits for the same noise, in the same pass: both
                runs share every step before the first edit, then ride in one UNet call per step. The same
                call gives the same bits whatever ran before.
            return_sem_guidance: also return the per-step edit terms.
            use_cross_attn_mask: LEDITS++'s implicit mask: each concept edits only where its tokens'
                cross-attention map reaches its ``edit_threshold`` quantile (instead of SEGA's per-channel
                threshold). Needs concept texts. Default off (SEGA).
            use_intersect_mask: the cross-attention mask times a noise mask (|psi| over channels at its
                ``edit_threshold`` quantile); the cross-attention mask alone while t > 0.8 T. Turns the
                cross-attention mask on. ``edit_masks`` in the output holds the masks applied.
            user_mask: where edits may act, in [0, 1] (1 = edit): a tensor or array (H, W), (B, H, W) or
                (B, 1, H, W) at the latent or image size, or PIL images (white = edit).
            inversion: edit a real image: the result of :meth:`invert`; ``prompt`` should be its
                ``source_prompt``. The image without edits then reconstructs the input. Size, steps, noise and
                scheduler come from it: ``latents``, ``scheduler`` and ``eta`` stay unset, and the batch must
                match the inverted images.
            scheduler: a scheduler for this call only (copied), instead of ``self.scheduler``.
            callback_on_step_end: ``f(pipe, step, t, tensors) -> dict``, called after each step with the edited
                run's tensors. Returning new "latents" changes the edited run only. Raise in it to end the call.
            callback_on_step_end_tensor_inputs: "latents", and "pred_original_sample", the clean latents x0 that
                the step's estimate predicts (for previews: :mod:`sega.previews`).
            stop: this call's stop flag (anything with ``is_set()``), checked before every step: once set, the
                call raises :class:`~sega.stopping.Stopped`.
            prompt_embeds, negative_prompt_embeds: text embeddings (prompts, seq, dim) instead of ``prompt`` /
                ``negative_prompt``, as ``StableDiffusionPipeline.encode_prompt`` returns them (one row per prompt;
                ``num_images_per_prompt`` repeats them). Same shape when both are given.
            pooled_prompt_embeds, negative_pooled_prompt_embeds: SDXL only (:class:`SegaXLPipeline`): the pooled
                embeddings that go with ``prompt_embeds`` / ``negative_prompt_embeds``.
            guidance_rescale: phi in [0, 1], default 0 (off): diffusers' ``rescale_noise_cfg`` (Lin et al. 2023,
                arXiv 2305.08891) on the guided estimate, towards the prompt estimate's standard deviation; against
                over-exposure with zero-terminal-SNR schedules, typically 0.7. With guidance on only. Applied to
                the image without edits as ``StableDiffusionPipeline`` does, and to the edited run's estimate
                (edit terms included) with the same prompt estimate.
            cross_attention_kwargs: keyword arguments for the attention processors, passed to every UNet call;
                ``{"scale": s}`` scales the loaded LoRAs (0 off, 1 as loaded), in the text encoder too.
            clip_skip: take the text encoder's hidden states ``clip_skip`` layers before the last (through its
                final layer norm), >= 0 and below its layer count; default None = the last. Applies to the
                prompts and the concepts.
            max_samples_per_call: at most this many samples in one UNet call (>= 1; None: all of a step in one
                call). A step needs 2 x batch samples for guidance, 2 x batch more for ``return_original`` after
                the first edit, and batch per concept; splitting bounds peak memory (e.g. SDXL at 1024 px on a
                24 GB card) at the cost of speed, with the same images within float rounding. The app's server
                sets it from its hardware profile.

        Returns:
            :class:`SegaPipelineOutput`, or with ``return_dict=False`` a tuple (see ``return_dict``).
        """
        # 1. Check inputs and resolve the concepts from either API
        height, width, num_inference_steps, guidance_scale = self.check_inversion_inputs(
            inversion, height, width, num_inference_steps, guidance_scale, latents, scheduler, eta)
        prompts, negative_prompts = self.check_inputs(prompt, negative_prompt, height, width, num_inference_steps,
                                                      callback_steps, callback_on_step_end_tensor_inputs,
                                                      prompt_embeds, negative_prompt_embeds)
        check_call_options(guidance_rescale, cross_attention_kwargs, max_samples_per_call)
        cc = resolve_concepts(concepts, editing_prompt, editing_prompt_embeddings, reverse_editing_direction,
                              edit_guidance_scale, edit_warmup_steps, edit_cooldown_steps, edit_threshold,
                              edit_weights)
        device = self._execution_device
        batch = len(negative_prompts) * num_images_per_prompt
        if inversion is not None and inversion.batch_size != batch:
            raise ValueError(f"inversion holds {inversion.batch_size} image(s) but prompt x num_images_per_prompt "
                             f"makes a batch of {batch}")
        do_cfg = guidance_scale > 1.0
        has_edits = len(cc) > 0 or sem_guidance is not None
        if has_edits and not do_cfg:
            logger.warning(f"guidance_scale={guidance_scale} <= 1: classifier-free guidance is off; both images "
                           "follow the prompt's estimate, and the edits are added to it.")

        # 2. Encode the prompt, the negative prompt and the concepts
        given = dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                     pooled_prompt_embeds=pooled_prompt_embeds,
                     negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
        embeddings = self.encode_prompts(prompts, negative_prompts, num_images_per_prompt, cc, height=height,
                                         width=width, given=given, clip_skip=clip_skip,
                                         lora_scale=(cross_attention_kwargs or {}).get("scale"))
        dtype = self.unet.dtype  # the embeddings' dtype

        # 3. Timesteps on a copy of the scheduler (never shared between calls or threads), initial latents
        scheduler, latents, noise_maps = self.prepare_timesteps_and_latents(
            inversion, scheduler, num_inference_steps, batch, height, width, dtype, generator, latents)
        timesteps = scheduler.timesteps if inversion is None else inversion.timesteps
        eta = 1.0 if inversion is not None else eta

        # 4. Plan the edits: which concepts matter at each step, where the edited run leaves the plain one
        plans, needed, diverge = plan_edits(cc, len(timesteps), do_cfg, edit_momentum_scale, sem_guidance is not None)
        state = Denoising(
            scheduler=scheduler, timesteps=timesteps, batch=batch, guidance_scale=guidance_scale,
            embeddings=embeddings, momentum=torch.zeros_like(latents), edit_cfg=do_cfg or has_edits,
            generator=generator, eta=eta, step_kwargs=step_kwargs(scheduler, generator, eta, noise_maps),
            noise_maps=noise_maps, concepts=cc, plans=plans, needed=needed, diverge=diverge,
            keep_plain=return_original,
            signed_scales=torch.tensor(cc.signed_scales, device=device, dtype=torch.float32),
            thresholds=torch.tensor(cc.thresholds, device=device, dtype=torch.float32),
            momentum_scale=edit_momentum_scale, momentum_beta=edit_mom_beta,
            sem_guidance=None if sem_guidance is None else [g.to(device=device, dtype=dtype) for g in sem_guidance],
            recorded_guidance=[] if return_sem_guidance else None,
            cross_attention_kwargs=cross_attention_kwargs, guidance_rescale=guidance_rescale,
            max_samples_per_call=max_samples_per_call,
            masks=self.prepare_masks(cc, use_cross_attn_mask, use_intersect_mask, user_mask, latents, height, width,
                                     scheduler, timesteps),
        )

        # 5. Denoising loop (with masks: recording cross-attention maps, the UNet's processors put back after)
        with state.masks.recording(self.unet) if state.masks is not None else nullcontext():
            latents = self.denoise(state, latents, callback, callback_steps, callback_on_step_end,
                                   callback_on_step_end_tensor_inputs, stop)

        # 6. Decode both images in one VAE batch, post-process
        original = None
        if return_original:
            original = latents if state.plain is None else state.plain.latents
        if output_type == "latent":
            image, nsfw, original_nsfw = latents, None, None
        else:
            image, nsfw, original, original_nsfw = self.decode_pair(latents, original, dtype)
        images = self._postprocess(image, nsfw, output_type)
        originals = None if original is None else self._postprocess(original, original_nsfw, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, nsfw) if not return_original else (images, nsfw, originals, original_nsfw)
        return SegaPipelineOutput(images=images, nsfw_content_detected=nsfw, original_images=originals,
                                  original_nsfw_content_detected=original_nsfw, sem_guidance=state.recorded_guidance,
                                  unet_calls=state.unet_calls, unet_samples=state.unet_samples,
                                  inversion_cache_hit=None if inversion is None else inversion.cache_hit,
                                  edit_masks=None if state.masks is None else state.masks.stacked(len(timesteps)))
