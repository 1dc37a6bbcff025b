"""The app as on a ZeroGPU Space: ``python app.py`` with the installed ``spaces`` package's real ZeroGPU code (a
forked worker per GPU call), its scheduler and CUDA faked on this CPU (tests/zerogpu.py)."""

import time

import numpy as np
import pytest
import torch
from PIL import Image

from server import limits, service
from server import params as api
from server.loading import LoadedModel
from server.profiles import DEMO_PROFILE
from tests.zerogpu import fake_ip_token, serve_app

pytestmark = pytest.mark.slow

PROMPT = "a large red circle on a white background"


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    with serve_app(tmp_path_factory.mktemp("zerogpu"), zero_gpu=True) as served:
        yield served


@pytest.fixture(scope="module")
def client(space):
    from gradio_client import Client

    return Client(space.url, verbose=False)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def generate(client, **kwargs):
    return client.predict(api_name="/generate", **{"prompt": PROMPT, "steps": 2, "seed": 1, **kwargs})


def test_a_generation_runs_in_a_worker_and_equals_the_same_request_without_zerogpu(space, client):
    mark = space.mark()
    original, edited, used = generate(client, steps=4, seed=5, concepts=[{"prompt": "blue", "warmup": 1}])
    events = space.events(mark)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "schedule" and kinds[-1] == "release", kinds
    params = api.parse_request(_reference(), {k: used[k] for k in api.API_PARAMS})
    assert events[0]["duration"] == service.gpu_duration(4, 1, params.width, params.height)
    assert not events[-1]["fail"]
    steps = [e for e in events if e["event"] == "step"]
    # every step, for each pass the pipeline makes (the image without edits may be a pass of its own)
    assert {e["done"] for e in steps} == {1, 2, 3, 4} and steps[-1]["done"] == 4
    workers = {e["pid"] for e in steps}
    assert len(workers) == 1 and space.pid not in workers  # denoised in a forked worker, not in the server

    # The server loads the model in fp16 (it sees a GPU); the same request on the CPU in fp16, without spaces.
    reference = service.generate(_reference(), params)
    assert np.array_equal(pixels(original), np.asarray(reference.original.convert("RGB")))
    assert np.array_equal(pixels(edited), np.asarray(reference.edited.convert("RGB")))
    assert not np.array_equal(pixels(original), pixels(edited))  # the concept did something


_REFERENCE: list[LoadedModel] = []


def _reference() -> LoadedModel:
    if not _REFERENCE:
        from sega.demo.shapes import DEFAULT_MODEL_DIR
        from sega.pipeline import SegaPipeline

        pipe = SegaPipeline.from_pretrained(str(DEFAULT_MODEL_DIR), dtype=torch.float16)
        pipe.set_progress_bar_config(disable=True)
        _REFERENCE.append(LoadedModel(pipe=pipe, model_id=str(DEFAULT_MODEL_DIR), profile=DEMO_PROFILE,
                                      fallback_reason=None, device="cpu"))
    return _REFERENCE[0]


@pytest.mark.parametrize(("refusal", "token", "expected"), [
    ("quota", True, r"You have exceeded your free ZeroGPU quota \(15s requested vs\. 10s left\)\. Try again in 0:20:00"),
    ("quota", False, "Space app has reached its GPU limit"),
    ("no_gpu", False, "No GPU was available"),
])
def test_zerogpus_refusals_reach_the_caller_in_its_own_words(space, refusal, token, expected):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    caller = Client(space.url, verbose=False, headers={"X-IP-Token": fake_ip_token()} if token else None)
    space.control(refuse=refusal)
    mark = space.mark()
    try:
        with pytest.raises(AppError, match=expected) as error:
            generate(caller)
    finally:
        space.control()
    assert "Generation failed" not in str(error.value)
    if refusal == "quota" and token:
        assert "quota" in str(error.value)
    assert [e["event"] for e in space.events(mark)] == ["schedule"]  # refused before any worker started
    _, _, used = generate(caller)  # and the next request is served
    assert used["seed"] == 1


def test_an_out_of_memory_in_the_worker_reaches_the_caller_as_such(space, client):
    from gradio_client.exceptions import AppError

    space.control(oom_at_step=2)
    mark = space.mark()
    try:
        with pytest.raises(AppError, match="Out of GPU memory; try a smaller size or fewer concepts") as error:
            generate(client, steps=4)
    finally:
        space.control()
    assert "OutOfMemoryError" not in str(error.value) and "Generation failed" not in str(error.value)
    events = space.events(mark)
    assert [e["done"] for e in events if e["event"] == "step"] == [1, 2]
    assert events[-1]["event"] == "release" and events[-1]["fail"]
    _, _, used = generate(client, seed=2)
    assert used["seed"] == 2


def test_two_visitors_run_at_once_each_in_its_own_worker(space):
    # Concurrency by construction, not by timing: each run holds its first step until the other run has
    # logged a step (tests/zerogpu.py's rendezvous). Were the two runs served one after the other, the first
    # would wait for a run that cannot start, and log that the rendezvous was not met.
    from gradio_client import Client

    space.control(rendezvous=[51, 52])
    mark = space.mark()
    try:
        jobs = [Client(space.url, verbose=False).submit(prompt=PROMPT, steps=3, seed=seed, api_name="/generate")
                for seed in (51, 52)]
        assert [job.result(timeout=600)[2]["seed"] for job in jobs] == [51, 52]
    finally:
        space.control()
    events = space.events(mark)
    met = {e["seed"]: e["met"] for e in events if e["event"] == "rendezvous"}
    assert met == {51: True, 52: True}  # each run was under way while the other one was
    steps = [e for e in events if e["event"] == "step"]
    assert {e["done"] for e in steps if e["seed"] == 51} == {e["done"] for e in steps if e["seed"] == 52} == {1, 2, 3}
    assert {e["pid"] for e in steps if e["seed"] == 51}.isdisjoint({e["pid"] for e in steps if e["seed"] == 52})


def test_progress_reaches_the_browser_from_the_worker(space):
    from tests.server.test_cancel import browser_page, start_in_browser, wait_for_step

    with browser_page() as page:
        mark = space.mark()
        start_in_browser(page, space.url, steps=40, seed=21)
        wait_for_step(space, mark, 21, 4)
        progress = page.locator("#edited .progress-text").first
        text = progress.inner_text(timeout=10_000)
        assert text.split(" ")[0].endswith("/40"), text
        done = int(text.split("/")[0])
        assert done >= 1
        page.locator("#stop").click()
        # The next test starts once this run has ended and its GPU is released (else ZeroGPU, emulated, hands
        # the next call another GPU, hence another worker).
        deadline = time.monotonic() + 300
        while not any(e["event"] == "run_end" and e["seed"] == 21 for e in space.events(mark)):
            assert time.monotonic() < deadline, "the stopped run did not end"
            time.sleep(0.05)
        while space.events(mark)[-1]["event"] != "release":
            assert time.monotonic() < deadline, "the stopped run's GPU was not released"
            time.sleep(0.05)


def test_zerogpu_defaults_keep_the_largest_request_within_an_anonymous_visitors_quota():
    zero = api.Limits.from_env({"SPACES_ZERO_GPU": "true"})
    worst = service.gpu_duration(zero.max_steps, zero.max_concepts, zero.max_size, zero.max_size)
    assert worst <= 120  # 2 minutes a day unauthenticated (https://huggingface.co/docs/hub/spaces-zerogpu)
    off = api.Limits.from_env({})
    assert service.gpu_duration(off.max_steps, off.max_concepts, off.max_size, off.max_size) > 120
    assert api.Limits.from_env({"SPACES_ZERO_GPU": "true", "SEGA_MAX_STEPS": "900"}).max_steps == 900
    assert limits.queue_settings({"SPACES_ZERO_GPU": "true"}) == (32, limits.ZERO_GPU_CONCURRENCY)
    assert limits.ZERO_GPU_CONCURRENCY > 1
    assert limits.queue_settings({"SPACES_ZERO_GPU": "true", "SEGA_CONCURRENCY": "1"})[1] == 1



def test_a_second_edit_of_an_image_reuses_its_inversion_when_zerogpu_reuses_the_worker(space, client):
    # The emulated scheduler hands every call the same idle GPU, so spaces reuses the worker it forked; the
    # inversion cache lives on the pipeline in that worker.
    from gradio_client import handle_file

    from sega.demo.editing import EXAMPLES_DIR

    mark = space.mark()
    hits, durations = [], []
    for concepts in ([{"prompt": "blue", "warmup": 1}], [{"prompt": "square", "warmup": 1}]):
        # Both calls on GPU index 0, whose worker spaces keeps: none held by a run an earlier test left going.
        space.wait_until_every_gpu_is_released()
        _, _, used = client.predict(image=handle_file(str(EXAMPLES_DIR / "yellow-triangle.png")), concepts=concepts,
                                    seed=2, steps=4, api_name="/edit")
        hits.append(used["cache_hit"])
    events = space.events(mark)
    durations = [e["duration"] for e in events if e["event"] == "schedule"]
    assert hits == [False, True]
    assert len({e["pid"] for e in events if e["event"] == "step"}) == 1  # both in one worker
    assert durations[0] == service.gpu_duration(4 - int(0.2 * 4), 1, 32, 32, inversion=True)
