"""Library keywords, as values and as source text: what a request's parameters become in ``pipe(...)`` and
``pipe.invert(...)``, for :func:`server.service.generate` (the values) and :mod:`server.snippets` (the text)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from sega.concepts import EditConcept
from sega.masks import MASK_MODES

SCHEDULERS = {"DDIM": DDIMScheduler, "DPM-Solver++": DPMSolverMultistepScheduler, "Euler": EulerDiscreteScheduler}


@dataclass(frozen=True)
class Keyword:
    """One keyword of a library call: Python source, and how to build the same value for a pipeline.

    ``call`` is the call it belongs to: ``"pipe"`` (``pipe(...)``) or ``"invert"`` (``pipe.invert(...)``).
    ``imports`` are the lines the source needs. :func:`server.service.generate` calls ``build(pipe)``;
    :mod:`server.snippets` writes ``source``.
    """

    name: str
    source: str
    build: Callable[[Any], Any]
    imports: tuple[str, ...] = ()
    call: str = "pipe"

    @classmethod
    def literal(cls, name: str, value, call: str = "pipe") -> Keyword:
        return cls(name, repr(value), lambda _pipe: value, call=call)


def generator_keyword(seed: int, call: str = "pipe") -> list[Keyword]:
    return [Keyword("generator", f'torch.Generator("cpu").manual_seed({seed})',
                    lambda _pipe: torch.Generator("cpu").manual_seed(seed), ("import torch",), call)]


def scheduler_keyword(name: str) -> list[Keyword]:
    cls = SCHEDULERS[name]
    return [Keyword("scheduler", f"{cls.__name__}.from_config(pipe.scheduler.config)",
                    lambda pipe: cls.from_config(pipe.scheduler.config), (f"from diffusers import {cls.__name__}",))]


def concepts_keyword(concepts: tuple[EditConcept, ...]) -> list[Keyword]:
    if not concepts:
        return []  # no concepts: a plain Stable Diffusion run
    items = "".join(
        "\n        EditConcept(" + ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(c).items()) + "),"
        for c in concepts
    )
    return [Keyword("concepts", f"[{items}\n    ]", lambda _pipe: list(concepts), ("from sega import EditConcept",))]


def literal_keywords(*keywords: str, convert: Callable[[Any], Any] = lambda v: v) -> Callable[[Any], list[Keyword]]:
    """The value as literal keyword(s): ``"name"`` for ``pipe(...)``, ``"invert.name"`` for ``pipe.invert(...)``."""
    def build(value) -> list[Keyword]:
        out = []
        for keyword in keywords:
            call, _, name = keyword.rpartition(".")
            out.append(Keyword.literal(name, convert(value), call or "pipe"))
        return out
    return build


def mask_keyword(mode: str) -> list[Keyword]:
    """"none" adds no keyword (plain SEGA); the others LEDITS++'s flag (sega.masks.MASK_MODES)."""
    return [Keyword.literal(name, value) for name, value in MASK_MODES[mode].items()]


# Fixed keywords of every app call (/generate and /edit): both images (for /edit, the reconstruction without
# edits), in one pass (one UNet call per step for both).
APP_KEYWORDS = [Keyword.literal("return_original", True)]
