"""Runs as a visitor sees them, in Chromium, on the app as on a ZeroGPU Space (emulated: tests/zerogpu.py):
live previews from the worker, Stop restoring the image a preview replaced, each Stop button stopping its own
run only, and a stopped example's first run caching nothing.

A run is kept going by construction, not by timing: the emulation holds a run of a given seed at a given step
(``{"hold": ...}`` in its control file) until the test lets go.
"""

import io
import time

import httpx
import numpy as np
import pytest

from server.profiles import DEMO_PROFILE
from tests.served import browser_page, pixels
from tests.zerogpu import serve_app

pytestmark = pytest.mark.slow

PROMPT = "a large red circle on a white background"
WAIT = 600  # seconds, at most, for anything that happens on its own (steps are slow on a busy CPU)


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    env = {"SEGA_MAX_STEPS": "400", "GRADIO_EXAMPLES_CACHE": str(folder / "examples")}
    with serve_app(folder, zero_gpu=True, env=env, float32=True) as served:
        yield served


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


def start_generate(page, seed: int, steps: int) -> None:
    page.locator("#prompt textarea").fill(PROMPT)
    page.locator("#concept-0-text textarea, #concept-0-text input").first.fill("blue")
    page.locator("#randomize input").uncheck()
    page.locator("#seed input").fill(str(seed))
    page.locator("#steps input[type=number]").fill(str(steps))
    page.locator("#steps input[type=number]").press("Enter")
    page.locator("#generate").click()


def test_previews_come_from_the_worker_and_stop_puts_the_previous_image_back(space):
    from playwright.sync_api import expect

    with browser_page() as page:
        page.goto(space.url)
        mark = space.mark()
        start_generate(page, 71, 12)
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
            start_generate(page, 61, 6)
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
