"""The app under concurrent load on loopback (8 gradio_client clients x 3 requests), and a full queue.

The load is the one ``python -m benchmarks.load`` measures (benchmarks/load.py builds and sends it).
"""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

from benchmarks import load as loadbench
from tests.served import serve

pytestmark = pytest.mark.slow

STEPS = 8
CLIENTS, PER_CLIENT = 8, 3
PROMPT = "a large red circle on a white background"


@pytest.fixture(scope="module")
def load_plan() -> list[list[loadbench.LoadRequest]]:
    return loadbench.plan(CLIENTS, PER_CLIENT, invalid_share=1 / 3, steps=STEPS)


@pytest.fixture(scope="module")
def serial_reference(app_module, load_plan) -> dict[int, loadbench.Outcome]:
    """Every valid request of the plan, one after another from one client, on a freshly started server."""
    with serve(app_module) as url:
        outcomes, _ = loadbench.run_serial(url, [r for row in load_plan for r in row if r.valid])
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes if o.error]
    return {id(o.request): o for o in outcomes}


def without_summary(used: dict) -> dict:
    # The summary holds the seconds taken.
    return {k: v for k, v in used.items() if k != "summary"}


def test_the_plan_mixes_valid_and_invalid_and_shares_prompt_and_seed_across_clients(load_plan):
    assert len(load_plan) == CLIENTS and all(len(row) == PER_CLIENT for row in load_plan)
    flat = [r for row in load_plan for r in row]
    assert sum(not r.valid for r in flat) == CLIENTS  # one invalid request per client
    assert len({r.body() for r in flat if not r.valid}) == CLIENTS  # all of them different
    assert any(r.raw for r in flat if not r.valid)  # NaN and huge numbers go over raw HTTP
    # Requests that differ only in their concepts are sent by different clients, so they run at the same time.
    groups: dict[tuple, set[int]] = {}
    for c, row in enumerate(load_plan):
        for r in row:
            if r.valid:
                key = tuple(sorted((k, str(v)) for k, v in r.kwargs.items() if k != "concepts"))
                groups.setdefault(key, set()).add(c)
    assert len(groups) > 4  # many prompt/seed groups, several of them asked by more than one client
    assert sum(len(clients) >= 2 for clients in groups.values()) >= 4


@pytest.mark.parametrize("concurrency", [1, 3])
def test_concurrent_clients_get_exactly_what_a_serial_run_gives(app_module, load_plan, serial_reference,
                                                                concurrency, monkeypatch):
    from gradio_client import Client

    real, lock, active = app_module.run_on_gpu, threading.Lock(), [0, 0]  # running now, most at once
    all_running = threading.Event()

    def counted(params, stop=None, previews=False):  # the GPU function is a generator: count while it runs
        with lock:
            active[0] += 1
            active[1] = max(active)
            if active[0] == concurrency:
                all_running.set()
        try:
            # Concurrency by construction, not by timing: the first generations wait (a hang guard of 120 s)
            # until `concurrency` of them run at once; later ones find the event set.
            all_running.wait(120)
            yield from real(params, stop, previews)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(app_module, "run_on_gpu", counted)
    with serve(app_module, concurrency=concurrency) as url:
        results, _ = loadbench.run_concurrent(url, load_plan)
        # The server keeps serving after the load.
        _, _, used = Client(url, verbose=False).predict(prompt=PROMPT, steps=2, seed=1, api_name="/generate")
        assert used["seed"] == 1
    assert active[1] == concurrency  # the server ran that many generations at once on the one pipeline
    outcomes = [o for row in results for o in row]
    assert len(outcomes) == CLIENTS * PER_CLIENT
    assert not any(o.busy for o in outcomes)

    valid = [o for o in outcomes if o.request.valid]
    assert [o.error for o in valid] == [None] * len(valid)
    for o in valid:
        ref = serial_reference[id(o.request)]
        assert np.array_equal(o.original, ref.original), o.request.kwargs
        assert np.array_equal(o.edited, ref.edited), o.request.kwargs
        assert without_summary(o.used) == without_summary(ref.used)
    # Requests with the same prompt and seed and other concepts ran at the same time: every answer equals the
    # serial one.

    for o in (o for o in outcomes if not o.request.valid):
        assert o.names_the_field, (o.request.kwargs, o.error)



def test_a_full_queue_answers_busy_at_once_and_the_held_jobs_still_finish(app_module, monkeypatch):
    from gradio_client import Client
    from gradio_client.utils import QueueError, Status

    real = app_module.run_on_gpu
    entered = threading.Semaphore(0)
    release = threading.Event()

    def held(params, stop=None, previews=False):
        entered.release()
        assert release.wait(60)
        return real(params, stop, previews)

    monkeypatch.setattr(app_module, "run_on_gpu", held)
    try:
        with serve(app_module, queue_size=1, concurrency=1) as url:
            running = Client(url, verbose=False).submit(prompt=PROMPT, steps=2, seed=1, api_name="/generate")
            assert entered.acquire(timeout=30)  # the one generation slot is taken
            waiting = Client(url, verbose=False).submit(prompt=PROMPT, steps=2, seed=2, api_name="/generate")
            deadline = time.monotonic() + 30
            while waiting.status().code != Status.IN_QUEUE:  # the one queue place is taken
                assert time.monotonic() < deadline, waiting.status()
                time.sleep(0.05)

            # gradio_client: an error at once, not a hang. "At once" by construction: the one running job is
            # held until `release` is set below, so an answer that came waited for no slot.
            with pytest.raises(QueueError, match="Please try again"):
                Client(url, verbose=False).predict(prompt=PROMPT, steps=2, seed=3, api_name="/generate")
            # Plain HTTP: 503 with the app's message and a Retry-After header.
            body = {"data": [PROMPT, [], 3, 2, None, "", None, None, None, None]}
            r = httpx.post(f"{url}gradio_api/call/generate", json=body, timeout=60)
            assert not release.is_set()
            assert r.status_code == 503 and r.headers["retry-after"] == "30"
            assert r.json()["detail"] == app_module.BUSY_MESSAGE
            assert "busy" in app_module.BUSY_MESSAGE and "try again" in app_module.BUSY_MESSAGE
            # Other HTTP errors keep FastAPI's usual answer.
            assert httpx.get(f"{url}gradio_api/no-such-route").status_code == 404

            release.set()
            for job, seed in ((running, 1), (waiting, 2)):
                original, edited, used = job.result(timeout=60)
                assert used["seed"] == seed and original and edited
            # With room in the queue again, the refused request goes through.
            _, _, used = Client(url, verbose=False).predict(prompt=PROMPT, steps=2, seed=3, api_name="/generate")
            assert used["seed"] == 3
    finally:
        release.set()
