"""The GPU-call boundary: what runs under ``@spaces.GPU``, and how its progress, result, errors and cancellation
cross into the process that serves the request.

On a ZeroGPU Space, ``spaces`` runs the decorated function in a forked worker process, so nothing in the main
process (a ``threading.Event``, Gradio's request state) reaches it, and an exception that is not a ``gr.Error``
comes back only as its class name. Hence:

- the GPU function is a generator (:func:`denoise`) that yields a :class:`Step` after every denoising step, then
  the result (or :class:`Stopped`): values, which cross the boundary as they are, and give progress.
- a stop reaches the process that runs the denoising loop through a :class:`StopSignal` (a file) that the step
  callback checks; the serving side (:func:`drive`) sets it on Stop, and when Gradio lets go of the request
  (a ``gradio_client`` ``Job.cancel()``, a closed page: :func:`event_alive`). The run then ends at the end of
  the step under way, and ``spaces`` releases the GPU as for any finished call. Closing the generator (which
  ``spaces`` forwards to the worker) stops it too, one step later.
- our own failures cross as ``gr.Error`` with our message (out of memory, failed); ``gr.Error`` pickles.
"""

from __future__ import annotations

import contextvars
import logging
import os
import queue
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import gradio as gr
import torch

from . import service
from .loading import LoadedModel

logger = logging.getLogger(__name__)

OUT_OF_MEMORY = "Out of GPU memory; try a smaller size or fewer concepts."
WATCH_SECONDS = 0.1  # how often a running request checks whether it is still wanted

@dataclass(frozen=True)
class Step:
    """One denoising step done (``done`` of ``total``): what the GPU function yields before its result."""

    done: int
    total: int


@dataclass(frozen=True)
class Stopped:
    """The GPU function's last value when its run was stopped (a value, so it crosses ZeroGPU's boundary)."""

    message: str


class StopSignal:
    """A per-request stop flag that a forked ZeroGPU worker sees too: a file, named when the request starts.

    A ``threading.Event`` would not do: the worker checks its own copy, made when it was forked. The object
    pickles as its path, so it travels to the worker as an argument of the GPU function.
    """

    _folder: str | None = None

    def __init__(self) -> None:
        if StopSignal._folder is None:
            StopSignal._folder = tempfile.mkdtemp(prefix="sega-stop-")
        self.path = os.path.join(StopSignal._folder, uuid.uuid4().hex)

    def set(self) -> None:
        with open(self.path, "w"):
            pass

    def is_set(self) -> bool:
        return os.path.exists(self.path)

    def discard(self) -> None:
        """Forget the flag (the request is over)."""
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


def denoise(loaded: LoadedModel, params: service.GenerationParams,
            stop: StopSignal | None = None) -> Iterator[Step | Stopped | service.GenerationResult]:
    """Run one generation, yielding a :class:`Step` after every denoising step, then the result, or
    :class:`Stopped` once ``stop`` is set (checked at the end of every step).

    The pipeline runs in a thread of the calling process (the ZeroGPU worker, or the server itself), because a
    step callback cannot yield. Closing this generator also stops the run at its next step, and waits for it.
    Failures are raised as ``gr.Error`` with our message, so they survive ZeroGPU's process boundary.
    """
    # One item at most waits to be taken: the loop runs at most a step ahead of whoever reads the steps.
    events: queue.Queue = queue.Queue(maxsize=1)
    closing = threading.Event()

    def put(item) -> bool:
        while not closing.is_set():
            try:
                events.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def stopped() -> bool:
        return closing.is_set() or (stop is not None and stop.is_set())

    def on_step(done: int, total: int) -> None:
        # Asked again after the (possibly waiting) hand-over: the stop may have come meanwhile.
        if stopped() or not put(Step(done, total)) or stopped():
            raise service.GenerationStopped(f"Stopped after {done} of {total} steps.")

    def work() -> None:
        try:
            put(service.generate(loaded, params, progress_callback=on_step))
        except service.GenerationStopped as exc:
            put(Stopped(str(exc)))
        except BaseException as exc:  # handed to the generator, which raises it in its own thread
            put(exc)

    thread = threading.Thread(target=work, name="sega-denoise", daemon=True)
    thread.start()
    try:
        while True:
            item = events.get()
            if isinstance(item, BaseException):
                raise _as_gradio_error(item)
            yield item
            if not isinstance(item, Step):
                return
    finally:
        closing.set()
        thread.join()


def _as_gradio_error(exc: BaseException) -> BaseException:
    """Our message for a failure inside the GPU function (ZeroGPU would pass on only its class name)."""
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, torch.OutOfMemoryError):
        return gr.Error(OUT_OF_MEMORY, title="Out of memory", print_exception=False)
    if not isinstance(exc, Exception):
        return exc  # KeyboardInterrupt, SystemExit: not ours to translate
    logger.error("generation failed", exc_info=exc)
    return gr.Error(f"Generation failed ({type(exc).__name__}); please try again.", title="Generation failed",
                    print_exception=False)


def event_alive() -> bool:
    """False once Gradio has let go of the event being handled: cancelled (the Stop button, ``Job.cancel()``)
    or its page closed. True outside a queued Gradio event (a direct call, a test).

    A cancel ends the event's asyncio task at once, and the queue then drops the event from its active jobs
    while the handler's thread runs on; a closed page ends the browser's event stream, and the queue marks the
    session's events not alive (``Queue.clean_events``). The ``spaces`` package reads the same state.
    """
    from gradio.context import LocalContext

    blocks = LocalContext.blocks.get(None)
    event_id = LocalContext.event_id.get(None)
    queue_ = getattr(blocks, "_queue", None)
    if queue_ is None or event_id is None:
        return True
    for job in queue_.active_jobs:
        for event in job or ():
            if event._id == event_id:
                return bool(event.alive)
    return False


def drive(steps: Iterator[Step | Stopped | service.GenerationResult], stop: StopSignal,
          wanted: Callable[[], bool] = event_alive,
          on_step: Callable[[Step], None] | None = None) -> service.GenerationResult:
    """Consume the GPU function's generator (:func:`denoise`, possibly in a ZeroGPU worker) where the request
    is served, and return its result.

    ``on_step`` hears of every step (progress). ``wanted()`` is asked after every step and, by a watcher
    thread, every :data:`WATCH_SECONDS`; when it says no, ``stop`` is set, so the run ends at the end of the
    step under way, wherever it runs. Then :class:`GenerationStopped` is raised here, after the GPU work (on
    ZeroGPU, the GPU) was given up.
    """
    finished = threading.Event()

    def watch() -> None:
        while not finished.wait(WATCH_SECONDS):
            if not wanted():
                stop.set()
                return

    # The watcher reads Gradio's request state from context variables: give it this thread's.
    watcher = threading.Thread(target=contextvars.copy_context().run, args=(watch,), name="sega-watch",
                               daemon=True)
    watcher.start()
    result = stopped = None
    try:
        for item in steps:
            if isinstance(item, service.GenerationResult):
                result = item
            elif isinstance(item, Stopped):
                stopped = item
            elif not stop.is_set():
                if on_step is not None:
                    on_step(item)
                if not wanted():  # also between the watcher's looks, for steps faster than it
                    stop.set()
    finally:
        finished.set()
        steps.close()  # a no-op after the last value; else (an error here) it ends the run too
        watcher.join()
    if stopped is not None:
        raise service.GenerationStopped(stopped.message)
    if result is None:
        raise RuntimeError("the GPU function ended without a result")
    return result
