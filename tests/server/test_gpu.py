"""The GPU-call boundary (server/gpu.py) on tiny random components: steps, stop, close, errors, pickling."""

import pickle
import threading

import gradio as gr
import pytest
import torch

import sega
from sega.pipeline import SegaPipeline
from server import gpu, loading, service
from server import params as api
from server.profiles import profile_for
from tests.tiny import tiny_components

LIMITS = api.Limits(max_steps=200)


@pytest.fixture(scope="module")
def tiny() -> loading.LoadedModel:
    pipe = SegaPipeline(**tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return loading.LoadedModel(pipe=pipe, model_id="tiny", profile=profile_for(pipe),
                               fallback_reason=None, device="cpu")


def parse(loaded, **raw):
    return api.parse_request(loaded, {"prompt": "a red circle", "seed": 1, **raw}, LIMITS)


def test_denoise_yields_every_step_then_the_same_result_as_generate(tiny):
    params = parse(tiny, steps=3)
    items = list(gpu.denoise(tiny, params))
    assert items[:-1] == [gpu.Step(1, 3), gpu.Step(2, 3), gpu.Step(3, 3)]
    direct = service.generate(tiny, params)
    assert list(items[-1].edited.getdata()) == list(direct.edited.getdata())


def counting_generate(monkeypatch) -> list[int]:
    """``service.generate`` that notes every step it finishes (in the thread that runs the loop)."""
    done, real = [], service.generate

    def generate(loaded, params, progress_callback=None, **kwargs):
        def on_step(i, total, **extra):
            done.append(i)
            progress_callback(i, total, **extra)
        return real(loaded, params, progress_callback=on_step, **kwargs)

    monkeypatch.setattr(service, "generate", generate)
    return done


def test_a_set_stop_signal_ends_the_run_before_its_next_step(tiny, monkeypatch):
    done = counting_generate(monkeypatch)
    stop = gpu.StopSignal()
    items = []
    for item in gpu.denoise(tiny, parse(tiny, steps=200), stop):
        items.append(item)
        if item == gpu.Step(2, 200):
            stop.set()
    # the library looks before every step: the stop lands before step 3 (if it came before the loop looked)
    # or before step 4 (step 3 under way)
    assert items[-1] in (gpu.Stopped("Stopped after 2 of 200 steps."), gpu.Stopped("Stopped after 3 of 200 steps."))
    assert max(done) == int(items[-1].message.split()[2])


def test_closing_the_generator_ends_the_run_before_close_returns(tiny, monkeypatch):
    done = counting_generate(monkeypatch)
    steps = gpu.denoise(tiny, parse(tiny, steps=200))
    assert next(steps) == gpu.Step(1, 200)
    steps.close()
    assert max(done) <= 3  # the steps already under way, no more
    assert not any(t.name == "sega-denoise" and t.is_alive() for t in threading.enumerate())


def follow_in_process(loaded):
    return lambda params, stop, previews: gpu.denoise(loaded, params, stop, previews)


def test_follow_stops_the_run_when_the_request_is_no_longer_wanted(tiny, monkeypatch):
    done = counting_generate(monkeypatch)
    wanted = threading.Event()
    wanted.set()
    seen = []
    with pytest.raises(sega.Stopped, match=r"Stopped after \d+ of 200 steps"):
        for step in gpu.follow(follow_in_process(tiny), parse(tiny, steps=200), wanted=wanted.is_set):
            seen.append(step)
            if step.done == 2:
                wanted.clear()  # as when Gradio drops a cancelled event: the watcher sees it within 0.1 s
    assert max(done) < 200 and seen[:2] == [gpu.Step(1, 200), gpu.Step(2, 200)]


def test_follow_gives_the_result_and_leaves_no_stop_file(tiny, monkeypatch):
    made = []
    real = gpu.StopSignal.__init__

    def init(self):
        real(self)
        made.append(self)

    monkeypatch.setattr(gpu.StopSignal, "__init__", init)
    *steps, result = gpu.follow(follow_in_process(tiny), parse(tiny, steps=3))
    assert steps == [gpu.Step(1, 3), gpu.Step(2, 3), gpu.Step(3, 3)]
    assert isinstance(result, service.GenerationResult)
    assert len(made) == 1 and made[0].is_set()  # the request is over: its file is gone


def test_an_abandoned_follower_still_ends_its_run(tiny, monkeypatch):
    done = counting_generate(monkeypatch)
    followed = gpu.follow(follow_in_process(tiny), parse(tiny, steps=200), wanted=lambda: True)
    assert next(followed) == gpu.Step(1, 200)
    followed.close()  # as when Gradio closes the handler that yielded its steps
    deadline = threading.Event()
    while any(t.name in ("sega-denoise", "sega-watch") and t.is_alive() for t in threading.enumerate()):
        assert not deadline.wait(0.05) and max(done) < 200
    assert max(done) < 200  # stopped well before its end


@pytest.mark.parametrize(("fault", "message"), [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), gpu.OUT_OF_MEMORY),
    (RuntimeError("boom"), "Generation failed (RuntimeError); please try again."),
    (gr.Error("our own words"), "our own words"),
])
def test_failures_leave_the_gpu_function_as_gradio_errors_in_our_words(tiny, monkeypatch, fault, message):
    def failing(loaded, params, progress_callback=None, **kwargs):
        raise fault

    monkeypatch.setattr(service, "generate", failing)
    with pytest.raises(gr.Error) as error:
        list(gpu.denoise(tiny, parse(tiny, steps=2)))
    # What a ZeroGPU worker would send back: the error itself, pickled.
    crossed = pickle.loads(pickle.dumps(error.value))
    assert crossed.message == message and type(crossed) is gr.Error


def test_what_crosses_a_zerogpu_worker_boundary_pickles():
    for value in (gpu.Step(1, 2), gpu.Stopped("Stopped after 1 of 2 steps.")):
        assert pickle.loads(pickle.dumps(value)) == value
    stop = gpu.StopSignal()
    copy = pickle.loads(pickle.dumps(stop))
    assert not copy.is_set()
    stop.set()
    assert copy.is_set()  # the worker's copy sees the server's flag
