"""The server's limits on a request and on its queue, from the environment (with ZeroGPU's defaults on a
ZeroGPU Space)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from .loading import LoadedModel, on_zero_gpu


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"environment variable {name} must be a positive integer, got {raw!r}")
    return value


# ZeroGPU's documented limits (https://huggingface.co/docs/hub/spaces-zerogpu, "Usage Tiers" and "Duration
# Management"): a daily GPU quota of 2 minutes for unauthenticated visitors, 3.5 minutes for free accounts and
# 25 minutes for PRO; a call reserves its declared duration (60 s unless set), and a shorter one gets a better
# place in ZeroGPU's queue. A request whose reservation exceeds what the visitor has left is refused outright
# ("You have exceeded your ... quota (Ns requested vs. Ms left)"), so on ZeroGPU the default limits keep the
# largest request's reservation (server.service.gpu_duration: 60 steps, 6 concepts, 768 px -> 64 s) to about half of
# an anonymous visitor's day. SEGA_MAX_STEPS, SEGA_MAX_SIZE and SEGA_MAX_CONCEPTS still raise them.
ZERO_GPU_LIMITS = {"max_steps": 60, "max_size": 768, "max_concepts": 6}
# Each ZeroGPU call runs in its own forked worker on its own GPU slice, and a call waits in ZeroGPU's own queue
# (up to 60 s, "No GPU was available after 60s") while it holds a Gradio slot. One slot would make every
# visitor wait behind one visitor's ZeroGPU queueing; four lets that many calls be scheduled at once while
# bounding the forked workers (each a copy-on-write copy of this process) a burst can start.
ZERO_GPU_CONCURRENCY = 4


@dataclass(frozen=True)
class Limits:
    """Server-side bounds on a request; set with SEGA_MAX_STEPS, SEGA_MAX_SIZE, SEGA_MAX_CONCEPTS,
    SEGA_MAX_PROMPT_CHARS, SEGA_MAX_IMAGE_MB and SEGA_MAX_IMAGE_PIXELS (on a ZeroGPU Space the defaults of the
    first three are :data:`ZERO_GPU_LIMITS`)."""

    max_steps: int = 100
    max_size: int = 1024
    max_concepts: int = 6
    max_prompt_chars: int = 1000
    max_image_mb: int = 25  # an uploaded image's file size
    max_image_pixels: int = 50_000_000  # its decoded size (a 50-megapixel photo); bigger is refused unread

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, zero_gpu_limits: Mapping[str, int] | None = None) -> Limits:
        """``zero_gpu_limits``: the served model's defaults on ZeroGPU (its profile's), else ZERO_GPU_LIMITS."""
        env = os.environ if env is None else env
        base = cls(**(zero_gpu_limits or ZERO_GPU_LIMITS)) if on_zero_gpu(env) else cls()
        return cls(
            max_steps=_env_int(env, "SEGA_MAX_STEPS", base.max_steps),
            max_size=_env_int(env, "SEGA_MAX_SIZE", base.max_size),
            max_concepts=_env_int(env, "SEGA_MAX_CONCEPTS", base.max_concepts),
            max_prompt_chars=_env_int(env, "SEGA_MAX_PROMPT_CHARS", base.max_prompt_chars),
            max_image_mb=_env_int(env, "SEGA_MAX_IMAGE_MB", base.max_image_mb),
            max_image_pixels=_env_int(env, "SEGA_MAX_IMAGE_PIXELS", base.max_image_pixels),
        )


def queue_settings(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(queue size, concurrency)`` from SEGA_QUEUE_SIZE (requests that may wait, default 32) and
    SEGA_CONCURRENCY (generations that run at the same time; default 1, on ZeroGPU :data:`ZERO_GPU_CONCURRENCY`,
    as each call there runs in its own worker)."""
    env = os.environ if env is None else env
    concurrency = ZERO_GPU_CONCURRENCY if on_zero_gpu(env) else 1
    return _env_int(env, "SEGA_QUEUE_SIZE", 32), _env_int(env, "SEGA_CONCURRENCY", concurrency)


def limits_for(loaded: LoadedModel, limits: Limits | Mapping[str, Limits] | None = None) -> Limits:
    """The limits a request on ``loaded`` is checked against: ``limits`` itself, or its entry for the model, or
    (None) the environment's, on ZeroGPU with the model profile's defaults."""
    if isinstance(limits, Limits):
        return limits
    if limits is not None and loaded.model_id in limits:
        return limits[loaded.model_id]
    return Limits.from_env(zero_gpu_limits=loaded.profile.zero_gpu_limits)
