"""The app as on a ZeroGPU Space: ``python app.py`` with the installed ``spaces`` package's real ZeroGPU code (a
forked worker per GPU call), its scheduler and CUDA faked on this CPU (tests/zerogpu.py). Over the API: refusals,
out of memory, concurrency, the inversion cache. In Chromium, as a visitor sees runs: live previews from the
worker, Stop restoring the image a preview replaced, each Stop button stopping its own run only, and a stopped
example's first run caching nothing.

The emulated GPU runs float32 (tests/zerogpu.py): these tests are about how runs go; which dtype a GPU gets is
checked where the weights load (tests/server/test_service.py). A run is kept going by construction, not by
timing: the emulation holds a run of a given seed at a given step (``{"hold": ...}`` in its control file) until
the test lets go.
"""

import functools
import io
import time

import httpx
import numpy as np
import pytest

from server import limits, service
from server import params as api
from server.loading import LoadedModel, load_pipeline
from server.profiles import DEMO_PROFILE
from tests.served import browser_page, pixels, start_generate
from tests.zerogpu import fake_ip_token, serve_app

pytestmark = pytest.mark.slow

PROMPT = "a large red circle on a white background"
WAIT = 600  # seconds, at most, for anything that happens on its own (steps are slow on a busy CPU)


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zerogpu")
    with serve_app(folder, zero_gpu=True, env={"SEGA_MAX_STEPS": "400"}) as served:
        yield served


@pytest.fixture(scope="module")
def client(space):
    from gradio_client import Client

    return Client(space.url, verbose=False)


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

    # The same request in this process, without spaces.
    reference = service.generate(_reference(), params)
    assert np.array_equal(pixels(original), np.asarray(reference.original.convert("RGB")))
    assert np.array_equal(pixels(edited), np.asarray(reference.edited.convert("RGB")))
    assert not np.array_equal(pixels(original), pixels(edited))  # the concept did something


@functools.cache
def _reference() -> LoadedModel:
    """The demo model loaded as the app loads it, in this process (float32, as the emulated GPU runs it)."""
    from sega.demo.shapes import DEFAULT_MODEL_DIR

    loaded = load_pipeline(str(DEFAULT_MODEL_DIR), device="cpu")
    loaded.pipe.set_progress_bar_config(disable=True)
    return loaded


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
    from tests.server.test_cancel import start_in_browser

    with browser_page() as page:
        mark = space.mark()
        space.control(hold={"seed": 21, "step": 4})  # the run stays under way while the page is read
        try:
            start_in_browser(page, space.url, steps=40, seed=21)
            held(space, mark, 21)
            progress = page.locator("#edited .progress-text").first
            text = progress.inner_text(timeout=10_000)
            assert text.split(" ")[0].endswith("/40"), text
            assert int(text.split("/")[0]) >= 1
            page.locator("#stop").click()
            wait_for(space, mark, lambda e: e["event"] == "stop_set", "stop")
        finally:
            space.control()
        # The next test starts once this run has ended and its GPU is released (else ZeroGPU, emulated, hands
        # the next call another GPU, hence another worker).
        assert run_end(space, mark, 21)["outcome"] == "Stopped"
        space.wait_until_every_gpu_is_released()


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


# ------------------------------------------------------------------------------------------------------------
# Runs in the browser
# ------------------------------------------------------------------------------------------------------------


def wait_for(space, mark, check, what: str):
    deadline = time.monotonic() + WAIT
    while True:
        found = [e for e in space.events(mark) if check(e)]
        if found:
            return found
        assert time.monotonic() < deadline, f"no {what}"
        time.sleep(0.05)


def run_end(space, mark, seed):
    return wait_for(space, mark, lambda e: e["event"] == "run_end" and e["seed"] == seed, f"end of run {seed}")[0]


def held(space, mark, seed):
    wait_for(space, mark, lambda e: e["event"] == "held" and e["seed"] == seed, f"hold of run {seed}")


def shown(page, selector: str) -> np.ndarray | None:
    """The pixels an image box shows (None when empty)."""
    image = page.locator(f"{selector} img").first
    if not image.count():
        return None
    return pixels(io.BytesIO(httpx.get(image.get_attribute("src"), timeout=30).content))


def until_shown(page, selector: str, check, what: str) -> np.ndarray:
    deadline = time.monotonic() + WAIT
    while True:
        value = shown(page, selector)
        if value is not None and check(value):
            return value
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_previews_come_from_the_worker_and_stop_puts_the_previous_image_back(space):
    from playwright.sync_api import expect

    with browser_page() as page:
        page.goto(space.url)
        mark = space.mark()
        start_generate(page, PROMPT, 71, 12, concept="blue")
        assert run_end(space, mark, 71)["outcome"] == "result"
        expect(page.locator("#summary")).to_contain_text("seed 71", timeout=WAIT * 1000)
        before = shown(page, "#edited")

        mark = space.mark()
        space.control(hold={"seed": 72, "step": 7})
        try:
            page.locator("#seed input").fill("72")
            page.locator("#generate").click()
            held(space, mark, 72)
            # previews every 2nd step (of 12), made in the worker, reach the "With edits" box while the run goes
            steps = [e for e in space.events(mark) if e["event"] == "step" and e["seed"] == 72]
            assert [e["done"] for e in steps if e["preview"]] == [2, 4, 6]
            assert space.pid not in {e["pid"] for e in steps}
            preview = until_shown(page, "#edited", lambda p: not np.array_equal(p, before), "no preview shown")
            # the latent-to-RGB map's picture: the latent's resolution, half the demo image's side
            assert preview.shape == (before.shape[0] // 2, before.shape[1] // 2, 3)
            page.locator("#stop").click()
            until_shown(page, "#edited", lambda p: np.array_equal(p, before), "the previous image did not come back")
            expect(page.get_by_text("Stopped").first).to_be_visible(timeout=WAIT * 1000)
        finally:
            space.control()
        assert run_end(space, mark, 72)["outcome"] == "Stopped"
        expect(page.locator("#summary")).to_contain_text("seed 71")  # the previous run's details stay


def test_stopping_an_edit_leaves_the_same_pages_generate_run_going(space):
    from playwright.sync_api import expect

    from sega.demo.editing import EXAMPLES_DIR

    with browser_page(height=1000) as page:
        page.goto(space.url)
        mark = space.mark()
        space.control(hold=[{"seed": 61, "step": 3}, {"seed": 62, "step": 3}])
        try:
            start_generate(page, PROMPT, 61, 6, concept="blue")
            held(space, mark, 61)  # the Generate run is under way, and stays so until released

            page.get_by_role("tab", name="Edit an image").click()
            page.locator("#edit-image input[type=file]").set_input_files(str(EXAMPLES_DIR / "red-circle.png"))
            expect(page.locator("#edit-image img").first).to_be_visible(timeout=30_000)
            page.locator("#edit-concept-0-text textarea, #edit-concept-0-text input").first.fill("blue")
            page.locator("#edit-randomize input").uncheck()
            page.locator("#edit-seed input").fill("62")
            page.locator("#edit-steps input[type=number]").fill("10")
            page.locator("#edit-steps input[type=number]").press("Enter")
            page.locator("#edit").click()
            held(space, mark, 62)  # both runs under way
            page.locator("#edit-stop").click()
            wait_for(space, mark, lambda e: e["event"] == "stop_set", "stop")
            space.control(hold={"seed": 61, "step": 3})  # the edit goes on, to its stop
            assert run_end(space, mark, 62)["outcome"] == "Stopped"
            assert len([e for e in space.events(mark) if e["event"] == "stop_set"]) == 1
            assert not [e for e in space.events(mark) if e["event"] == "run_end" and e["seed"] == 61]
        finally:
            space.control()
        assert run_end(space, mark, 61)["outcome"] == "result"
        page.get_by_role("tab", name="Generate").click()
        expect(page.locator("#summary")).to_contain_text("seed 61", timeout=WAIT * 1000)
        for box in ("#original", "#edited"):
            expect(page.locator(f"{box} img").first).to_be_visible()
        steps = [e["done"] for e in space.events(mark) if e["event"] == "step" and e["seed"] == 61]
        assert steps[-1] == 6


# Gradio 6.31's page races two messages when a Stop cancels a running example: the server's empty "completed"
# message for the cancelled event, and the page's own cancel. About one run in four the first lands last and the
# "With edits" box keeps an "Error" badge (the server sends no error: measured by logging its queue). Until that
# is fixed upstream or worked around, the test is run again when it fails; a real regression fails every run.
@pytest.mark.flaky(reruns=2)
def test_a_stopped_examples_first_run_says_stopped_and_caches_nothing(space):
    from playwright.sync_api import expect

    label, _, _, seed = DEMO_PROFILE.examples[0]
    with browser_page() as page:
        page.goto(space.url)
        mark = space.mark()
        space.control(hold={"seed": seed, "step": 2})
        try:
            page.get_by_text(label, exact=True).first.click()
            held(space, mark, seed)
            page.locator("#stop").click()
            expect(page.get_by_text("Stopped").first).to_be_visible(timeout=WAIT * 1000)
            wait_for(space, mark, lambda e: e["event"] == "stop_set", "stop")
        finally:
            space.control()
        assert run_end(space, mark, seed)["outcome"] == "Stopped"
        assert not page.locator("#edited").get_by_text("Error").count()
        assert cached_examples(space) == []

        # Nothing was cached: the example runs again, to its end this time, and is cached then.
        mark = space.mark()
        page.get_by_text(label, exact=True).first.click()
        assert run_end(space, mark, seed)["outcome"] == "result"
        expect(page.locator("#edited img").first).to_be_visible(timeout=WAIT * 1000)
        expect(page.locator("#summary")).to_contain_text(f"seed {seed}", timeout=WAIT * 1000)
        assert cached_examples(space) == ["0"]


def cached_examples(space) -> list[str]:
    """The indices of the Generate tab's examples in gradio's lazy example cache."""
    files = list((space.log.parent / "examples").glob("*/indices.csv"))
    return [line for f in files for line in f.read_text().split()]
