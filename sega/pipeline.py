"""SegaPipeline: semantic guidance on Stable Diffusion 1.x/2.x, the successor of diffusers'
deprecated ``SemanticStableDiffusionPipeline``.

Same keywords, same images (latents within 1e-4 in fp32), plus:
- ``concepts=[EditConcept(...)]``, a validated alternative to the per-keyword lists;
- ``return_original=True``: the image without edits for the same seed in the same call, sharing every
  UNet evaluation until the first step at which an edit is applied;
- a bounded re-edit cache: when only the concepts change, the run without edits is replayed from memory
  (``use_reedit_cache=False``: the pair in one pass whatever the cache holds, bit-identical per call);
- no device-to-host copies in the denoising loop, concept thresholds vectorised across concepts.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel

from .attention import AttentionStore, EditMasks, concept_token_counts
from .concepts import EditConcept
from .guidance import (
    StepPlan,
    classifier_free_guidance,
    concept_directions,
    plan_step,
    semantic_guidance_step,
)
from .inversion import SegaInversion, image_to_tensor, inversion_scheduler, noise_map, performed_steps
from .masks import latent_user_mask
from .previews import predicted_original
from .reedit import (
    LockstepPlainRun,
    LRUCache,
    PlainRun,
    ReplayedPlainRun,
    SharedPlainRun,
    generator_fingerprint,
    reedit_key,
    scheduler_step,
    step_kwargs,
)
from .stopping import StopFlag, check_stop

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
        cache_hit: whether the run without edits was replayed from the re-edit cache.
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
    cache_hit: bool = False
    unet_calls: int = 0
    unet_samples: int = 0
    inversion_cache_hit: bool | None = None
    edit_masks: torch.Tensor | None = None


@dataclass
class _Concepts:
    """Per-concept settings resolved from either API, as plain Python values."""

    prompts: list[str] | None
    embeddings: torch.Tensor | None
    signed_scales: list[float]
    thresholds: list[float]
    warmup: list[int]
    cooldown: list[int | None]
    weights: list[float]

    def __len__(self) -> int:
        return len(self.signed_scales)

@dataclass
class _Denoising:
    """One call's denoising state. Never kept on the pipeline: calls may run in parallel threads."""

    scheduler: object
    timesteps: torch.Tensor
    step_kwargs: dict
    generator: torch.Generator | list[torch.Generator] | None
    batch: int
    guidance_scale: float
    edit_cfg: bool  # the edited run evaluates e_u and e_p (else e_p only)
    embeddings: dict  # "u", "p": (batch, seq, dim); "c": (C, batch, seq, dim)
    momentum: torch.Tensor
    concepts: _Concepts = field(default_factory=lambda: _Concepts(None, None, [], [], [], [], []))
    plans: list[StepPlan] = field(default_factory=list)
    needed: list[list[int]] = field(default_factory=list)  # per step, the concepts in the UNet batch
    signed_scales: torch.Tensor | None = None
    thresholds: torch.Tensor | None = None
    momentum_scale: float = 0.0
    momentum_beta: float = 0.0
    sem_guidance: list[torch.Tensor] | None = None
    recorded_guidance: list[torch.Tensor] | None = None
    noise_maps: torch.Tensor | None = None  # an inversion's per-step variance noise
    masks: EditMasks | None = None  # implicit masks (cross-attention, intersect, user mask)
    device_tensors: dict = field(default_factory=dict)  # built once per call: weights, embedding layouts
    last_estimate: tuple | None = None  # (model input, estimate) of the edited run's latest step
    unet_calls: int = 0
    unet_samples: int = 0

    def weights(self, values: tuple[float, ...]) -> torch.Tensor:
        if values not in self.device_tensors:
            self.device_tensors[values] = torch.tensor(values, device=self.momentum.device, dtype=self.momentum.dtype)
        return self.device_tensors[values]

    def layout(self, segments: tuple) -> torch.Tensor | dict:
        """Conditioning for a UNet batch of segments: "u" unconditional, "p" prompt, int c concept c.

        A tensor (the text embeddings), or, where the model takes more conditioning (SDXL), a dict of UNet
        keyword arguments with a tensor per segment at every leaf, concatenated leaf by leaf."""
        key = ("embeddings", *segments)
        if key not in self.device_tensors:
            emb = self.embeddings
            self.device_tensors[key] = _concat([emb[s] if isinstance(s, str) else _index(emb["c"], s)
                                                for s in segments])
        return self.device_tensors[key]


def _index(value: torch.Tensor | dict, i: int) -> torch.Tensor | dict:
    return {k: _index(v, i) for k, v in value.items()} if isinstance(value, dict) else value[i]


def _concat(values: list) -> torch.Tensor | dict:
    if isinstance(values[0], dict):
        return {k: _concat([v[k] for v in values]) for k in values[0]}
    return torch.cat(values)


def _per_concept(value, n: int, name: str) -> list:
    """The reference's broadcasting: one value for every concept, or a list with one per concept."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but there are {n} edit concepts")
        return list(value)
    return [value] * n


class SegaPipeline(DiffusionPipeline, StableDiffusionMixin):
    r"""Text-to-image generation with semantic guidance (SEGA, Brack et al. 2023, arXiv 2301.12247).

    Built on diffusers components; load any Stable Diffusion 1.x/2.x checkpoint in diffusers format with
    ``SegaPipeline.from_pretrained(hub_id_or_folder, dtype=...)`` or pass the components.

    Args:
        vae: the variational auto-encoder that maps images to latents and back.
        text_encoder: a CLIP text encoder.
        tokenizer: its tokenizer.
        unet: the conditional UNet that predicts noise.
        scheduler: any diffusers scheduler (DDIM, DPM-Solver++, Euler...).
        safety_checker: optional; flags NSFW images, which are then blacked out.
        feature_extractor: the safety checker's image processor (required with a safety checker).
        reedit_cache_size: how many runs without edits the re-edit cache keeps (0 turns it off).
        embedding_cache_size: how many text embeddings are kept.
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
        reedit_cache_size: int = 4,
        embedding_cache_size: int = 256,
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
        self.reedit_cache = LRUCache(reedit_cache_size)
        self.embedding_cache = LRUCache(embedding_cache_size)
        self.inversion_cache = LRUCache(inversion_cache_size)

    # ------------------------------------------------------------------------------------------
    # Text
    # ------------------------------------------------------------------------------------------

    def truncated_text(self, text: str) -> str | None:
        """The part of ``text`` beyond the tokenizer's limit that will be dropped, or None."""
        ids = self.tokenizer(text, truncation=False).input_ids
        limit = self.tokenizer.model_max_length
        if len(ids) <= limit:
            return None
        return self.tokenizer.decode(ids[limit - 1 : -1])

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], use_cache: bool = True) -> torch.Tensor:
        """CLIP embeddings (len(texts), seq, dim) on the execution device, cached per text.

        Texts over the tokenizer's limit are truncated (end token kept, as StableDiffusionPipeline does)
        with a warning. Each text is encoded on its own so its embedding never depends on its batch.
        With ``use_cache=False`` the embedding cache is neither read nor filled.
        """
        # The UNet's dtype: transformers keeps a checkpoint's dtype where diffusers loads float32.
        device, dtype = self._execution_device, self.unet.dtype
        if not texts:
            return torch.zeros((0, self.tokenizer.model_max_length, self.text_encoder.config.hidden_size),
                               device=device, dtype=dtype)
        out = []
        for text in texts:
            key = (text, str(device), dtype)
            emb = self.embedding_cache.get(key) if use_cache else None
            if emb is None:
                removed = self.truncated_text(text)
                if removed:
                    logger.warning(f"Prompt truncated to {self.tokenizer.model_max_length} tokens; dropped: {removed!r}")
                ids = self.tokenizer(
                    text,
                    padding="max_length",
                    max_length=self.tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids
                emb = self.text_encoder(ids.to(device))[0].to(dtype)
                if use_cache:
                    self.embedding_cache.put(key, emb)
            out.append(emb)
        return torch.cat(out)

    # ------------------------------------------------------------------------------------------
    # Helpers
    # ------------------------------------------------------------------------------------------

    def run_safety_checker(self, image: torch.Tensor, device, dtype):
        if self.safety_checker is None:
            return image, None
        pil = self.image_processor.postprocess(image, output_type="pil")
        clip_input = self.feature_extractor(pil, return_tensors="pt").to(device)
        return self.safety_checker(images=image, clip_input=clip_input.pixel_values.to(dtype))

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

    def _resolve_concepts(self, concepts, editing_prompt, editing_prompt_embeddings, reverse_editing_direction,
                          edit_guidance_scale, edit_warmup_steps, edit_cooldown_steps, edit_threshold,
                          edit_weights) -> _Concepts:
        if concepts is not None:
            if editing_prompt or editing_prompt_embeddings is not None:
                raise ValueError("pass either concepts or editing_prompt/editing_prompt_embeddings, not both")
            concepts = [c if isinstance(c, EditConcept) else EditConcept(**c) for c in concepts]
            return _Concepts(
                prompts=[c.prompt for c in concepts],
                embeddings=None,
                signed_scales=[-c.scale if c.reverse else c.scale for c in concepts],
                thresholds=[c.threshold for c in concepts],
                warmup=[c.warmup for c in concepts],
                cooldown=[c.cooldown for c in concepts],
                weights=[c.weight for c in concepts],
            )
        prompts, embeddings = None, None
        if editing_prompt:
            prompts = [editing_prompt] if isinstance(editing_prompt, str) else list(editing_prompt)
            n = len(prompts)
        elif editing_prompt_embeddings is not None:
            embeddings = editing_prompt_embeddings
            n = embeddings.shape[0]
        else:
            n = 0
        reverse = _per_concept(reverse_editing_direction, n, "reverse_editing_direction")
        scales = _per_concept(edit_guidance_scale, n, "edit_guidance_scale")
        return _Concepts(
            prompts=prompts,
            embeddings=embeddings,
            signed_scales=[-float(s) if r else float(s) for s, r in zip(scales, reverse)],
            thresholds=[float(t) for t in _per_concept(edit_threshold, n, "edit_threshold")],
            warmup=[int(w) for w in _per_concept(edit_warmup_steps, n, "edit_warmup_steps")],
            cooldown=_per_concept(edit_cooldown_steps, n, "edit_cooldown_steps"),
            weights=[float(w) for w in edit_weights] if edit_weights else [1.0] * n,
        )

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled VAE latents (the distribution's mode) of images in [-1, 1]."""
        x0 = self.vae.encode(pixels.to(device=self._execution_device, dtype=self.vae.dtype)).latent_dist.mode()
        return x0 * self.vae.config.scaling_factor

    def _decode(self, latents: torch.Tensor, dtype):
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return self.run_safety_checker(image, self._execution_device, dtype)

    def _postprocess(self, image, nsfw, output_type):
        if output_type == "latent":
            return image
        denormalize = [True] * image.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)

    @staticmethod
    def _concepts_needed(plans: list, momentum_scale: float) -> list[list[int]]:
        """Per step, the concepts whose estimate can change the result; the others stay out of the UNet batch.

        A concept matters when it enters this step's edit term, or when it feeds the momentum and the
        momentum is used later (momentum scale non-zero and a later step applies G).
        """
        needed, momentum_used_later = [], False
        for plan in reversed(plans):
            momentum_used_later = momentum_used_later or (momentum_scale != 0 and plan.use_momentum)
            needed.append([
                c for c in range(len(plan.momentum_weights))
                if ((momentum_used_later or plan.use_momentum) and plan.momentum_weights[c] != 0)
                or (plan.edit_weights is not None and not plan.use_momentum and plan.edit_weights[c] != 0)
            ])
        return needed[::-1]

    # ------------------------------------------------------------------------------------------
    # Steps of a call
    # ------------------------------------------------------------------------------------------

    def check_inputs(self, prompt, negative_prompt, height: int, width: int, num_inference_steps, callback_steps,
                     callback_on_step_end_tensor_inputs) -> tuple[list[str], list[str]]:
        """Validate the arguments; returns the prompts and one negative prompt per prompt."""
        if height % 8 or width % 8:
            raise ValueError(f"height and width must be multiples of 8, got {height} and {width}")
        if callback_steps is not None and (not isinstance(callback_steps, int) or callback_steps <= 0):
            raise ValueError(f"callback_steps must be a positive integer, got {callback_steps!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs may only name {self._callback_tensor_inputs}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt is None:
            return prompts, [""] * len(prompts)
        if isinstance(negative_prompt, str):
            return prompts, [negative_prompt] * len(prompts)
        if len(negative_prompt) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negative_prompt)} entries but prompt has {len(prompts)}")
        return prompts, list(negative_prompt)

    def encode_prompts(self, prompts: list[str], negative_prompts: list[str], num_images_per_prompt: int,
                       concepts: _Concepts, use_cache: bool, height: int | None = None,
                       width: int | None = None) -> dict[str, torch.Tensor]:
        """Embeddings in latent batch order: "p" and "u" (batch, seq, dim), "c" concepts (C, batch, seq, dim).

        ``height`` and ``width`` (the image size) are unused here; SDXL's micro-conditioning depends on them."""
        text = self.encode_text(prompts, use_cache).repeat_interleave(num_images_per_prompt, dim=0)
        uncond = self.encode_text(negative_prompts, use_cache).repeat_interleave(num_images_per_prompt, dim=0)
        if concepts.prompts is not None:
            concept = self.encode_text(concepts.prompts, use_cache)
        elif concepts.embeddings is not None:
            concept = concepts.embeddings.to(device=text.device, dtype=text.dtype)
        else:
            concept = text[:0, 0:1]
        return {"p": text, "u": uncond, "c": concept[:, None].expand(-1, text.shape[0], -1, -1)}

    def plan_edits(self, concepts: _Concepts, n_steps: int, do_cfg: bool, momentum_scale: float,
                   replaying_guidance: bool) -> tuple[list[StepPlan], list[list[int]], int]:
        """Per step: what the reference does with the concepts, and which concepts go into the UNet batch;
        and ``diverge``, the first step at which the edited run leaves the run without edits."""
        plans = [plan_step(i, concepts.warmup, concepts.cooldown, concepts.weights) for i in range(n_steps)]
        needed = self._concepts_needed(plans, momentum_scale)
        if replaying_guidance:
            diverge = 0
        elif len(concepts) and not do_cfg:
            # Without guidance the run without edits has no e_u, which the concept directions need: the edited
            # run leaves it at the first step that evaluates a concept or applies an edit (until then both
            # estimates are e_p).
            diverge = next((i for i, (plan, n) in enumerate(zip(plans, needed))
                            if n or plan.edit_weights is not None), n_steps)
        elif len(concepts):
            diverge = min(min(concepts.warmup), n_steps)
        else:
            diverge = n_steps
        return plans, needed, diverge

    def prepare_masks(self, concepts: _Concepts, use_cross_attn_mask: bool, use_intersect_mask: bool, user_mask,
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

    def prepare_plain_run(self, state: _Denoising, key: tuple | None, diverge: int, return_original: bool,
                          original_first: bool, has_edits: bool) -> PlainRun:
        """The run without edits: replayed from the cache, computed on its own (``original_first``), shared
        with the edited run and then computed alongside it, or not needed at all."""
        n_steps = len(state.timesteps)
        cached = self.reedit_cache.get(key) if key is not None else None
        if cached is not None:
            return ReplayedPlainRun(cached, diverge, wanted=return_original)
        record = key is not None and self.reedit_cache.max_entries > 0
        do_cfg = state.guidance_scale > 1.0
        if return_original and original_first and diverge < n_steps:
            return LockstepPlainRun(diverge, record, do_cfg, state.guidance_scale,
                                    functools.partial(self._unet_step, state))
        if return_original or (record and not has_edits):
            return SharedPlainRun(diverge, n_steps, return_original, record, do_cfg, state.guidance_scale)
        return PlainRun()

    def denoise(self, state: _Denoising, latents: torch.Tensor, plain: PlainRun, callback, callback_steps: int,
                callback_on_step_end, callback_on_step_end_tensor_inputs, stop: StopFlag | None = None) -> torch.Tensor:
        """The denoising loop; the callbacks see the edited run's latents once per step. Raises
        :class:`~sega.stopping.Stopped` before a step once ``stop`` is set."""
        for i, t in enumerate(self.progress_bar(state.timesteps)):
            check_stop(stop, i, len(state.timesteps))
            plain.advance(i, t)
            stepped = self.denoise_step(state, i, t, latents, plain)
            latents = stepped
            if callback_on_step_end is not None:
                tensors = {"latents": latents}
                if "pred_original_sample" in callback_on_step_end_tensor_inputs:
                    tensors["pred_original_sample"] = self.pred_original_sample(state, t)
                result = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                latents = (result or {}).get("latents", latents)
            if callback is not None and i % callback_steps == 0:
                callback(i // getattr(state.scheduler, "order", 1), t, latents)
            # A callback's new latents are the edited run's business: the plain run goes on without them.
            plain.after_step(i, state.scheduler, state.generator, stepped, replaced=latents is not stepped)
        return latents

    def denoise_step(self, state: _Denoising, i: int, t, latents: torch.Tensor, plain: PlainRun) -> torch.Tensor:
        """One step of the edited run (and of the plain run when it is computed alongside): one UNet call."""
        needed = state.needed[i]
        shared = plain.estimates(i)  # (e_u, e) of the plain run, valid for the edited run too until edits start
        z_in = state.scheduler.scale_model_input(latents, t)
        # One batched UNet call: [plain u, p] + [edited u, p] + [concepts on the edited latents].
        parts: list[tuple[torch.Tensor, list]] = []
        plain.add_inputs(i, t, parts)
        # e_u: for guidance, and (guidance off) only at the steps whose concept directions need it
        with_uncond = state.edit_cfg and (state.guidance_scale > 1.0 or bool(needed)
                                          or state.plans[i].edit_weights is not None)
        if shared is None:
            parts.append((z_in, ["u", "p"] if with_uncond else ["p"]))
        if needed:
            parts.append((z_in, needed))
        chunks = self._unet_step(state, t, parts)
        plain.take(i, t, chunks)
        if shared is None:
            noise_uncond = chunks.pop(0)
            noise_text = chunks.pop(0) if with_uncond else noise_uncond
        else:
            noise_uncond, noise_pred = shared
        edit_term = self.semantic_guidance(state, i, noise_uncond, torch.stack(chunks) if needed else None)
        if shared is None:
            noise_pred = self.guided_estimate(state, i, noise_uncond, noise_text, edit_term)
        plain.observe(i, latents, noise_uncond, noise_pred)
        state.last_estimate = (z_in, noise_pred)
        if state.recorded_guidance is not None:
            state.recorded_guidance.append(edit_term if edit_term is not None else torch.zeros_like(latents))
        return scheduler_step(state.scheduler, state.step_kwargs, state.noise_maps, i, noise_pred, t, latents)

    @staticmethod
    def pred_original_sample(state: _Denoising, t) -> torch.Tensor:
        """The clean latents x0 that the edited run's latest estimate predicts (for previews)."""
        model_input, estimate = state.last_estimate
        alphas = state.scheduler.alphas_cumprod
        alpha_prod = alphas[min(max(int(round(float(t))), 0), len(alphas) - 1)]
        return predicted_original(model_input, estimate, alpha_prod, state.scheduler.config.prediction_type)

    def _unet_step(self, state: _Denoising, t, parts: list[tuple[torch.Tensor, list]]) -> list[torch.Tensor]:
        """One UNet call on every (latent input, embedding segments) part; one chunk per segment."""
        if not parts:
            return []
        segments = tuple(s for _, names in parts for s in names)
        if state.masks is not None:
            state.masks.expect(segments, state.batch)
        inputs = torch.cat([z for z, names in parts for _ in names])
        cond = state.layout(segments)
        out = self.unet(inputs, t, **(cond if isinstance(cond, dict) else {"encoder_hidden_states": cond})).sample
        state.unet_calls, state.unet_samples = state.unet_calls + 1, state.unet_samples + out.shape[0]
        return list(out.split(state.batch))

    @staticmethod
    def semantic_guidance(state: _Denoising, i: int, noise_uncond: torch.Tensor,
                          noise_concepts: torch.Tensor | None) -> torch.Tensor | None:
        """This step's edit term (None when none applies), updating the momentum."""
        if not len(state.concepts):
            return None
        plan, needed = state.plans[i], state.needed[i]
        if noise_concepts is not None and state.masks is not None:
            psi = state.masks.directions(i, state.timesteps[i], noise_uncond, noise_concepts, needed,
                                         state.signed_scales[needed], state.thresholds[needed])
        elif noise_concepts is not None:
            psi = concept_directions(noise_uncond, noise_concepts, state.signed_scales[needed],
                                     state.thresholds[needed])
        else:
            psi = noise_uncond.new_zeros((0, *noise_uncond.shape))
        edit_term, state.momentum = semantic_guidance_step(
            psi,
            plan,
            state.momentum,
            state.weights(tuple(plan.momentum_weights[c] for c in needed)),
            None if plan.edit_weights is None else state.weights(tuple(plan.edit_weights[c] for c in needed)),
            state.momentum_scale,
            state.momentum_beta,
        )
        return edit_term

    @staticmethod
    def guided_estimate(state: _Denoising, i: int, noise_uncond: torch.Tensor, noise_text: torch.Tensor,
                        edit_term: torch.Tensor | None) -> torch.Tensor:
        """e = e_u + (g + edit term + replayed guidance), summed in the reference's order; with guidance off
        (s_g <= 1), e = e_p + edit term + replayed guidance: the estimate of the run without edits, plus the edits."""
        if not state.edit_cfg:
            return noise_text
        if state.guidance_scale <= 1.0:
            noise_pred = noise_text
            if edit_term is not None:
                noise_pred = noise_pred + edit_term
            if state.sem_guidance is not None:
                noise_pred = noise_pred + state.sem_guidance[i]
            return noise_pred
        noise_guidance = classifier_free_guidance(noise_uncond, noise_text, state.guidance_scale)
        if edit_term is not None:
            noise_guidance = noise_guidance + edit_term
        if state.sem_guidance is not None:
            noise_guidance = noise_guidance + state.sem_guidance[i]
        return noise_uncond + noise_guidance

    def decode_pair(self, latents: torch.Tensor, plain: PlainRun, plain_latents: torch.Tensor | None, dtype):
        """Decode the edited latents and the plain run's (unless the cache holds its image) and run the
        safety checker: (image, nsfw, original image or None, its nsfw)."""
        if plain.image is not None:
            return (*self._decode(latents, dtype), plain.image, plain.nsfw)
        if plain_latents is None or plain_latents is latents:
            image, nsfw = self._decode(latents, dtype)
            return image, nsfw, (None if plain_latents is None else image), nsfw
        if plain.separate:
            # Each image on its own: a batch of two can round differently from a batch of one.
            return (*self._decode(latents, dtype), *self._decode(plain_latents, dtype))
        batch = latents.shape[0]
        decoded, flags = self._decode(torch.cat([latents, plain_latents]), dtype)
        nsfw, original_nsfw = (None, None) if flags is None else (list(flags[:batch]), list(flags[batch:]))
        return decoded[:batch], nsfw, decoded[batch:], original_nsfw

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
            scheduler = copy.deepcopy(inversion.scheduler)
            return scheduler, inversion.latents.to(device=device, dtype=dtype), inversion.noise_maps.to(device, dtype)
        scheduler = copy.deepcopy(scheduler if scheduler is not None else self.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(batch, self.unet.config.in_channels, height, width, dtype, device, generator,
                                       latents, scheduler.init_noise_sigma)
        return scheduler, latents, None

    # ------------------------------------------------------------------------------------------
    # Real images
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def invert(
        self,
        image: PIL.Image.Image | list[PIL.Image.Image] | torch.Tensor,
        source_prompt: str = "",
        num_inference_steps: int = 50,
        skip: float = 0.15,
        source_guidance_scale: float = 3.5,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict | None] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        stop: StopFlag | None = None,
    ) -> SegaInversion:
        r"""Invert a real image for editing (edit-friendly DDPM inversion, as LEDITS++ with DDIM).

        Then ``pipe(source_prompt, inversion=inv, concepts=[...], return_original=True)`` edits it; the image
        without edits is the input as the VAE sees it.

        Args:
            image: a PIL image (or a list of same-size images) or a tensor (3, H, W) / (B, 3, H, W) in [-1, 1];
                H and W multiples of 8 (resize first).
            source_prompt: a description of the image; "" for none. Guides the inversion with
                ``source_guidance_scale`` and is the prompt to edit with.
            num_inference_steps: steps of the whole schedule, >= 1, including the skipped ones (SD: 50).
            skip: in [0, 1): the share of the first (noisiest) steps skipped, i.e. how much of the image is
                kept: 0 inverts from pure noise (edits can change everything), 0.15 (default) to 0.3 keeps the
                layout. The edit runs ``num_inference_steps - int(skip * num_inference_steps)`` steps.
            source_guidance_scale: classifier-free guidance of ``source_prompt`` during inversion, >= 0
                (LEDITS++: 3.5; <= 1 uses the prompt's estimate alone). Edits use the same by default.
            generator: draws the independent noisy versions of the image; same generator state, same inversion.
            use_cache: read and fill ``inversion_cache`` (keyed by the image content and every setting).
            callback_on_step_end: ``f(pipe, step, t, tensors)``, called after each inversion step (steps 0 to
                n-1 of the n performed ones, from the noisiest; none on a cache hit) with "latents", where that
                step lands, as diffusers' pipelines call it after a denoising step; its return value is ignored
                (an inversion's latents are fixed by the image). Raise in it to stop the inversion: nothing is
                returned or cached. Progress bars and stop buttons use it; an edit's total work is n inversion
                steps plus n denoising steps.
            callback_on_step_end_tensor_inputs: tensors passed to ``callback_on_step_end`` ("latents").
            stop: as in :meth:`__call__`: checked before every inversion step; once set, raises
                :class:`~sega.stopping.Stopped` and nothing is returned or cached.

        Returns:
            :class:`~sega.inversion.SegaInversion` with the start latents, noise maps, ``cache_hit`` and the
            UNet calls/samples spent.
        """
        # 1. Check inputs
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if not 0 <= skip < 1:
            raise ValueError(f"skip must be in [0, 1), got {skip!r}")
        if not source_guidance_scale >= 0:
            raise ValueError(f"source_guidance_scale must be >= 0, got {source_guidance_scale!r}")
        if not isinstance(source_prompt, str):
            raise ValueError(f"source_prompt must be a string, got {type(source_prompt).__name__}")
        if set(callback_on_step_end_tensor_inputs) - {"latents"}:
            raise ValueError('callback_on_step_end_tensor_inputs of invert may only name "latents"')
        pixels = image_to_tensor(image, self.image_processor)
        device, dtype = self._execution_device, self.unet.dtype

        # 2. The cache: same pixels, settings, random stream and model placement, same inversion
        scheduler = inversion_scheduler(self.scheduler.config)
        key = hashlib.sha256(pixels.numpy().tobytes() + json.dumps(
            [source_prompt, num_inference_steps, skip, float(source_guidance_scale), str(device), str(dtype),
             dict(scheduler.config), list(pixels.shape)], sort_keys=True, default=str).encode()
            + (generator_fingerprint(generator) or b"global")).hexdigest()
        cached = self.inversion_cache.get(key) if use_cache and generator is not None else None
        if cached is not None:
            return dataclasses.replace(cached, cache_hit=True, unet_calls=0, unet_samples=0)

        # 3. Encode the image and the prompts (the unconditional one as a call without negative prompt has it)
        x0 = self.encode_pixels(pixels).to(dtype)
        batch = x0.shape[0]
        do_cfg = source_guidance_scale > 1.0
        height, width = pixels.shape[-2:]
        prompts, negatives = self.check_inputs(source_prompt, None, height, width, num_inference_steps, None, ())
        embeddings = self.encode_prompts(prompts, negatives, batch, _Concepts(None, None, [], [], [], [], []),
                                         use_cache, height=height, width=width)
        state = _Denoising(scheduler=scheduler, timesteps=scheduler.timesteps, step_kwargs={}, generator=generator,
                           batch=batch, guidance_scale=source_guidance_scale, edit_cfg=do_cfg, embeddings=embeddings,
                           momentum=torch.zeros_like(x0))

        # 4. Timesteps: the whole schedule, of which the last n are performed
        scheduler.set_timesteps(num_inference_steps, device=device)
        n = performed_steps(num_inference_steps, skip)
        timesteps = scheduler.timesteps[-n:]

        # 5. Independent noisy versions x_t of the image, drawn from the least noisy up (as LEDITS++)
        xts = [None] * n
        for k in reversed(range(n)):
            noise = randn_tensor(x0.shape, generator=generator, device=device, dtype=x0.dtype)
            xts[k] = scheduler.add_noise(x0, noise, timesteps[k : k + 1].long())
        xts.append(x0)

        # 6. Noise maps, from the noisiest step down; each step's landing point is the next step's input
        zs = []
        segments = ["u", "p"] if do_cfg else ["p"]
        for k, t in enumerate(self.progress_bar(timesteps)):
            check_stop(stop, k, n, stage="inversion")
            chunks = self._unet_step(state, t, [(scheduler.scale_model_input(xts[k], t), segments)])
            noise_pred = chunks[0]
            if do_cfg:
                noise_pred = noise_pred + classifier_free_guidance(chunks[0], chunks[1], source_guidance_scale)
            z, xts[k + 1] = noise_map(scheduler, xts[k + 1], xts[k], t, noise_pred)
            zs.append(z)
            if callback_on_step_end is not None:
                tensors = {"latents": xts[k + 1]}
                callback_on_step_end(self, k, t, {name: tensors[name] for name in callback_on_step_end_tensor_inputs})

        inversion = SegaInversion(
            latents=xts[0], noise_maps=torch.stack(zs), image_latents=x0, timesteps=timesteps, scheduler=scheduler,
            source_prompt=source_prompt, source_guidance_scale=float(source_guidance_scale),
            num_inference_steps=num_inference_steps, skip=float(skip), height=int(height), width=int(width),
            key=key, unet_calls=state.unet_calls, unet_samples=state.unet_samples,
        )
        if use_cache and generator is not None:
            self.inversion_cache.put(key, inversion)
        return inversion

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
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
        use_cache: bool = True,
        original_first: bool = False,
        use_reedit_cache: bool = True,
        use_cross_attn_mask: bool = False,
        use_intersect_mask: bool = False,
        user_mask: torch.Tensor | np.ndarray | PIL.Image.Image | list[PIL.Image.Image] | None = None,
        inversion: SegaInversion | None = None,
        scheduler=None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        stop: StopFlag | None = None,
    ):
        r"""Generate images, steered by edit concepts.

        Args:
            prompt: the prompt or prompts (a list makes a batch).
            height, width: image size in pixels, multiples of 8; default the UNet's native size (or the
                inversion's).
            num_inference_steps: denoising steps, >= 1, default 50. More is slower and usually finer (SD: 50).
                With ``inversion``, the inversion's (leave it out).
            guidance_scale: classifier-free guidance s_g, default 7.5 (with ``inversion``, its
                ``source_guidance_scale``: the image without edits is then the input). Values <= 1 turn it off:
                both images then follow the prompt's estimate e_p alone, the edited one plus the edit term
                (e = e_p + sum of psi_c, the concept directions still s_c (e_c - e_u), so the unconditional
                estimate is still computed for them), so the pair stays the same picture with and without
                edits whatever the value in [0, 1]. The deprecated pipeline silently dropped the edits there;
                this logs a warning.
            negative_prompt: replaces the empty prompt of the unconditional estimate.
            num_images_per_prompt: images per prompt, >= 1.
            eta: DDIM eta in [0, 1]; only for schedulers that take it.
            generator: torch generator(s) for reproducibility; also the key of the re-edit cache.
            latents: initial noise instead of drawing it from ``generator``.
            output_type: "pil", "np", "pt" or "latent".
            return_dict: return a :class:`SegaPipelineOutput` instead of a tuple ``(images, nsfw)``.
            callback, callback_steps: legacy callback ``callback(step, t, latents)`` every ``callback_steps``
                steps, with the edited run's latents.
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
            sem_guidance: per-step edit terms recorded from another run, added to this one (replay).
            concepts: a list of :class:`EditConcept` (or dicts of its fields) instead of the
                ``editing_prompt``/``edit_*`` lists; momentum still comes from the two keywords above.
            return_original: also return the images without edits for the same noise, in the same call.
            return_sem_guidance: also return the per-step edit terms.
            use_cache: use the text-embedding and re-edit caches. ``False`` neither reads, clears nor fills
                either cache for this call (other callers' entries stay). A replayed run without edits is
                bit-identical; the edited image of a re-edit can differ from a one-pass run by float rounding
                (~1e-6), because UNet kernels round differently at different batch sizes.
            original_first: with ``return_original`` and a seed (``generator`` or ``latents``), compute the run
                without edits exactly as a call without edits would (its own UNet call at every step, decoded
                on its own) and let the edited run replay it until the edits start, as a re-edit does. Both
                images are then bit-identical whatever the cache held before (a server's answer never depends
                on earlier requests); it costs the same UNet samples as one pass, but up to one more UNet call
                per step. The two runs advance in step, so a callback or a stop acts on both. Without a seed it
                falls back to one pass.
            use_reedit_cache: ``False`` neither reads nor fills the re-edit cache for this call (the embedding
                cache still serves; ``use_cache=False`` turns both off). With ``return_original`` the pair is then
                computed in one pass: one UNet call per step, [plain u, p] + [edited u, p] + concepts once the
                edits start, the steps before shared. Every UNet batch (and the batched decode) then depends on
                the call's arguments only, so the same call gives bit-identical images whatever ran before, at
                one pass's cost. The app calls it so. A re-edit that replays the cache does less work (no UNet
                samples for the run without edits) but computes the edited run in smaller batches, which
                round differently (~1e-6); under bit-identity there is nothing to replay.
            use_cross_attn_mask: LEDITS++'s implicit mask (Brack et al., CVPR 2024): each concept edits only where
                its own tokens' cross-attention map (a quarter of the latent size, layers and heads averaged,
                3x3 Gaussian) reaches its ``edit_threshold`` quantile, which then no longer thresholds the edit
                per channel. Needs concept texts (not ``editing_prompt_embeddings``). Default off (SEGA).
            use_intersect_mask: the cross-attention mask times a noise mask (|psi| summed over channels, kept at
                its ``edit_threshold`` quantile); the cross-attention mask alone while t > 0.8 T (SD: 800).
                Turns the cross-attention mask on. Momentum, warmup, cooldown and weights act on the masked
                directions as without masks. ``edit_masks`` in the output holds the masks applied.
            user_mask: where edits may act, per image, in [0, 1] (1 = edit): a tensor or array (H, W), (B, H, W)
                or (B, 1, H, W) at the latent or the image size (averaged down), or PIL images (white = edit).
                Multiplied into every concept's direction before thresholds and masks.
            scheduler: a scheduler for this call only (copied), instead of ``self.scheduler``.
            inversion: edit a real image: the result of :meth:`invert`. The edit starts from its latents at its
                first timestep and each DDIM step (eta 1) takes its noise map; ``prompt`` should be its
                ``source_prompt`` (another prompt edits by prompt, as in DDPM inversion). The run without edits
                (``return_original``) then reconstructs the input as the VAE sees it. Size, steps, noise and
                scheduler come from the inversion: ``latents``, ``scheduler`` and ``eta`` must stay unset and
                the batch (prompts x ``num_images_per_prompt``) must match the inverted images.
            callback_on_step_end: ``f(pipe, step, t, tensors) -> dict``, called once per step (steps 0 to
                N-1, also with ``original_first``) after the edited run's scheduler step, with the edited
                run's latents. Returning new "latents" changes the edited run only: the run without edits
                (returned as the original and kept in the re-edit cache) goes on from the scheduler's latents.
                Raise in it to end the call (the exception is passed on; nothing is cached). Callbacks that change the latents in place are not supported.
            stop: this call's stop flag (anything with ``is_set()``, e.g. a ``threading.Event``), checked before
                every step: once it is set the call raises :class:`~sega.stopping.Stopped` and returns and caches
                nothing. Per call, so concurrent calls on one pipeline stop independently.
            callback_on_step_end_tensor_inputs: tensors passed to ``callback_on_step_end``: "latents", and
                "pred_original_sample", the clean latents x0 that the step's estimate predicts (for previews:
                :mod:`sega.previews`).

        Returns:
            :class:`SegaPipelineOutput`, or a tuple ``(images, nsfw_content_detected)``.
        """
        # 1. Check inputs and resolve the concepts from either API
        height, width, num_inference_steps, guidance_scale = self.check_inversion_inputs(
            inversion, height, width, num_inference_steps, guidance_scale, latents, scheduler, eta)
        prompts, negative_prompts = self.check_inputs(prompt, negative_prompt, height, width, num_inference_steps,
                                                      callback_steps, callback_on_step_end_tensor_inputs)
        cc = self._resolve_concepts(concepts, editing_prompt, editing_prompt_embeddings, reverse_editing_direction,
                                    edit_guidance_scale, edit_warmup_steps, edit_cooldown_steps, edit_threshold,
                                    edit_weights)
        device = self._execution_device
        batch = len(prompts) * num_images_per_prompt
        do_cfg = guidance_scale > 1.0
        has_edits = len(cc) > 0 or sem_guidance is not None
        if has_edits and not do_cfg:
            logger.warning(
                f"guidance_scale={guidance_scale} <= 1: classifier-free guidance is off; both images follow the "
                "prompt's estimate, and the edits are added to it (the deprecated pipeline ignored them)."
            )

        # 2. Encode the prompt, the negative prompt and the concepts
        embeddings = self.encode_prompts(prompts, negative_prompts, num_images_per_prompt, cc, use_cache,
                                         height=height, width=width)
        dtype = self.unet.dtype  # the embeddings' dtype

        # 3. Timesteps on a copy of the scheduler (never shared between calls or threads), initial latents
        if inversion is not None and inversion.batch_size != batch:
            raise ValueError(f"inversion holds {inversion.batch_size} image(s) but prompt x num_images_per_prompt "
                             f"makes a batch of {batch}")
        reproducible = generator is not None or latents is not None or inversion is not None
        scheduler, latents, noise_maps = self.prepare_timesteps_and_latents(
            inversion, scheduler, num_inference_steps, batch, height, width, dtype, generator, latents)
        eta = 1.0 if inversion is not None else eta

        # 4. Plan the edits: which concepts matter at each step, where the edited run leaves the plain one
        n_steps = len(scheduler.timesteps) if inversion is None else len(inversion.timesteps)
        plans, needed, diverge = self.plan_edits(cc, n_steps, do_cfg, edit_momentum_scale, sem_guidance is not None)
        state = _Denoising(
            scheduler=scheduler, timesteps=scheduler.timesteps if inversion is None else inversion.timesteps,
            step_kwargs=step_kwargs(scheduler, generator, eta, noise_maps), noise_maps=noise_maps,
            generator=generator, batch=batch, guidance_scale=guidance_scale, edit_cfg=do_cfg or has_edits,
            embeddings=embeddings, concepts=cc, plans=plans, needed=needed,
            signed_scales=torch.tensor(cc.signed_scales, device=device, dtype=torch.float32),
            thresholds=torch.tensor(cc.thresholds, device=device, dtype=torch.float32),
            momentum=torch.zeros_like(latents), momentum_scale=edit_momentum_scale, momentum_beta=edit_mom_beta,
            sem_guidance=None if sem_guidance is None else [g.to(device=device, dtype=dtype) for g in sem_guidance],
            recorded_guidance=[] if return_sem_guidance else None,
            masks=self.prepare_masks(cc, use_cross_attn_mask, use_intersect_mask, user_mask, latents, height, width,
                                     scheduler, scheduler.timesteps if inversion is None else inversion.timesteps),
        )

        # 5. The run without edits: from the re-edit cache, computed on its own (original_first), or alongside
        key = None
        if use_cache and use_reedit_cache and (return_original or not has_edits):
            key = reedit_key(prompts, negative_prompts, num_images_per_prompt, height, width, num_inference_steps,
                             guidance_scale, eta, scheduler, generator, latents, device, self.unet.dtype,
                             source=None if inversion is None else inversion.key)
        plain = self.prepare_plain_run(state, key, diverge, return_original, original_first and reproducible,
                                       has_edits)
        plain.start(scheduler, generator, latents, eta, noise_maps)

        # 6. Denoising loop (with masks: recording cross-attention maps, the UNet's processors put back after)
        with state.masks.recording(self.unet) if state.masks is not None else contextlib.nullcontext():
            latents = self.denoise(state, latents, plain, callback, callback_steps, callback_on_step_end,
                                   callback_on_step_end_tensor_inputs, stop)

        # 7. Decode, keep the plain run for re-edits, post-process
        plain_latents = plain.final_latents(latents)
        if output_type == "latent":
            image, nsfw, original, original_nsfw = latents, None, plain_latents, None
        else:
            image, nsfw, original, original_nsfw = self.decode_pair(latents, plain, plain_latents, dtype)
        trajectory = plain.finished(n_steps)
        if trajectory is not None and key is not None:
            trajectory.final_latents = plain_latents
            if output_type != "latent":
                # The decoded image too, so that a re-edit returns the very same original.
                trajectory.image, trajectory.nsfw = original, original_nsfw
            self.reedit_cache.put(key, trajectory)
        if not (return_original and plain.wanted):
            original, original_nsfw = None, None

        images = self._postprocess(image, nsfw, output_type)
        originals = None if original is None else self._postprocess(original, original_nsfw, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, nsfw)
        return SegaPipelineOutput(images=images, nsfw_content_detected=nsfw, original_images=originals,
                                  original_nsfw_content_detected=original_nsfw, sem_guidance=state.recorded_guidance,
                                  cache_hit=plain.cache_hit, unet_calls=state.unet_calls,
                                  unet_samples=state.unet_samples,
                                  inversion_cache_hit=None if inversion is None else inversion.cache_hit,
                                  edit_masks=None if state.masks is None else state.masks.stacked(n_steps))
