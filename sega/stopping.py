"""Stopping a call from outside: one ``stop`` object per call, never state on the pipeline.

``pipe(..., stop=flag)`` and ``pipe.invert(..., stop=flag)`` take anything with ``is_set()`` (a
:class:`threading.Event`, a server's per-request cancel token). The loop checks it before every step; once it is
set the call raises :class:`Stopped` at that step boundary and returns and caches nothing (an inversion half
done never enters ``inversion_cache``). The flag belongs to the call, not to the pipeline, so several calls
sharing one pipeline in different threads stop independently, and nothing has to be reset between calls.
"""

from __future__ import annotations

from typing import Protocol


class StopFlag(Protocol):
    """What a ``stop=`` argument is: anything with ``is_set()``, e.g. a :class:`threading.Event`."""

    def is_set(self) -> bool: ...


class Stopped(Exception):
    """Raised by a pipeline call whose ``stop`` was set: the call ended at a step boundary; nothing is returned
    or cached."""


def check_stop(stop: StopFlag | None, done: int, total: int, stage: str = "denoising") -> None:
    """Raise :class:`Stopped` when ``stop`` is set (called before each step of a loop)."""
    if stop is not None and stop.is_set():
        during = " during the inversion," if stage == "inversion" else ""
        raise Stopped(f"Stopped{during} after {done} of {total} steps.")
