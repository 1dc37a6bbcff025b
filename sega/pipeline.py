"""SegaPipeline: semantic guidance on Stable Diffusion 1.x/2.x, the successor of diffusers'
deprecated ``SemanticStableDiffusionPipeline``.

Same keywords, same images (latents within 1e-4 in fp32), plus:
- ``concepts=[EditConcept(...)]``, a validated alternative to the per-keyword lists;
- ``return_original=True``: the image without edits for the same seed in the same call, sharing every
  UNet evaluation until the first step at which an edit is applied;
- a bounded re-edit cache: when only the concepts change, the run without edits is replayed from memory;
- no device-to-host copies in the denoising loop, concept thresholds vectorised across concepts.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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

from .concepts import EditConcept
from .guidance import classifier_free_guidance, concept_directions, plan_step, semantic_guidance_step

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
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None
    original_images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None
    original_nsfw_content_detected: list[bool] | None = None
    sem_guidance: list[torch.Tensor] | None = None
    cache_hit: bool = False
    unet_calls: int = 0
    unet_samples: int = 0


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
class _PlainTrajectory:
    """The run without edits, as the re-edit cache keeps it: per step, the input latents, e_u, and
    the guided estimate fed to the scheduler; then the final latents and the decoded image."""

    latents: list[torch.Tensor]
    noise_uncond: list[torch.Tensor]
    noise_pred: list[torch.Tensor]
    final_latents: torch.Tensor | None = None
    image: torch.Tensor | None = None
    nsfw: list[bool] | None = None


class _LRU:
    """A small thread-safe LRU mapping, bounded by entry count."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key, value) -> None:
        if self.max_entries <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


def _per_concept(value, n: int, name: str) -> list:
    """The reference's broadcasting: one value for every concept, or a list with one per concept."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but there are {n} edit concepts")
        return list(value)
    return [value] * n


def _generator_fingerprint(generator) -> bytes | None:
    if generator is None:
        return None
    gens = generator if isinstance(generator, list) else [generator]
    return b"".join(g.get_state().cpu().numpy().tobytes() for g in gens)


def _clone_generator(generator):
    if generator is None:
        return None
    if isinstance(generator, list):
        return [_clone_generator(g) for g in generator]
    clone = torch.Generator(device=generator.device)
    clone.set_state(generator.get_state())
    return clone


class SegaPipeline(DiffusionPipeline, StableDiffusionMixin):
    r"""Text-to-image generation with semantic guidance (SEGA, Brack et al. 2023, arXiv 2301.12247).

    Built on diffusers components; load any Stable Diffusion 1.x/2.x checkpoint in diffusers format with
    ``SegaPipeline.from_pretrained(hub_id_or_folder, torch_dtype=...)`` or pass the components.

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
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor"]
    _exclude_from_cpu_offload = ["safety_checker"]
    _callback_tensor_inputs = ["latents"]

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
        self.reedit_cache = _LRU(reedit_cache_size)
        self.embedding_cache = _LRU(embedding_cache_size)

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
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP embeddings (len(texts), seq, dim) on the execution device, cached per text.

        Texts over the tokenizer's limit are truncated (end token kept, as StableDiffusionPipeline does)
        with a warning. Each text is encoded on its own so its embedding never depends on its batch.
        """
        # The UNet's dtype: transformers keeps a checkpoint's dtype where diffusers loads float32.
        device, dtype = self._execution_device, self.unet.dtype
        if not texts:
            return torch.zeros((0, self.tokenizer.model_max_length, self.text_encoder.config.hidden_size),
                               device=device, dtype=dtype)
        out = []
        for text in texts:
            key = (text, str(device), dtype)
            emb = self.embedding_cache.get(key)
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

    @staticmethod
    def _step_kwargs(scheduler, generator, eta: float) -> dict:
        params = set(inspect.signature(scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

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

    def _cache_key(self, prompts, negative_prompts, num_images_per_prompt, height, width, num_inference_steps,
                   guidance_scale, eta, scheduler, generator, latents) -> tuple | None:
        """Everything the run without edits depends on; None when it cannot be reproduced (no seed)."""
        if latents is not None:
            source = hashlib.sha256(latents.detach().float().cpu().numpy().tobytes()).hexdigest()
        elif generator is not None:
            source = hashlib.sha256(_generator_fingerprint(generator)).hexdigest()
        else:
            return None
        sched = json.dumps({"class": type(scheduler).__name__, **dict(scheduler.config)}, sort_keys=True, default=str)
        return (tuple(prompts), tuple(negative_prompts), num_images_per_prompt, height, width, num_inference_steps,
                float(guidance_scale), float(eta), sched, source, str(self._execution_device), self.unet.dtype)

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

    @property
    def interrupt(self) -> bool:
        return getattr(self, "_interrupt", False)

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
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
        scheduler=None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        r"""Generate images, steered by edit concepts.

        Args:
            prompt: the prompt or prompts (a list makes a batch).
            height, width: image size in pixels, multiples of 8; default the UNet's native size.
            num_inference_steps: denoising steps, >= 1. More is slower and usually finer (SD: 50).
            guidance_scale: classifier-free guidance s_g. Values <= 1 disable it for the image without
                edits; with edit concepts the unconditional estimate is still computed and the edits are
                applied (the deprecated pipeline silently dropped them), with a warning.
            negative_prompt: replaces the empty prompt of the unconditional estimate.
            num_images_per_prompt: images per prompt, >= 1.
            eta: DDIM eta in [0, 1]; only for schedulers that take it.
            generator: torch generator(s) for reproducibility; also the key of the re-edit cache.
            latents: initial noise instead of drawing it from ``generator``.
            output_type: "pil", "np", "pt" or "latent".
            return_dict: return a :class:`SegaPipelineOutput` instead of a tuple ``(images, nsfw)``.
            callback, callback_steps: legacy per-step callback ``callback(step, t, latents)``.
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
            use_cache: use the text-embedding and re-edit caches. A replayed run without edits is bit-identical;
                the edited image of a re-edit can differ from a one-pass run by float rounding (~1e-6),
                because UNet kernels round differently at different batch sizes.
            original_first: with ``return_original`` and a seed, compute the run without edits on its own
                first (it lands in the re-edit cache), then the edited run as a re-edit. Both images are then
                bit-identical whatever the cache held before (a server's answer never depends on earlier
                requests); it costs the same UNet samples as one pass but one more UNet call per step once
                the edits start. Needs the re-edit cache; without a seed it falls back to one pass.
            scheduler: a scheduler for this call only (copied), instead of ``self.scheduler``.
            callback_on_step_end: ``f(pipe, step, t, tensors) -> dict`` after every step; may replace
                "latents" (the edited trajectory). Set ``pipe._interrupt = True`` to stop early.
            callback_on_step_end_tensor_inputs: tensors passed to ``callback_on_step_end``.

        Returns:
            :class:`SegaPipelineOutput`, or a tuple ``(images, nsfw_content_detected)``.
        """
        # 0. Defaults and checks
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
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
            negative_prompts = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negative_prompts = [negative_prompt] * len(prompts)
        elif len(negative_prompt) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negative_prompt)} entries but prompt has {len(prompts)}")
        else:
            negative_prompts = list(negative_prompt)
        cc = self._resolve_concepts(concepts, editing_prompt, editing_prompt_embeddings, reverse_editing_direction,
                                    edit_guidance_scale, edit_warmup_steps, edit_cooldown_steps, edit_threshold,
                                    edit_weights)
        device = self._execution_device
        batch = len(prompts) * num_images_per_prompt
        do_cfg = guidance_scale > 1.0
        has_edits = len(cc) > 0 or sem_guidance is not None
        if has_edits and not do_cfg:
            logger.warning(
                f"guidance_scale={guidance_scale} <= 1: classifier-free guidance is off, but the edits are applied "
                "on the unconditional estimate (the deprecated pipeline silently ignored them)."
            )
        self._interrupt = False

        # 1. Encode prompt, negative prompt and concepts: (batch, seq, dim) each, in latent batch order.
        if not use_cache:
            self.embedding_cache.clear()

        def per_image(emb: torch.Tensor) -> torch.Tensor:
            return emb.repeat_interleave(num_images_per_prompt, dim=0)

        text_emb = per_image(self.encode_text(prompts))
        uncond_emb = per_image(self.encode_text(negative_prompts))
        if cc.prompts is not None:
            concept_emb = self.encode_text(cc.prompts)
        elif cc.embeddings is not None:
            concept_emb = cc.embeddings.to(device=device, dtype=text_emb.dtype)
        else:
            concept_emb = text_emb[:0, 0:1]
        concept_emb = concept_emb[:, None].expand(-1, batch, -1, -1)  # (C, batch, seq, dim)
        dtype = text_emb.dtype

        # 2. Timesteps, initial noise, per-call scheduler (never shared between calls or threads)
        scheduler_arg, latents_arg = scheduler, latents
        generator_at_start = _clone_generator(generator) if original_first and return_original else None
        scheduler = copy.deepcopy(scheduler if scheduler is not None else self.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        latents = self.prepare_latents(batch, self.unet.config.in_channels, height, width, dtype, device, generator,
                                       latents, scheduler.init_noise_sigma)

        # 3. Plan: which concepts matter at each step, and where the edited run leaves the plain one.
        n_steps = len(timesteps)
        plans = [plan_step(i, cc.warmup, cc.cooldown, cc.weights) for i in range(n_steps)]
        needed_per_step = self._concepts_needed(plans, edit_momentum_scale)
        if sem_guidance is not None or (len(cc) and not do_cfg):
            diverge = 0
        elif len(cc):
            diverge = min(min(cc.warmup), n_steps)
        else:
            diverge = n_steps
        need_plain = return_original and diverge < n_steps
        edit_cfg = do_cfg or has_edits  # the edited run always needs e_u when there are edits

        cache_key = None
        if use_cache and (return_original or not has_edits):
            cache_key = self._cache_key(prompts, negative_prompts, num_images_per_prompt, height, width,
                                        num_inference_steps, guidance_scale, eta, scheduler, generator, latents)
        cached: _PlainTrajectory | None = self.reedit_cache.get(cache_key) if cache_key is not None else None
        cache_hit = cached is not None
        plain_first = None
        if original_first and need_plain and cached is None and cache_key is not None and self.reedit_cache.max_entries:
            # The run without edits on its own, from the same noise; it lands in the cache and the edited
            # run below replays it, so both images are the same whether or not the cache held it before.
            plain_first = self(
                prompts, height=height, width=width, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, negative_prompt=negative_prompts,
                num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator_at_start,
                latents=latents_arg, output_type="latent" if output_type == "latent" else "pt",
                return_original=True, scheduler=scheduler_arg, callback=callback, callback_steps=callback_steps,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            )
            # None when it was interrupted (the loop then stops at once) or, with several requests at a
            # time, already evicted (this call then falls back to one pass).
            cached = self.reedit_cache.get(cache_key)
        record = _PlainTrajectory([], [], []) if cache_key is not None and cached is None else None

        signed_scales = torch.tensor(cc.signed_scales, device=device, dtype=torch.float32)
        thresholds = torch.tensor(cc.thresholds, device=device, dtype=torch.float32)
        device_tensors: dict[tuple, torch.Tensor] = {}

        def weights_on_device(values: tuple[float, ...]) -> torch.Tensor:
            if values not in device_tensors:
                device_tensors[values] = torch.tensor(values, device=device, dtype=dtype)
            return device_tensors[values]

        def embeddings_for(segments: tuple) -> torch.Tensor:
            # "u": unconditional, "p": prompt, int c: concept c. Built once per distinct batch layout.
            key = ("embeddings", *segments)
            if key not in device_tensors:
                named = {"u": uncond_emb, "p": text_emb}
                device_tensors[key] = torch.cat([named[s] if isinstance(s, str) else concept_emb[s] for s in segments])
            return device_tensors[key]

        momentum = torch.zeros_like(latents)
        sem_guidance = None if sem_guidance is None else [g.to(device=device, dtype=dtype) for g in sem_guidance]
        recorded_guidance: list[torch.Tensor] | None = [] if return_sem_guidance else None
        edit_kwargs = self._step_kwargs(scheduler, generator, eta)
        plain_scheduler, plain_kwargs, plain_latents = None, None, None
        unet_calls, unet_samples = (0, 0) if plain_first is None else (plain_first.unet_calls, plain_first.unet_samples)

        # 4. Denoising loop
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                break
            needed = needed_per_step[i]
            shared = i < diverge
            noise_pred = None
            if shared and cached is not None:
                # Re-edit: the plain run is in memory; only the concepts (when they matter yet) are evaluated.
                noise_uncond, noise_pred = cached.noise_uncond[i], cached.noise_pred[i]
                noise_concepts = None
                if needed:
                    z_in = scheduler.scale_model_input(latents, t)
                    out = self.unet(torch.cat([z_in] * len(needed)), t,
                                    encoder_hidden_states=embeddings_for(tuple(needed))).sample
                    unet_calls, unet_samples = unet_calls + 1, unet_samples + out.shape[0]
                    noise_concepts = out.view(len(needed), batch, *out.shape[1:])
            else:
                if i == diverge and need_plain and cached is None:
                    # The runs part here: the plain run gets its own scheduler state and random stream,
                    # exactly as if it were a separate call.
                    plain_scheduler = copy.deepcopy(scheduler)
                    plain_kwargs = self._step_kwargs(plain_scheduler, _clone_generator(generator), eta)
                    plain_latents = latents
                # One batched UNet call: [plain u, p] + [edited u, p] + [concepts on the edited latents].
                segments: list = []
                inputs: list[torch.Tensor] = []
                if plain_scheduler is not None:
                    zp = plain_scheduler.scale_model_input(plain_latents, t)
                    segments += ["u", "p"] if do_cfg else ["p"]
                    inputs += [zp] * (2 if do_cfg else 1)
                z_in = scheduler.scale_model_input(latents, t)
                segments += (["u", "p"] if edit_cfg else ["p"]) + needed
                inputs += [z_in] * ((2 if edit_cfg else 1) + len(needed))
                out = self.unet(torch.cat(inputs), t, encoder_hidden_states=embeddings_for(tuple(segments))).sample
                unet_calls, unet_samples = unet_calls + 1, unet_samples + out.shape[0]
                chunks = list(out.split(batch))
                if plain_scheduler is not None:
                    pu = chunks.pop(0)
                    plain_pred = pu + classifier_free_guidance(pu, chunks.pop(0), guidance_scale) if do_cfg else pu
                    if record is not None:
                        record.latents.append(plain_latents)
                        record.noise_uncond.append(pu)
                        record.noise_pred.append(plain_pred)
                    plain_latents = plain_scheduler.step(plain_pred, t, plain_latents, **plain_kwargs,
                                                         return_dict=False)[0]
                noise_uncond = chunks[0]
                noise_text = chunks[1] if edit_cfg else chunks[0]
                noise_concepts = torch.stack(chunks[-len(needed):]) if needed else None

            # Semantic guidance: thresholded directions, momentum, and this step's edit term.
            edit_term = None
            if len(cc):
                plan = plans[i]
                if noise_concepts is not None:
                    psi = concept_directions(noise_uncond, noise_concepts, signed_scales[needed], thresholds[needed])
                else:
                    psi = noise_uncond.new_zeros((0, *noise_uncond.shape))
                edit_term, momentum = semantic_guidance_step(
                    psi,
                    plan,
                    momentum,
                    weights_on_device(tuple(plan.momentum_weights[c] for c in needed)),
                    None if plan.edit_weights is None else weights_on_device(tuple(plan.edit_weights[c] for c in needed)),
                    edit_momentum_scale,
                    edit_mom_beta,
                )

            if noise_pred is None:
                # e = e_u + (g + edit term + replayed guidance), summed in the reference's order.
                if edit_cfg:
                    noise_guidance = classifier_free_guidance(noise_uncond, noise_text, guidance_scale)
                    if edit_term is not None:
                        noise_guidance = noise_guidance + edit_term
                    if sem_guidance is not None:
                        noise_guidance = noise_guidance + sem_guidance[i]
                    noise_pred = noise_uncond + noise_guidance
                else:
                    noise_pred = noise_text
                if record is not None and shared:
                    # Until the runs part, the edited run's estimates are the plain run's.
                    record.latents.append(latents)
                    record.noise_uncond.append(noise_uncond)
                    record.noise_pred.append(noise_pred)
            if recorded_guidance is not None:
                recorded_guidance.append(edit_term if edit_term is not None else torch.zeros_like(latents))

            latents = scheduler.step(noise_pred, t, latents, **edit_kwargs, return_dict=False)[0]
            if callback_on_step_end is not None:
                tensors = {"latents": latents}
                result = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                latents = (result or {}).get("latents", latents)
            if callback is not None and i % callback_steps == 0:
                callback(i // getattr(scheduler, "order", 1), t, latents)

        # 5. The plain run's final latents: computed alongside, from the cache, or identical to the edited run.
        original_latents = None
        if return_original:
            if plain_scheduler is not None:
                original_latents = plain_latents
            elif cached is not None:
                original_latents = cached.final_latents
            elif diverge >= n_steps:
                original_latents = latents
        # 6. Decode the edited and the plain images in one VAE call.
        original, original_nsfw = None, None
        if output_type == "latent":
            image, nsfw, original = latents, None, original_latents
        elif cached is not None and cached.image is not None and return_original:
            image, nsfw = self._decode(latents, dtype)
            original, original_nsfw = cached.image, cached.nsfw
        elif original_latents is None or original_latents is latents:
            image, nsfw = self._decode(latents, dtype)
            if original_latents is not None:
                original, original_nsfw = image, nsfw
        elif original_first:
            # Each image on its own: a batch of two can round differently from a batch of one.
            image, nsfw = self._decode(latents, dtype)
            original, original_nsfw = self._decode(original_latents, dtype)
        else:
            decoded, flags = self._decode(torch.cat([latents, original_latents]), dtype)
            image, original = decoded[:batch], decoded[batch:]
            nsfw, original_nsfw = (None, None) if flags is None else (list(flags[:batch]), list(flags[batch:]))

        if record is not None and not self.interrupt and len(record.noise_pred) == n_steps:
            record.final_latents = original_latents if return_original else latents
            if output_type != "latent":
                # Keep the decoded image too, so a re-edit returns the very same original.
                record.image, record.nsfw = (original, original_nsfw) if return_original else (image, nsfw)
            self.reedit_cache.put(cache_key, record)

        images = self._postprocess(image, nsfw, output_type)
        originals = None if original is None else self._postprocess(original, original_nsfw, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, nsfw)
        return SegaPipelineOutput(images=images, nsfw_content_detected=nsfw, original_images=originals,
                                  original_nsfw_content_detected=original_nsfw, sem_guidance=recorded_guidance,
                                  cache_hit=cache_hit, unet_calls=unet_calls, unet_samples=unet_samples)
