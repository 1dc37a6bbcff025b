"""SegaFluxPipeline: semantic guidance (SEGA, Brack et al. 2023, arXiv 2301.12247) on FLUX.1 [dev] / [schnell].

Guidance-distilled FLUX has no unconditional estimate, so a concept's direction is taken against the prompt's
velocity: psi_c = s_c (+-1) (v_c - v_p), or against the negative prompt's, psi_c = s_c (+-1) (v_c - v_n), with
true classifier-free guidance (``true_cfg_scale > 1`` and a negative prompt), where the prompt's estimate is
v_n + true_cfg (v_p - v_n) as in diffusers' ``FluxPipeline``. The edited velocity is that estimate plus the
edit term of :mod:`sega.guidance` (warmup, cooldown, weights, momentum: one implementation for all pipelines).

Thresholding: FLUX's latents are packed, (B, ch, H, W) -> (B, H/2 * W/2, 4 ch). The directions are unpacked to
(C, B, ch, H, W) and thresholded per (image, latent channel) over the H * W positions by
:func:`sega.guidance.concept_directions`, as SEGA defines it (the community pipeline's
``flatten(start_dim=2)`` on the packed 3-D tensor is a no-op: it thresholds each token over its features and
leaves no spatial sparsity). Momentum lives in that unpacked layout; the edit term is packed back.

One transformer call per step: the prompt (and the negative prompt), every concept the step needs and, with
``return_original=True`` once the runs have diverged, the run without edits, in one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift, retrieve_timesteps
from diffusers.utils import BaseOutput

from .concepts import EditConcept, per_concept
from .guidance import StepPlan, concept_directions, concepts_needed, plan_step, semantic_guidance_step
from .prompts import TOKENIZER_LOCK
from .stopping import StopFlag, check_stop

DEFAULT_WARMUP_FRACTION = 0.15  # of the steps, when edit_warmup_steps is left out


@dataclass
class SegaFluxPipelineOutput(BaseOutput):
    """Output of :class:`SegaFluxPipeline`.

    Args:
        images: the images with edits (PIL images, a numpy array, a tensor, or packed latents for "latent").
        original_images: with ``return_original=True``, the images without edits for the same noise.
        unet_calls: transformer calls of this call (the name is the other pipelines'); one per step.
        unet_samples: the samples (batch rows) those calls evaluated.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    original_images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None
    unet_calls: int = 0
    unet_samples: int = 0


@dataclass
class _Text:
    """Encoded text: "p" prompt, "n" negative prompt, (B, seq, dim) and pooled (B, pooled dim); concepts (C, ...)."""

    embeds: dict[str, torch.Tensor]
    pooled: dict[str, torch.Tensor]
    concept_embeds: torch.Tensor
    concept_pooled: torch.Tensor
    text_ids: torch.Tensor

    def rows(self, segments: Sequence[str | int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder_hidden_states, pooled_projections) for a batch of segments, each B rows."""
        batch = self.embeds["p"].shape[0]
        embeds = [self.embeds[s] if isinstance(s, str) else self.concept_embeds[s].expand(batch, -1, -1)
                  for s in segments]
        pooled = [self.pooled[s] if isinstance(s, str) else self.concept_pooled[s].expand(batch, -1)
                  for s in segments]
        return torch.cat(embeds), torch.cat(pooled)


@dataclass
class _Denoising:
    """One call's denoising state, never kept on the pipeline."""

    timesteps: torch.Tensor
    image_ids: torch.Tensor
    guidance_scale: float | None  # None: the transformer has no guidance embedding
    true_cfg_scale: float | None  # None: no true CFG
    text: _Text
    concepts: list[EditConcept]
    height: int  # pixels, for unpacking
    width: int
    plans: list[StepPlan] = field(default_factory=list)
    needed: list[list[int]] = field(default_factory=list)
    diverge: int = 0  # the first step at which an edit applies: the runs with and without edits part there
    momentum_scale: float = 0.0
    momentum_beta: float = 0.0
    momentum: torch.Tensor | None = None  # unpacked (B, ch, H, W)
    joint_attention_kwargs: dict | None = None  # every transformer call's (a LoRA's scale)
    unet_calls: int = 0
    unet_samples: int = 0

    @property
    def base_segments(self) -> list[str]:
        return ["p", "n"] if self.true_cfg_scale is not None else ["p"]


def unpack(packed: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """(..., tokens, 4 ch) packed latents -> (..., ch, H, W), for any number of leading dims."""
    lead = packed.shape[:-2]
    flat = FluxPipeline._unpack_latents(packed.reshape(-1, *packed.shape[-2:]), height, width, vae_scale_factor)
    return flat.reshape(*lead, *flat.shape[1:])


def flux_concept_directions(base: torch.Tensor, concepts: torch.Tensor, signed_scales: torch.Tensor,
                            thresholds: torch.Tensor, height: int, width: int,
                            vae_scale_factor: int) -> torch.Tensor:
    """Thresholded concept directions psi_c = s_c (v_c - v_base) of packed FLUX velocities, unpacked.

    Args:
        base: (B, tokens, 4 ch) the velocity the directions are taken against (prompt, or negative prompt).
        concepts: (C, B, tokens, 4 ch) the concepts' velocities.
        signed_scales: (C,) edit scales, negated for concepts to remove.
        thresholds: (C,) in [0, 1): per (image, latent channel), only positions with |psi| at or above this
            quantile of |psi| over the channel's H * W positions are kept.
        height, width: the image size in pixels; vae_scale_factor: the VAE's downsampling.

    Returns:
        (C, B, ch, H, W) directions in the unpacked latent layout.
    """
    return concept_directions(unpack(base, height, width, vae_scale_factor),
                              unpack(concepts, height, width, vae_scale_factor), signed_scales, thresholds)


def resolve_concepts(concepts, editing_prompt, editing_prompt_embeds, reverse_editing_direction,
                     edit_guidance_scale, edit_warmup_steps, edit_cooldown_steps, edit_threshold,
                     edit_weights, num_inference_steps: int) -> list[EditConcept]:
    """The concepts of either API as validated :class:`EditConcept`; prompts "#0", "#1"... for embeddings."""
    if concepts is not None:
        if editing_prompt or editing_prompt_embeds is not None:
            raise ValueError("pass either concepts or editing_prompt/editing_prompt_embeds, not both")
        return [c if isinstance(c, EditConcept) else EditConcept(**c) for c in concepts]
    if editing_prompt:
        prompts = [editing_prompt] if isinstance(editing_prompt, str) else list(editing_prompt)
    elif editing_prompt_embeds is not None:
        prompts = [f"#{c}" for c in range(editing_prompt_embeds.shape[0])]
    else:
        return []
    n = len(prompts)
    if edit_warmup_steps is None:
        edit_warmup_steps = round(DEFAULT_WARMUP_FRACTION * num_inference_steps)
    weights = per_concept(1.0 if edit_weights is None else edit_weights, n, "edit_weights")
    return [EditConcept(prompt, scale=scale, threshold=threshold, warmup=warmup, cooldown=cooldown,
                        reverse=bool(reverse), weight=weight)
            for prompt, scale, threshold, warmup, cooldown, reverse, weight in zip(
                prompts, per_concept(edit_guidance_scale, n, "edit_guidance_scale"),
                per_concept(edit_threshold, n, "edit_threshold"),
                per_concept(edit_warmup_steps, n, "edit_warmup_steps"),
                per_concept(edit_cooldown_steps, n, "edit_cooldown_steps"),
                per_concept(reverse_editing_direction, n, "reverse_editing_direction"), weights)]


class SegaFluxPipeline(FluxPipeline):
    r"""Text-to-image generation on FLUX.1 with semantic guidance (SEGA).

    A :class:`~diffusers.FluxPipeline` (same components, ``from_pretrained`` and helpers: text encoding,
    latent packing, timesteps) whose ``__call__`` adds edit concepts. Load e.g.
    ``SegaFluxPipeline.from_pretrained("black-forest-labs/FLUX.1-schnell", dtype=torch.bfloat16)``.

    Args:
        scheduler: a ``FlowMatchEulerDiscreteScheduler``.
        vae: the ``AutoencoderKL`` that decodes latents (``scaling_factor`` and ``shift_factor`` are used).
        text_encoder, tokenizer: CLIP, for the pooled prompt embedding.
        text_encoder_2, tokenizer_2: T5, for the token embeddings (padded to ``max_sequence_length``).
        transformer: the ``FluxTransformer2DModel``; ``config.guidance_embeds`` is True for [dev], False for
            [schnell].
    """

    # "pred_original_sample": the clean latents the step's velocity predicts, unpacked (B, ch, H, W), for previews.
    _callback_tensor_inputs = ["latents", "pred_original_sample"]

    # ------------------------------------------------------------------------------------------
    # Steps of a call
    # ------------------------------------------------------------------------------------------

    def check_call_inputs(self, prompt, negative_prompt, height: int, width: int, num_inference_steps,
                          true_cfg_scale, edit_momentum_scale, edit_mom_beta, editing_prompt_embeds,
                          pooled_editing_prompt_embeds, max_sequence_length: int,
                          callback_on_step_end_tensor_inputs) -> tuple[list[str], list[str] | None]:
        """Validate the arguments; returns the prompts and one negative prompt per prompt (or None)."""
        self.check_inputs(prompt, None, height, width, negative_prompt=negative_prompt,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        multiple = self.vae_scale_factor * 2
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height} and {width}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if not 0 <= true_cfg_scale <= 100:
            raise ValueError(f"true_cfg_scale must be in [0, 100], got {true_cfg_scale!r}")
        if not 0 <= edit_mom_beta < 1:
            raise ValueError(f"edit_mom_beta must be in [0, 1), got {edit_mom_beta!r}")
        if not 0 <= edit_momentum_scale <= 100:
            raise ValueError(f"edit_momentum_scale must be in [0, 100], got {edit_momentum_scale!r}")
        if (editing_prompt_embeds is None) != (pooled_editing_prompt_embeds is None):
            raise ValueError("editing_prompt_embeds and pooled_editing_prompt_embeds go together")
        if editing_prompt_embeds is not None and editing_prompt_embeds.shape[1] != max_sequence_length:
            raise ValueError(f"editing_prompt_embeds must have max_sequence_length={max_sequence_length} tokens, "
                             f"got {editing_prompt_embeds.shape[1]}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt is None:
            return prompts, None
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}")
        return prompts, negatives

    def encode_texts(self, prompts: list[str], negatives: list[str] | None, concepts: list[EditConcept],
                     editing_prompt_embeds: torch.Tensor | None, pooled_editing_prompt_embeds: torch.Tensor | None,
                     num_images_per_prompt: int, max_sequence_length: int, lora_scale: float | None = None) -> _Text:
        """Every text of the call, all T5-padded to ``max_sequence_length`` so they batch together (through the
        LoRA'd text encoders at ``lora_scale``, as ``FluxPipeline.encode_prompt`` does)."""
        # FluxPipeline.encode_prompt tokenizes each text twice (padded, then unpadded for its truncation warning)
        with TOKENIZER_LOCK:
            device = self._execution_device
            embeds, pooled = {}, {}
            embeds["p"], pooled["p"], text_ids = self.encode_prompt(
                prompts, device=device, num_images_per_prompt=num_images_per_prompt,
                max_sequence_length=max_sequence_length, lora_scale=lora_scale)
            if negatives is not None:
                embeds["n"], pooled["n"], _ = self.encode_prompt(
                    negatives, device=device, num_images_per_prompt=num_images_per_prompt,
                    max_sequence_length=max_sequence_length, lora_scale=lora_scale)
            if editing_prompt_embeds is not None:
                concept_embeds = editing_prompt_embeds.to(device=device, dtype=embeds["p"].dtype)
                concept_pooled = pooled_editing_prompt_embeds.to(device=device, dtype=pooled["p"].dtype)
            elif concepts:
                concept_embeds, concept_pooled, _ = self.encode_prompt(
                    [c.prompt for c in concepts], device=device, max_sequence_length=max_sequence_length,
                    lora_scale=lora_scale)
            else:
                concept_embeds, concept_pooled = embeds["p"][:0], pooled["p"][:0]
            return _Text(embeds, pooled, concept_embeds[:, None], concept_pooled[:, None], text_ids)

    def prepare_timesteps(self, num_inference_steps: int, image_seq_len: int) -> torch.Tensor:
        """FluxPipeline's schedule: sigmas 1 -> 1/steps, shifted by mu for the image's token count."""
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(self.scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        config = self.scheduler.config
        mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, self._execution_device,
                                          sigmas=sigmas, mu=mu)
        self.scheduler.set_begin_index(0)
        return timesteps

    @staticmethod
    def plan_edits(state: _Denoising, momentum_scale: float, momentum_beta: float) -> None:
        """Per step, what happens to the concepts and which go into the batch; where the two runs part."""
        n_steps, concepts = len(state.timesteps), state.concepts
        warmup, cooldown = [c.warmup for c in concepts], [c.cooldown for c in concepts]
        weights = [c.weight for c in concepts]
        state.plans = [plan_step(i, warmup, cooldown, weights) for i in range(n_steps)]
        state.needed = concepts_needed(state.plans, momentum_scale) if concepts else [[] for _ in range(n_steps)]
        # Until an edit applies, the edited run's velocity is the plain run's (concepts only feed momentum).
        state.diverge = next((i for i, plan in enumerate(state.plans) if concepts and plan.edit_weights is not None),
                             n_steps)
        state.momentum_scale, state.momentum_beta = momentum_scale, momentum_beta

    def transformer_step(self, state: _Denoising, t: torch.Tensor,
                         parts: list[tuple[torch.Tensor, list]]) -> list[torch.Tensor]:
        """One transformer call on every (packed latents, segments) part; one (B, tokens, 4 ch) chunk per segment."""
        segments = [s for _, names in parts for s in names]
        hidden = torch.cat([z for z, names in parts for _ in names])
        embeds, pooled = state.text.rows(segments)
        rows = hidden.shape[0]
        guidance = None
        if state.guidance_scale is not None:
            guidance = torch.full([rows], state.guidance_scale, device=hidden.device, dtype=torch.float32)
        velocity = self.transformer(
            hidden_states=hidden,
            timestep=t.expand(rows).to(hidden.dtype) / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=state.text.text_ids,
            img_ids=state.image_ids,
            joint_attention_kwargs=state.joint_attention_kwargs,
            return_dict=False,
        )[0]
        state.unet_calls, state.unet_samples = state.unet_calls + 1, state.unet_samples + rows
        return list(velocity.split(parts[0][0].shape[0]))

    def prompt_estimate(self, state: _Denoising, chunks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(velocity of the run without edits, the velocity the concept directions are taken against)."""
        if state.true_cfg_scale is None:
            return chunks[0], chunks[0]
        prompt, negative = chunks[0], chunks[1]
        return negative + state.true_cfg_scale * (prompt - negative), negative

    def edit_term(self, state: _Denoising, i: int, base: torch.Tensor,
                  concept_velocities: list[torch.Tensor]) -> torch.Tensor | None:
        """This step's packed edit term (None when none applies), updating the momentum."""
        needed, plan = state.needed[i], state.plans[i]
        scales = torch.tensor([-c.scale if c.reverse else c.scale for c in state.concepts], device=base.device)
        thresholds = torch.tensor([c.threshold for c in state.concepts], device=base.device)
        if needed:
            psi = flux_concept_directions(base, torch.stack(concept_velocities), scales[needed],
                                          thresholds[needed], state.height, state.width, self.vae_scale_factor)
        else:
            psi = state.momentum.new_zeros((0, *state.momentum.shape))

        def weights(values):
            return torch.tensor([values[c] for c in needed], device=base.device, dtype=psi.dtype)

        term, state.momentum = semantic_guidance_step(
            psi, plan, state.momentum, weights(plan.momentum_weights),
            None if plan.edit_weights is None else weights(plan.edit_weights),
            state.momentum_scale, state.momentum_beta)
        if term is None:
            return None
        batch, channels, height, width = term.shape
        return self._pack_latents(term, batch, channels, height, width).to(base.dtype)

    def denoise(self, state: _Denoising, latents: torch.Tensor, return_original: bool, stop,
                callback_on_step_end, callback_on_step_end_tensor_inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoising loop: one transformer call per step. Returns (edited latents, latents without edits)."""
        plain = latents  # the same tensor as long as both runs are one
        for i, t in enumerate(self.progress_bar(state.timesteps)):
            check_stop(stop, i, len(state.timesteps))
            z_t = latents
            separate = return_original and (i >= state.diverge or plain is not latents)
            base_segments, needed = state.base_segments, state.needed[i]
            parts = [(plain, base_segments)] if separate else []
            parts.append((latents, base_segments + needed))
            chunks = self.transformer_step(state, t, parts)
            if separate:
                plain_velocity, _ = self.prompt_estimate(state, chunks[:len(base_segments)])
                chunks = chunks[len(base_segments):]
            velocity, base = self.prompt_estimate(state, chunks[:len(base_segments)])
            if state.concepts:
                term = self.edit_term(state, i, base, chunks[len(base_segments):])
                if term is not None:
                    velocity = velocity + term
            sigma = self.scheduler.sigmas[i]  # before the step: the scheduler's index is this step's
            if separate:  # one scheduler step for both runs: it counts its steps
                stepped = self.scheduler.step(torch.cat([velocity, plain_velocity]), t,
                                              torch.cat([latents, plain]), return_dict=False)[0]
                latents, plain = stepped.chunk(2)
            else:
                latents = plain = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                tensors = {"latents": latents}
                if "pred_original_sample" in callback_on_step_end_tensor_inputs:
                    # Flow matching: x_t = (1 - sigma) x0 + sigma noise and v = noise - x0, so x0 = x_t - sigma v.
                    x0 = z_t - sigma.to(z_t.device) * velocity
                    tensors["pred_original_sample"] = unpack(x0, state.height, state.width, self.vae_scale_factor)
                tensors = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                result = callback_on_step_end(self, i, t, tensors)
                latents = (result or {}).get("latents", latents)  # the run without edits goes on without it
        return latents, plain

    def decode(self, latents: torch.Tensor, height: int, width: int, output_type: str):
        """Packed latents -> images, as FluxPipeline decodes them."""
        if output_type == "latent":
            return latents
        latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type=output_type)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        guidance_scale: float = 3.5,
        true_cfg_scale: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        max_sequence_length: int = 512,
        concepts: Sequence[EditConcept | dict] | None = None,
        editing_prompt: str | list[str] | None = None,
        editing_prompt_embeds: torch.Tensor | None = None,
        pooled_editing_prompt_embeds: torch.Tensor | None = None,
        reverse_editing_direction: bool | list[bool] = False,
        edit_guidance_scale: float | list[float] = 5.0,
        edit_warmup_steps: int | list[int] | None = None,
        edit_cooldown_steps: int | list[int | None] | None = None,
        edit_threshold: float | list[float] = 0.9,
        edit_momentum_scale: float = 0.1,
        edit_mom_beta: float = 0.4,
        edit_weights: list[float] | None = None,
        return_original: bool = False,
        callback_on_step_end: Callable[[FluxPipeline, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        stop: StopFlag | None = None,
        joint_attention_kwargs: dict | None = None,
    ):
        r"""Generate images with FLUX, steered by edit concepts.

        Args:
            prompt: the prompt or prompts (a list makes a batch).
            height, width: image size in pixels, multiples of 16 (the VAE's 8 times FLUX's 2x2 packing);
                default 1024. Cost grows with the area.
            num_inference_steps: denoising steps, >= 1, default 28 ([dev]); [schnell] is distilled for 4.
            guidance_scale: the distilled guidance [dev] embeds, default 3.5 (typical 2 to 5); ignored by models
                without a guidance embedding ([schnell]).
            true_cfg_scale: real classifier-free guidance against ``negative_prompt`` in [0, 100], default 1.0
                (off). Above 1 with a negative prompt, the prompt's estimate is v_n + s (v_p - v_n) (two more
                transformer rows per image) and the concept directions are taken against v_n.
            negative_prompt: the prompt(s) of the true-CFG estimate; unused while ``true_cfg_scale`` <= 1.
            num_images_per_prompt: images per prompt, >= 1.
            generator: torch generator(s) for the initial noise.
            latents: packed initial noise (B, tokens, 4 ch) instead of drawing it.
            output_type: "pil", "np", "pt" or "latent" (packed latents).
            return_dict: return a :class:`SegaFluxPipelineOutput`; else a tuple ``(images,)``, or
                ``(images, original_images)`` with ``return_original``.
            max_sequence_length: T5 tokens, <= 512, default 512; every text (prompt, negative, concepts) is padded
                to it so they share one transformer batch. Fewer tokens are faster.
            concepts: :class:`EditConcept` objects (or dicts of their fields), the validated alternative to the
                ``editing_prompt`` keywords below; each carries its own warmup (EditConcept's default, 10, is
                Stable Diffusion's: pass ``warmup`` for FLUX's fewer steps).
            editing_prompt: the concept text(s).
            editing_prompt_embeds, pooled_editing_prompt_embeds: instead of ``editing_prompt``, precomputed concept
                embeddings (C, max_sequence_length, dim) and pooled embeddings (C, pooled dim), as
                ``encode_prompt`` returns them.
            reverse_editing_direction: per concept (or one for all), True moves away from it ("no beard").
            edit_guidance_scale: s_c in [0, 100], default 5; how hard a concept pulls. Velocities are about as
                large as SD's noise estimates; typical 2 to 8.
            edit_warmup_steps: the step index from which a concept is applied, in [0, 10000]. Default: 15% of the
                steps, rounded: 4 of [dev]'s 28, 1 of [schnell]'s 4. The first steps lay out the composition from
                pure noise; editing there changes the layout rather than the attribute, and a fixed warmup such
                as the community pipeline's 8 never edits at all on [schnell]'s 4 steps.
            edit_cooldown_steps: the step index at which a concept stops, or None (never).
            edit_threshold: lambda in [0, 1), default 0.9: per image and latent channel, only the positions whose
                |psi| reaches this quantile over the channel's H x W positions are edited (about 1 - lambda of them).
            edit_momentum_scale: s_m in [0, 100], default 0.1; momentum added to the edit term. Above 0 the
                concepts are also evaluated during warmup (momentum accumulates there).
            edit_mom_beta: beta in [0, 1), default 0.4; v <- beta v + (1 - beta) G.
            edit_weights: per-concept weights in [0, 100] (default 1 each).
            return_original: also return the images without edits for the same noise: both runs share every step
                before the first edit, then ride in the same transformer call.
            callback_on_step_end: called after each step as ``f(pipe, i, t, {"latents": ...})``; may return
                ``{"latents": new}`` for the edited run.
            callback_on_step_end_tensor_inputs: the tensors passed to it: "latents" (packed) and
                "pred_original_sample", the clean latents x0 = x_t - sigma_t v that the step predicts, unpacked
                (B, ch, H, W) in the pipeline's scaled latent space (for previews, e.g. :mod:`sega.previews`).
            stop: an object with ``is_set() -> bool`` (e.g. ``threading.Event``), checked before each step; once
                set, :class:`sega.stopping.Stopped` is raised.
            joint_attention_kwargs: passed to every transformer call, as ``FluxPipeline`` does; ``{"scale": s}``
                is the LoRA scale (``load_lora_weights``), applied to the text encoders too.

        Returns:
            :class:`SegaFluxPipelineOutput`, or a tuple (see ``return_dict``).
        """
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        # 1. Check inputs, resolve the concepts
        prompts, negatives = self.check_call_inputs(
            prompt, negative_prompt, height, width, num_inference_steps, true_cfg_scale, edit_momentum_scale,
            edit_mom_beta, editing_prompt_embeds, pooled_editing_prompt_embeds, max_sequence_length,
            callback_on_step_end_tensor_inputs)
        edit_concepts = resolve_concepts(concepts, editing_prompt, editing_prompt_embeds, reverse_editing_direction,
                                         edit_guidance_scale, edit_warmup_steps, edit_cooldown_steps, edit_threshold,
                                         edit_weights, num_inference_steps)
        do_true_cfg = true_cfg_scale > 1 and negatives is not None
        # 2. Encode the prompt, the negative prompt and the concepts
        text = self.encode_texts(prompts, negatives if do_true_cfg else None, edit_concepts, editing_prompt_embeds,
                                 pooled_editing_prompt_embeds, num_images_per_prompt, max_sequence_length,
                                 (joint_attention_kwargs or {}).get("scale"))
        # 3. Prepare the packed initial noise and the image token positions
        latents, image_ids = self.prepare_latents(
            len(prompts) * num_images_per_prompt, self.transformer.config.in_channels // 4, height, width,
            text.embeds["p"].dtype, self._execution_device, generator, latents)
        # 4. Timesteps, and the plan of the edits
        state = _Denoising(
            timesteps=self.prepare_timesteps(num_inference_steps, latents.shape[1]),
            image_ids=image_ids,
            guidance_scale=float(guidance_scale) if self.transformer.config.guidance_embeds else None,
            true_cfg_scale=float(true_cfg_scale) if do_true_cfg else None,
            text=text, concepts=edit_concepts, height=height, width=width,
            joint_attention_kwargs=joint_attention_kwargs,
        )
        self.plan_edits(state, edit_momentum_scale, edit_mom_beta)
        state.momentum = unpack(torch.zeros_like(latents), height, width, self.vae_scale_factor)
        # 5. Denoise
        latents, plain_latents = self.denoise(state, latents, return_original, stop, callback_on_step_end,
                                              callback_on_step_end_tensor_inputs)
        # 6. Decode
        images = self.decode(latents, height, width, output_type)
        original = None
        if return_original:
            original = images if plain_latents is latents else self.decode(plain_latents, height, width, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, original) if return_original else (images,)
        return SegaFluxPipelineOutput(images=images, original_images=original, unet_calls=state.unet_calls,
                                      unet_samples=state.unet_samples)
