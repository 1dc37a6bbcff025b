"""Stop, ``Job.cancel()`` and a closed page end the generation's work within two denoising steps, as on a CPU
(or a GPU Space without ZeroGPU) so on ZeroGPU (emulated: tests/zerogpu.py), and the server serves the next
request at once.

How Gradio learns that a page went away: the page holds an event stream (``GET /gradio_api/queue/data``) open
while its request runs; when the page closes, that connection closes, the stream ends, and Gradio's queue
marks the session's events as no longer alive (``Queue.clean_events``). A cancel (the Stop button's
``cancels=``, ``Job.cancel()``: ``POST /gradio_api/cancel``) ends the event's task, and the queue drops it
from its active jobs. The run's one watcher (server.gpu.follow) sees either within 0.1 s and sets the run's stop
file, which the library's denoising loop checks before each step (``pipe(..., stop=...)``), in the worker on
ZeroGPU.
"""

import time

import pytest

from tests.served import browser_page, start_generate
from tests.zerogpu import serve_app

pytestmark = pytest.mark.slow

PROMPT = "a large red circle on a white background"
LONG = 900  # steps: far more than a test waits for
STEPS_AFTER_STOP = 2  # at most, once the app knows: the step under way, and one more
DEADLINE = 120  # seconds to wait for the run to end: a hang guard only (the steps after the stop are what count)


@pytest.fixture(scope="module", params=["cpu", "zerogpu"])
def server(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    with serve_app(folder, zero_gpu=request.param == "zerogpu", env={"SEGA_MAX_STEPS": str(LONG)}) as served:
        served.kind = request.param
        yield served


def wait_for_step(server, mark: int, seed: int, done: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(e["event"] == "step" and e["seed"] == seed and e["done"] >= done for e in server.events(mark)):
        assert time.monotonic() < deadline, f"no step {done} of seed {seed}"
        time.sleep(0.05)


def check_stopped(server, mark: int, seed: int, stopped_at: float) -> None:
    """After the stop at ``stopped_at``: the app signalled the run to stop, the run ended (on ZeroGPU: the GPU
    was released) within two steps of that signal, and the server serves the next request at once, without the
    abandoned run going on beside it.

    Steps are counted from the app's signal, not from the click: the click's own trip to the server (a
    request, and Gradio's handling of it) takes about 0.1 s here, several steps of the demo model.
    """
    from gradio_client import Client

    deadline = time.monotonic() + DEADLINE
    while True:
        events = server.events(mark)
        ends = [e for e in events if e["event"] == "run_end" and e["seed"] == seed]
        released = [e for e in events if e["event"] == "release" and e["t"] > stopped_at]
        if ends and (server.kind == "cpu" or released):
            break
        assert time.monotonic() < deadline, f"the run went on for {DEADLINE} s after the stop"
        time.sleep(0.05)
    steps = [e for e in events if e["event"] == "step" and e["seed"] == seed]
    signalled = min(e["t"] for e in events if e["event"] == "stop_set" and e["t"] >= stopped_at)
    after = [e["done"] for e in steps if e["t"] > signalled]
    assert len(after) <= STEPS_AFTER_STOP, after
    assert steps[-1]["done"] < LONG and ends[0]["outcome"] == "Stopped"

    _, _, used = Client(server.url, verbose=False).predict(prompt=PROMPT, steps=2, seed=1, api_name="/generate")
    assert used["seed"] == 1
    later = [e for e in server.events(mark) if e["event"] == "step" and e["seed"] == seed]
    assert later == steps  # nothing of the abandoned run happened while the next request ran


def test_a_cancelled_api_call_ends_its_run(server):
    from gradio_client import Client

    mark = server.mark()
    job = Client(server.url, verbose=False).submit(prompt=PROMPT, steps=LONG, seed=31, api_name="/generate")
    wait_for_step(server, mark, 31, 3)
    stopped_at = time.time()
    job.cancel()
    check_stopped(server, mark, 31, stopped_at)


def start_in_browser(page, url: str, steps: int, seed: int) -> None:
    page.goto(url)
    start_generate(page, PROMPT, seed, steps)


def test_the_stop_button_ends_the_run(server):
    with browser_page() as page:
        mark = server.mark()
        start_in_browser(page, server.url, LONG, 32)
        wait_for_step(server, mark, 32, 3)
        stopped_at = time.time()
        page.locator("#stop").click()
        check_stopped(server, mark, 32, stopped_at)


def test_a_closed_page_ends_its_run(server):
    with browser_page() as page:
        mark = server.mark()
        start_in_browser(page, server.url, LONG, 33)
        wait_for_step(server, mark, 33, 3)
        stopped_at = time.time()
        page.close()
        check_stopped(server, mark, 33, stopped_at)
