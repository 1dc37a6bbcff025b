"""The GPU-call boundary: what runs under ``@spaces.GPU``, and how its progress, result, errors and stop cross
between it and the process that serves the request.

On a ZeroGPU Space, ``spaces`` runs the decorated function in a forked worker process (``spaces/zero/
wrappers.py``: ``generator_function_wrapper`` forks a ``Worker`` and passes it the arguments, pickled), so
nothing in the serving process (a ``threading.Event``, Gradio's request state) reaches the denoising loop, and
an exception that is not a ``gr.Error`` comes back only as its class name. Hence the GPU function is a generator
(:func:`denoise`) that yields a :class:`Step` after every step, then the result or :class:`Stopped`: plain
values, which cross the boundary as they are. Our own failures cross as ``gr.Error`` with our message.

The stop path, one per run: the serving side makes a :class:`StopSignal` (a file, so that a forked worker sees
it: it pickles as its path) and passes it to the GPU function, which passes it on as ``stop=`` to
``pipe(...)`` and ``pipe.invert(...)``; the library checks it before every step and raises ``sega.Stopped``,
which :func:`denoise` turns into the run's :class:`Stopped` value. The signal is set by :func:`follow`, where the
request is served: when its one watcher thread sees that Gradio let go of the event (a Stop button's
``cancels=``, a ``gradio_client`` ``Job.cancel()``, a closed page: :func:`event_alive`, the one place that
reads Gradio's queue), or when the handler that yields the steps is closed while the run goes on; at the
request's end the file is discarded, which a run still going reads as a stop too. So a run never outlives its
request by more than a step, and ``spaces`` then releases the GPU as for any finished call.
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

import sega
from sega.stopping import StopFlag

from . import service
from .loading import LoadedModel
from .params import GenerationParams

logger = logging.getLogger(__name__)

OUT_OF_MEMORY = "Out of GPU memory; try a smaller size or fewer concepts."
WATCH_SECONDS = 0.1  # how often a run's watcher asks whether its request is still wanted


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
    """A per-request stop flag that a forked ZeroGPU worker sees too: a file that exists while the request's run
    is wanted. (A ``threading.Event`` would not do: the worker checks its own copy, made when it was forked.)
    It pickles as its path, so it travels to the worker as an argument of the GPU function."""

    _folder: str | None = None

    def __init__(self) -> None:
        if StopSignal._folder is None:
            StopSignal._folder = tempfile.mkdtemp(prefix="sega-run-")
        self.path = os.path.join(StopSignal._folder, uuid.uuid4().hex)
        with open(self.path, "w"):
            pass

    def set(self) -> None:
        """Stop the run (its request is no longer wanted)."""
        self.discard()

    def discard(self) -> None:
        """The request is over: its file goes (a run still going would read that as a stop)."""
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def is_set(self) -> bool:
        return not os.path.exists(self.path)


def denoise(loaded: LoadedModel, params: GenerationParams, stop: StopFlag | None = None,
            previews: bool = False) -> Iterator[Step | Stopped | service.GenerationResult]:
    """Run one generation, yielding a :class:`Step` after every step (an edit's inversion steps, then the
    denoising steps), then the result, or :class:`Stopped` once ``stop`` is set (the library checks it before
    every step). With ``previews``, some steps carry a preview image, made in the process that runs the loop.

    The pipeline runs in a thread of the calling process (the ZeroGPU worker, or the server itself), because a
    step callback cannot yield. Closing this generator early sets ``stop`` and waits for the run to end.
    Failures are raised as ``gr.Error`` with our message, so they survive ZeroGPU's process boundary.
    """
    stop = threading.Event() if stop is None else stop
    items: queue.Queue = queue.Queue()  # unbounded: the loop never waits for its reader

    def on_step(done: int, total: int, stage: str = "denoising", preview: PIL.Image.Image | None = None) -> None:
        items.put(Step(done, total, stage, preview))

    def work() -> None:
        try:
            items.put(service.generate(loaded, params, stop=stop, progress_callback=on_step, previews=previews))
        except sega.Stopped as exc:
            items.put(Stopped(str(exc)))
        except BaseException as exc:  # handed to the generator, which raises it in its own thread
            items.put(exc)

    thread = threading.Thread(target=work, name="sega-denoise", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if isinstance(item, BaseException):
                raise _as_gradio_error(item)
            yield item
            if not isinstance(item, Step):
                return
    finally:
        if thread.is_alive():
            stop.set()  # closed early (ZeroGPU closes it in the worker when the request is dropped)
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


def event_alive(event_id: str | None = None, session_hash: str | None = None,
                fn_ids: frozenset[int] = frozenset()) -> bool:
    """False once Gradio has let go of the event being handled: cancelled (a Stop button's ``cancels=``,
    ``Job.cancel()``: the queue drops it from its active jobs) or its page closed (``Queue.clean_events`` marks
    it not alive). True outside a queued Gradio event (a direct call, a test).

    ``event_id`` defaults to the event of the calling context. Work that Gradio runs outside its queue on
    behalf of a queued event (a lazily cached example's first run: ``gr.Examples`` computes it inside its own
    queued event, with no event id of its own) names that event by ``session_hash`` and the ids of the functions
    it may run (``fn_ids``).

    The one function that reads Gradio's private queue state (``_queue.active_jobs``, ``Event._id``,
    ``.alive``), as ``spaces`` itself does (``spaces/zero/gradio.py``): written against gradio 6.31.0, the
    version requirements.txt pins.
    """
    from gradio.context import LocalContext

    queue_ = getattr(LocalContext.blocks.get(None), "_queue", None)
    event_id = event_id or (None if fn_ids else LocalContext.event_id.get(None))
    if queue_ is None or (event_id is None and not fn_ids):
        return True
    return any(event.alive and (event._id == event_id if event_id else
                                event.session_hash == session_hash and getattr(event.fn, "_id", None) in fn_ids)
               for job in queue_.active_jobs for event in job or ())


def follow(gpu_function: Callable[..., Iterator], params: GenerationParams, previews: bool = False,
           wanted: Callable[[], bool] = event_alive) -> Iterator[Step | service.GenerationResult]:
    """Run ``params`` through ``gpu_function(params, stop, previews)`` (:func:`denoise`, maybe in a ZeroGPU
    worker), yielding its steps as they come, then its result; a stopped run raises ``sega.Stopped``.

    The run's one watcher thread asks ``wanted()`` every :data:`WATCH_SECONDS` and sets the run's
    :class:`StopSignal` when it says no; it is set too when the handler that yields the steps closes this
    generator while the run goes on, and discarded when the request is over. The watcher then closes the GPU
    function's generator, which waits for a stopped run's last step (on ZeroGPU, for the worker): there, not
    in the thread that closes this generator, which may be Gradio's event loop.
    """
    stop = StopSignal()
    steps = gpu_function(params, stop, previews)
    over = threading.Event()

    def watch() -> None:
        while not over.wait(WATCH_SECONDS):
            if not wanted():
                stop.set()
                over.wait()
        steps.close()

    # The watcher reads Gradio's request state from context variables: give it this thread's.
    threading.Thread(target=contextvars.copy_context().run, args=(watch,), name="sega-watch", daemon=True).start()
    abandoned = False  # closed while its run goes on (not after its result, its stop or its failure)
    try:
        result = None
        for item in steps:
            if isinstance(item, Stopped):
                raise sega.Stopped(item.message)
            if not isinstance(item, Step):
                result = item  # the last value: the loop goes on to the generator's end (spaces' release)
                continue
            try:
                yield item
            except GeneratorExit:
                abandoned = True
                raise
        if result is None:
            raise RuntimeError("the GPU function ended without a result")
        yield result
    finally:
        (stop.set if abandoned else stop.discard)()
        over.set()
