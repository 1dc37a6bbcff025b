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
import PIL.Image
import torch

from . import service
from .loading import LoadedModel

logger = logging.getLogger(__name__)

OUT_OF_MEMORY = "Out of GPU memory; try a smaller size or fewer concepts."
WATCH_SECONDS = 0.1  # how often a running request checks whether it is still wanted

@dataclass(frozen=True)
class Step:
    """One step done (``done`` of ``total``, counted as :func:`server.service.generate` counts them): what the
    GPU function yields before its result. ``stage`` is "inversion" or "denoising"; ``preview``, on some
    steps of a run with previews, a small PIL image of what the image with edits is becoming."""

    done: int
    total: int
    stage: str = "denoising"
    preview: PIL.Image.Image | None = None


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


def denoise(loaded: LoadedModel, params: service.GenerationParams, stop: StopSignal | None = None,
            previews: bool = False) -> Iterator[Step | Stopped | service.GenerationResult]:
    """Run one generation, yielding a :class:`Step` after every step (an edit's inversion steps, then the
    denoising steps), then the result, or :class:`Stopped` once ``stop`` is set (checked at the end of every
    step). With ``previews``, some steps carry a preview image, made in the process that runs the loop.

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

    def on_step(done: int, total: int, stage: str = "denoising", preview: PIL.Image.Image | None = None) -> None:
        # Asked again after the (possibly waiting) hand-over: the stop may have come meanwhile.
        if stopped() or not put(Step(done, total, stage, preview)) or stopped():
            during = " during the inversion," if stage == "inversion" else ""
            raise service.GenerationStopped(f"Stopped{during} after {done} of {total} steps.")

    def work() -> None:
        try:
            put(service.generate(loaded, params, progress_callback=on_step, previews=previews))
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


def _active_events() -> list:
    from gradio.context import LocalContext

    queue_ = getattr(LocalContext.blocks.get(None), "_queue", None)
    return [] if queue_ is None else [event for job in queue_.active_jobs for event in job or ()]


def event_alive(event_id: str | None = None) -> bool:
    """False once Gradio has let go of the event being handled (or of ``event_id``): cancelled (a Stop button's
    ``cancels=``, ``Job.cancel()``) or its page closed. True outside a queued Gradio event (a direct call, a
    test).

    A cancel ends the event's asyncio task at once, and the queue then drops the event from its active jobs
    while the handler's thread runs on; a closed page ends the browser's event stream, and the queue marks the
    session's events not alive (``Queue.clean_events``). The ``spaces`` package reads the same state.
    """
    from gradio.context import LocalContext

    event_id = event_id or LocalContext.event_id.get(None)
    if event_id is None or getattr(LocalContext.blocks.get(None), "_queue", None) is None:
        return True
    return any(event._id == event_id and event.alive for event in _active_events())


def session_event(session_hash: str | None, fn_ids: set[int]) -> str | None:
    """The id of the queued event of ``session_hash`` that runs one of the functions ``fn_ids``, if any.

    For work that Gradio runs outside its queue on behalf of a queued event, where :func:`event_alive` cannot
    tell which event it serves: a lazily cached example's first run (``gr.Examples`` computes it inside its
    own queued event, which a Stop button can cancel).
    """
    for event in _active_events():
        if event.session_hash == session_hash and getattr(event.fn, "_id", None) in fn_ids:
            return event._id
    return None


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


def follow(steps: Iterator[Step | Stopped | service.GenerationResult], stop: StopSignal,
           wanted: Callable[[], bool] = event_alive) -> Iterator[Step | service.GenerationResult]:
    """:func:`drive` in a thread of its own, yielding its steps as they come, then the result (or raising
    :class:`GenerationStopped` or the run's error): for a handler that yields (previews), which Gradio stops
    iterating when its event is cancelled. The run is still followed to its end there, so the stop reaches
    it and its GPU is released; closing this iterator early stops the run too. ``stop`` is discarded once the
    run is over.
    """
    items: queue.Queue = queue.Queue()
    abandoned = threading.Event()

    def run() -> None:
        try:
            items.put(drive(steps, stop, lambda: not abandoned.is_set() and wanted(), items.put))
        except BaseException as exc:  # raised where the steps are read
            items.put(exc)
        finally:
            stop.discard()

    # drive's watcher reads Gradio's request state from context variables: hand this thread's on.
    thread = threading.Thread(target=contextvars.copy_context().run, args=(run,), name="sega-follow", daemon=True)
    thread.start()
    finished = False
    try:
        while True:
            item = items.get()
            if isinstance(item, BaseException):
                finished = True
                raise item
            finished = not isinstance(item, Step)
            yield item
            if finished:
                return
    finally:
        if not finished:
            abandoned.set()  # drive's watcher stops the run
