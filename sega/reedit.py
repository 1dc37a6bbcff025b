"""The run without edits next to the edited run: where it comes from, and the re-edit cache that keeps it.

A call with ``return_original=True`` (or with no edits at all) has a *plain run*: the same prompt, seed and
scheduler without edit concepts. It comes from one of three sources, all behind one small interface
(:class:`PlainRun`) that the denoising loop calls at fixed points of every step:

- :class:`SharedPlainRun`: identical to the edited run until the first step at which an edit is applied
  (every step when there are no edits), then computed alongside it in the same batched UNet call;
- :class:`ReplayedPlainRun`: replayed from a :class:`PlainTrajectory` in the re-edit cache: its estimates
  stand in for the edited run's own until the edits start, so only the concepts are evaluated;
- :class:`LockstepPlainRun` (``original_first``): computed on its own UNet call at every step, exactly as a
  run without edits would be, and replayed to the edited run like a cache entry. Its result never depends on
  what the cache held.

With ``use_reedit_cache=False`` the cache is neither read nor filled: a :class:`SharedPlainRun` then makes every
UNet batch depend on the call's arguments alone, so the same call gives the same bits whatever ran before.

The plain run never sees a step callback's changes: when a callback replaces the edited latents, the
edited run stops relying on the plain run's estimates and a shared plain run forks off with the latents
the scheduler produced, so what is recorded in the cache is always the run without edits.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .guidance import classifier_free_guidance

# One step's UNet evaluation: given (latent input, embedding names) parts, returns one chunk per name.
UNetFn = Callable[[torch.Tensor, list[tuple[torch.Tensor, list]]], list[torch.Tensor]]


class LRUCache:
    """A small thread-safe LRU mapping, bounded by entry count (0 keeps nothing)."""

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

    def keys(self) -> list:
        with self._lock:
            return list(self._data)

    def __len__(self) -> int:
        return len(self._data)


@dataclass
class PlainTrajectory:
    """The run without edits as the re-edit cache keeps it: per step, the input latents, e_u and the guided
    estimate fed to the scheduler; then the final latents and the decoded image (None for latent output)."""

    latents: list[torch.Tensor] = field(default_factory=list)
    noise_uncond: list[torch.Tensor] = field(default_factory=list)
    noise_pred: list[torch.Tensor] = field(default_factory=list)
    final_latents: torch.Tensor | None = None
    image: torch.Tensor | None = None
    nsfw: list[bool] | None = None

    def append(self, latents: torch.Tensor, noise_uncond: torch.Tensor, noise_pred: torch.Tensor) -> None:
        self.latents.append(latents)
        self.noise_uncond.append(noise_uncond)
        self.noise_pred.append(noise_pred)

    def __len__(self) -> int:
        return len(self.noise_pred)


def generator_fingerprint(generator) -> bytes | None:
    if generator is None:
        return None
    gens = generator if isinstance(generator, list) else [generator]
    return b"".join(g.get_state().cpu().numpy().tobytes() for g in gens)


def clone_generator(generator):
    """A generator at the same point of the same random stream (None stays None)."""
    if generator is None:
        return None
    if isinstance(generator, list):
        return [clone_generator(g) for g in generator]
    clone = torch.Generator(device=generator.device)
    clone.set_state(generator.get_state())
    return clone


def reedit_key(prompts: list[str], negative_prompts: list[str], num_images_per_prompt: int, height: int,
               width: int, num_inference_steps: int, guidance_scale: float, eta: float, scheduler, generator,
               latents: torch.Tensor | None, device, dtype, source: str | None = None) -> tuple | None:
    """Everything the run without edits depends on; None when it cannot be reproduced (no seed, no latents).

    The start is ``source`` (an inversion's key) when given, else the initial latents' content, else the
    generator's state.
    """
    if source is not None:
        source = f"inversion:{source}"
    elif latents is not None:
        source = hashlib.sha256(latents.detach().float().cpu().numpy().tobytes()).hexdigest()
    elif generator is not None:
        source = hashlib.sha256(generator_fingerprint(generator)).hexdigest()
    else:
        return None
    sched = json.dumps({"class": type(scheduler).__name__, **dict(scheduler.config)}, sort_keys=True, default=str)
    return (tuple(prompts), tuple(negative_prompts), num_images_per_prompt, height, width, num_inference_steps,
            float(guidance_scale), float(eta), sched, source, str(device), dtype)


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


class PlainRun:
    """No plain run: nothing is returned as the original and nothing recorded. Base of the three sources.

    The loop calls, at every step i: :meth:`advance` first, then :meth:`estimates` (the plain run's
    (e_u, e) when the edited run may use them instead of its own), :meth:`add_inputs` / :meth:`take` around
    the step's batched UNet call, :meth:`observe` with the edited run's estimates, and :meth:`after_step`
    after the scheduler step, with whether a callback then replaced the edited latents.
    """

    wanted = False  # returned as the original image
    cache_hit = False
    separate = False  # decoded on its own (as a run without edits would be)
    image: torch.Tensor | None = None
    nsfw: list[bool] | None = None

    def __init__(self, record: bool = False):
        self.record = PlainTrajectory() if record else None

    def start(self, scheduler, generator, latents: torch.Tensor, eta: float,
              noise_maps: torch.Tensor | None = None) -> None:
        pass

    def advance(self, i: int, t) -> None:
        pass

    def estimates(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def add_inputs(self, i: int, t, parts: list) -> None:
        pass

    def take(self, i: int, t, chunks: list[torch.Tensor]) -> None:
        pass

    def observe(self, i: int, latents: torch.Tensor, noise_uncond: torch.Tensor, noise_pred: torch.Tensor) -> None:
        pass

    def after_step(self, i: int, scheduler, generator, latents: torch.Tensor, replaced: bool) -> None:
        pass

    def final_latents(self, edited_latents: torch.Tensor) -> torch.Tensor | None:
        return None

    def finished(self, n_steps: int) -> PlainTrajectory | None:
        """The recorded trajectory when every step was recorded (None after an interruption)."""
        return self.record if self.record is not None and len(self.record) == n_steps else None


class _OwnRun:
    """A plain run's own scheduler state, random stream and latents once it no longer is the edited run."""

    def __init__(self, scheduler, generator, latents: torch.Tensor, eta: float, noise_maps: torch.Tensor | None,
                 do_cfg: bool, guidance_scale: float):
        self.scheduler = copy.deepcopy(scheduler)
        self.kwargs = step_kwargs(self.scheduler, clone_generator(generator), eta, noise_maps)
        self.noise_maps = noise_maps
        self.latents = latents
        self.do_cfg, self.guidance_scale = do_cfg, guidance_scale
        self.segments = ["u", "p"] if do_cfg else ["p"]

    def input(self, t) -> tuple[torch.Tensor, list]:
        return self.scheduler.scale_model_input(self.latents, t), self.segments

    def step(self, i: int, t, chunks: list[torch.Tensor],
             record: PlainTrajectory | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Consume this run's chunks from the front of ``chunks``; returns (e_u, e) and steps the latents."""
        noise_uncond = chunks.pop(0)
        noise_pred = noise_uncond
        if self.do_cfg:
            noise_pred = noise_uncond + classifier_free_guidance(noise_uncond, chunks.pop(0), self.guidance_scale)
        if record is not None:
            record.append(self.latents, noise_uncond, noise_pred)
        self.latents = scheduler_step(self.scheduler, self.kwargs, self.noise_maps, i, noise_pred, t, self.latents)
        return noise_uncond, noise_pred


class SharedPlainRun(PlainRun):
    """Identical to the edited run until step ``diverge`` (n_steps when there are no edits), then computed
    alongside it in the same UNet call, with its own copy of the scheduler state and random stream."""

    def __init__(self, diverge: int, n_steps: int, wanted: bool, record: bool, do_cfg: bool, guidance_scale: float):
        super().__init__(record)
        self.diverge, self.n_steps, self.wanted = diverge, n_steps, wanted
        self.do_cfg, self.guidance_scale = do_cfg, guidance_scale
        self.own: _OwnRun | None = None
        self.eta, self.noise_maps = 0.0, None

    def start(self, scheduler, generator, latents, eta, noise_maps=None):
        self.eta, self.noise_maps = eta, noise_maps
        if self.diverge == 0:
            self._fork(scheduler, generator, latents)

    def _fork(self, scheduler, generator, latents) -> None:
        self.own = _OwnRun(scheduler, generator, latents, self.eta, self.noise_maps, self.do_cfg, self.guidance_scale)

    def add_inputs(self, i, t, parts):
        if self.own is not None:
            parts.append(self.own.input(t))

    def take(self, i, t, chunks):
        if self.own is not None:
            self.own.step(i, t, chunks, self.record)

    def observe(self, i, latents, noise_uncond, noise_pred):
        if self.own is None and self.record is not None:
            self.record.append(latents, noise_uncond, noise_pred)

    def after_step(self, i, scheduler, generator, latents, replaced):
        if self.own is not None:
            return
        if replaced and not self.wanted:
            # Only kept for the cache, which is not worth an extra run: stop recording.
            self.record = None
            self.diverge = -1
        elif i + 1 == self.diverge < self.n_steps or replaced:
            self._fork(scheduler, generator, latents)

    def final_latents(self, edited_latents):
        if self.own is not None:
            return self.own.latents
        return edited_latents if self.diverge >= 0 else None


class ReplayedPlainRun(PlainRun):
    """Replayed from the re-edit cache: nothing is computed for it."""

    cache_hit = True

    def __init__(self, trajectory: PlainTrajectory, diverge: int, wanted: bool):
        super().__init__(record=False)
        self.trajectory, self.diverge, self.wanted = trajectory, diverge, wanted
        self.detached = False
        self.image, self.nsfw = trajectory.image, trajectory.nsfw

    def estimates(self, i):
        if self.detached or i >= self.diverge:
            return None
        return self.trajectory.noise_uncond[i], self.trajectory.noise_pred[i]

    def after_step(self, i, scheduler, generator, latents, replaced):
        self.detached = self.detached or replaced

    def final_latents(self, edited_latents):
        return self.trajectory.final_latents


class LockstepPlainRun(PlainRun):
    """``original_first``: the run without edits on its own UNet call at every step, from the same noise and
    random stream, so its numbers are those of a separate call; the edited run replays its estimates until
    the edits start, exactly as it would replay them from the cache."""

    separate = True

    def __init__(self, diverge: int, record: bool, do_cfg: bool, guidance_scale: float, unet: UNetFn):
        super().__init__(record)
        self.diverge, self.wanted = diverge, True
        self.do_cfg, self.guidance_scale, self.unet = do_cfg, guidance_scale, unet
        self.own: _OwnRun | None = None
        self.current: tuple[torch.Tensor, torch.Tensor] | None = None
        self.detached = False

    def start(self, scheduler, generator, latents, eta, noise_maps=None):
        self.own = _OwnRun(scheduler, generator, latents, eta, noise_maps, self.do_cfg, self.guidance_scale)

    def advance(self, i, t):
        z, segments = self.own.input(t)
        self.current = self.own.step(i, t, self.unet(t, [(z, segments)]), self.record)

    def estimates(self, i):
        return None if self.detached or i >= self.diverge else self.current

    def after_step(self, i, scheduler, generator, latents, replaced):
        self.detached = self.detached or replaced

    def final_latents(self, edited_latents):
        return self.own.latents
