"""The denoising loop of :class:`~sega.pipeline.SegaPipeline`: one call's state and its steps.

Each step is diffusers' loop step: scale the latents, one UNet call, guidance, one scheduler step. The UNet
batch holds, by segment ("u" unconditional, "p" prompt, an int c the concept c):

    [plain u, p]  +  [edited u, p]  +  [the concepts needed at this step, on the edited latents]

*The plain run* is the image without edits that ``return_original=True`` returns for the same noise. It is the
edited run itself until ``diverge``, the first step at which an edit is applied (SEGA's momentum builds up
before, but changes nothing): until then both are one set of rows. At ``diverge`` the runs split, and the
plain run goes on as :class:`PlainRun`, its rows first in the same UNet call. It keeps its own copy of the
scheduler and of the random stream, since multistep schedulers keep a history of estimates and stochastic
ones draw noise per run: a call without edits would do the same. A callback that replaces the edited latents
splits the runs too (the plain run goes on from the scheduler's latents), so the original never sees it.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from .attention import EditMasks
from .concepts import ConceptSettings
from .guidance import (
    StepPlan,
    classifier_free_guidance,
    concept_directions,
    concepts_needed,
    plan_step,
    semantic_guidance_step,
)
from .previews import predicted_original
from .stopping import StopFlag, check_stop


def clone_generator(generator):
    """A generator at the same point of the same random stream (None stays None)."""
    if generator is None:
        return None
    if isinstance(generator, list):
        return [clone_generator(g) for g in generator]
    clone = torch.Generator(device=generator.device)
    clone.set_state(generator.get_state())
    return clone


def step_kwargs(scheduler, generator, eta: float, noise_maps: torch.Tensor | None = None) -> dict:
    """``eta`` and ``generator`` for schedulers whose ``step`` takes them; with an inversion's noise maps,
    the generator stays out (the step's noise is the map)."""
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params and noise_maps is None:
        kwargs["generator"] = generator
    return kwargs


def scheduler_step(scheduler, kwargs: dict, noise_maps: torch.Tensor | None, i: int, noise_pred: torch.Tensor, t,
                   latents: torch.Tensor) -> torch.Tensor:
    """One scheduler step; step i of an inverted image takes its noise map as the variance noise."""
    if noise_maps is not None:
        kwargs = {**kwargs, "variance_noise": noise_maps[i]}
    return scheduler.step(noise_pred, t, latents, **kwargs, return_dict=False)[0]


def plan_edits(concepts: ConceptSettings, n_steps: int, do_cfg: bool, momentum_scale: float,
               replaying_guidance: bool) -> tuple[list[StepPlan], list[list[int]], int]:
    """Per step: what the reference does with the concepts, and which concepts go into the UNet batch;
    and ``diverge``, the first step at which the edited run leaves the run without edits (n_steps: never)."""
    plans = [plan_step(i, concepts.warmup, concepts.cooldown, concepts.weights) for i in range(n_steps)]
    needed = concepts_needed(plans, momentum_scale)
    if replaying_guidance:
        diverge = 0
    elif len(concepts) and not do_cfg:
        # Without guidance the run without edits has no e_u, which the concept directions need: the edited
        # run leaves it at the first step that evaluates a concept or applies an edit (until then both
        # estimates are e_p).
        diverge = next((i for i, (plan, n) in enumerate(zip(plans, needed)) if n or plan.edit_weights is not None),
                       n_steps)
    elif len(concepts):
        diverge = min(min(concepts.warmup), n_steps)
    else:
        diverge = n_steps
    return plans, needed, diverge


@dataclass
class PlainRun:
    """The run without edits after it split from the edited run: its own scheduler, random stream and latents."""

    scheduler: object
    step_kwargs: dict
    latents: torch.Tensor


@dataclass
class Denoising:
    """One call's denoising state. Never kept on the pipeline: calls may run in parallel threads."""

    scheduler: object
    timesteps: torch.Tensor
    batch: int
    guidance_scale: float
    embeddings: dict  # "u", "p": (batch, seq, dim); "c": (C, batch, seq, dim) (SDXL: dicts of such tensors)
    momentum: torch.Tensor
    edit_cfg: bool = True  # the edited run evaluates e_u and e_p (else e_p only)
    generator: torch.Generator | list[torch.Generator] | None = None
    eta: float = 0.0
    step_kwargs: dict = field(default_factory=dict)
    noise_maps: torch.Tensor | None = None  # an inversion's per-step variance noise
    concepts: ConceptSettings = field(default_factory=ConceptSettings.none)
    plans: list[StepPlan] = field(default_factory=list)
    needed: list[list[int]] = field(default_factory=list)  # per step, the concepts in the UNet batch
    diverge: int = 0  # the first step at which an edit is applied
    keep_plain: bool = False  # return_original: follow the run without edits
    plain: PlainRun | None = None  # the run without edits once it split from the edited run
    signed_scales: torch.Tensor | None = None
    thresholds: torch.Tensor | None = None
    momentum_scale: float = 0.0
    momentum_beta: float = 0.0
    sem_guidance: list[torch.Tensor] | None = None
    recorded_guidance: list[torch.Tensor] | None = None
    masks: EditMasks | None = None  # implicit masks (cross-attention, intersect, user mask)
    cross_attention_kwargs: dict | None = None  # passed to every UNet call ({"scale": s}: the LoRA scale)
    guidance_rescale: float = 0.0  # diffusers' rescale_noise_cfg on the guided estimates
    max_samples_per_call: int | None = None  # None: a step's samples in one UNet call
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

    def split_plain_run(self, latents: torch.Tensor) -> None:
        """The run without edits leaves the edited run at ``latents``, with copies of its scheduler state and
        random stream: from here on it draws what a call without edits would."""
        scheduler = copy.deepcopy(self.scheduler)
        kwargs = step_kwargs(scheduler, clone_generator(self.generator), self.eta, self.noise_maps)
        self.plain = PlainRun(scheduler, kwargs, latents)


def _index(value: torch.Tensor | dict, i: int) -> torch.Tensor | dict:
    return {k: _index(v, i) for k, v in value.items()} if isinstance(value, dict) else value[i]


def _rows(value: torch.Tensor | dict, start: int, stop: int) -> torch.Tensor | dict:
    return {k: _rows(v, start, stop) for k, v in value.items()} if isinstance(value, dict) else value[start:stop]


def sample_ranges(samples: int, max_samples_per_call: int | None) -> list[tuple[int, int]]:
    """[start, stop) row ranges of at most ``max_samples_per_call`` rows (None: one range), as even as possible."""
    if max_samples_per_call is None or samples <= max_samples_per_call:
        return [(0, samples)]
    calls = -(-samples // max_samples_per_call)
    bounds = [samples * k // calls for k in range(calls + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def rescaled(noise_pred: torch.Tensor, noise_text: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """diffusers' ``rescale_noise_cfg`` (0: unchanged)."""
    return rescale_noise_cfg(noise_pred, noise_text, guidance_rescale) if guidance_rescale > 0 else noise_pred


def _concat(values: list) -> torch.Tensor | dict:
    if isinstance(values[0], dict):
        return {k: _concat([v[k] for v in values]) for k in values[0]}
    return torch.cat(values)


class DenoisingMixin:
    """The loop's methods, for a pipeline with a ``unet`` and diffusers' ``progress_bar``."""

    def denoise(self, state: Denoising, latents: torch.Tensor, callback, callback_steps: int,
                callback_on_step_end, callback_on_step_end_tensor_inputs, stop: StopFlag | None = None) -> torch.Tensor:
        """The denoising loop; returns the edited latents (the plain run's are in ``state.plain``, if it split).
        The callbacks see the edited run's latents once per step. Raises :class:`~sega.stopping.Stopped` before
        a step once ``stop`` is set."""
        for i, t in enumerate(self.progress_bar(state.timesteps)):
            check_stop(stop, i, len(state.timesteps))
            if state.keep_plain and state.plain is None and i == state.diverge:
                state.split_plain_run(latents)
            stepped = self.denoise_step(state, i, t, latents)
            latents = stepped
            if callback_on_step_end is not None:
                tensors = {"latents": latents}
                if "pred_original_sample" in callback_on_step_end_tensor_inputs:
                    tensors["pred_original_sample"] = self.pred_original_sample(state, t)
                result = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                latents = (result or {}).get("latents", latents)
            if callback is not None and i % callback_steps == 0:
                callback(i // getattr(state.scheduler, "order", 1), t, latents)
            if latents is not stepped and state.keep_plain and state.plain is None:
                state.split_plain_run(stepped)  # a callback's latents are the edited run's alone
        return latents

    def denoise_step(self, state: Denoising, i: int, t, latents: torch.Tensor) -> torch.Tensor:
        """One step of the edited run, and of the plain run once split: one UNet call, a scheduler step each."""
        needed, plain = state.needed[i], state.plain
        model_input = state.scheduler.scale_model_input(latents, t)
        # e_u: for guidance, and (guidance off) only at the steps whose concept directions need it
        with_uncond = state.edit_cfg and (state.guidance_scale > 1.0 or bool(needed)
                                          or state.plans[i].edit_weights is not None)
        plain_segments = ["u", "p"] if state.guidance_scale > 1.0 else ["p"]
        parts = [] if plain is None else [(plain.scheduler.scale_model_input(plain.latents, t), plain_segments)]
        parts.append((model_input, ["u", "p"] if with_uncond else ["p"]))
        if needed:
            parts.append((model_input, needed))
        chunks = self.unet_batch(state, t, parts)

        if plain is not None:
            noise_pred = chunks.pop(0)
            if state.guidance_scale > 1.0:
                noise_text = chunks.pop(0)
                noise_pred = noise_pred + classifier_free_guidance(noise_pred, noise_text, state.guidance_scale)
                noise_pred = rescaled(noise_pred, noise_text, state.guidance_rescale)
            plain.latents = scheduler_step(plain.scheduler, plain.step_kwargs, state.noise_maps, i, noise_pred, t,
                                           plain.latents)

        noise_uncond = chunks.pop(0)
        noise_text = chunks.pop(0) if with_uncond else noise_uncond
        edit_term = self.semantic_guidance(state, i, noise_uncond, torch.stack(chunks) if needed else None)
        noise_pred = self.guided_estimate(state, i, noise_uncond, noise_text, edit_term)
        state.last_estimate = (model_input, noise_pred)
        if state.recorded_guidance is not None:
            state.recorded_guidance.append(edit_term if edit_term is not None else torch.zeros_like(latents))
        return scheduler_step(state.scheduler, state.step_kwargs, state.noise_maps, i, noise_pred, t, latents)

    def unet_batch(self, state: Denoising, t, parts: list[tuple[torch.Tensor, list]]) -> list[torch.Tensor]:
        """One UNet call on every (latent input, embedding segments) part; one chunk per segment."""
        segments = tuple(s for _, names in parts for s in names)
        if state.masks is not None:
            state.masks.expect(segments, state.batch)
        inputs = torch.cat([z for z, names in parts for _ in names])
        cond = state.layout(segments)
        cond = cond if isinstance(cond, dict) else {"encoder_hidden_states": cond}
        outs, dtype = [], inputs.dtype
        for start, stop in sample_ranges(inputs.shape[0], state.max_samples_per_call):
            if state.masks is not None:
                state.masks.select_rows(start, stop)
            # The UNet runs in its dtype; the estimates come back in the latents' (an inversion's: float32)
            outs.append(self.unet(inputs[start:stop].to(self.unet.dtype), t, **_rows(cond, start, stop),
                                  cross_attention_kwargs=state.cross_attention_kwargs).sample.to(dtype))
            state.unet_calls, state.unet_samples = state.unet_calls + 1, state.unet_samples + stop - start
        return list(torch.cat(outs).split(state.batch))

    @staticmethod
    def semantic_guidance(state: Denoising, i: int, noise_uncond: torch.Tensor,
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
    def guided_estimate(state: Denoising, i: int, noise_uncond: torch.Tensor, noise_text: torch.Tensor,
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
        return rescaled(noise_uncond + noise_guidance, noise_text, state.guidance_rescale)

    @staticmethod
    def pred_original_sample(state: Denoising, t) -> torch.Tensor:
        """The clean latents x0 that the edited run's latest estimate predicts (for previews)."""
        model_input, estimate = state.last_estimate
        alphas = state.scheduler.alphas_cumprod
        alpha_prod = alphas[min(max(int(round(float(t))), 0), len(alphas) - 1)]
        return predicted_original(model_input, estimate, alpha_prod, state.scheduler.config.prediction_type)
