"""Helpers for tests that start the app in-process on the demo model and talk to it over loopback."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_app():
    """The app module on the bundled demo model, whatever $SEGA_MODEL says (it is read at import).

    Its examples are cached in a temporary folder of this process, not in the checkout's ``.gradio/``: every
    run of the tests makes each example's first run, and none sees results of older code. As ``python app.py``
    does, the variable stays set for the process (gradio reads it at import and when it serves a file)."""
    if "GRADIO_EXAMPLES_CACHE" not in os.environ:
        cache = tempfile.mkdtemp(prefix="sega-examples-")
        atexit.register(shutil.rmtree, cache, True)
        os.environ["GRADIO_EXAMPLES_CACHE"] = cache
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("SEGA_MODEL", raising=False)
        import app
    app.LOADED.pipe.set_progress_bar_config(disable=True)
    return app


@contextmanager
def serve(app_module, **launch_kwargs):
    """The app on 127.0.0.1 and a free port; yields its URL (ending in "/") and closes it afterwards."""
    _, url, _ = app_module.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
                                  quiet=True, **launch_kwargs)
    try:
        yield url
    finally:
        app_module.demo.close()


def pixels(path) -> np.ndarray:
    """An image file's RGB pixels."""
    return np.asarray(Image.open(path).convert("RGB"))


CHROMIUM = "/usr/bin/chromium"  # Debian's; never a downloaded browser
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


_BROWSER: dict = {}  # this process's one headless chromium, launched by the first browser test


@contextmanager
def browser_page(width: int = 1280, height: int = 900):
    """A page of headless Debian chromium in a context of its own (the test is skipped where it is not installed).

    One browser serves every test of a process, each test in a fresh context (no cookies or storage shared):
    launching chromium costs about as much as a short test."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed")
    if "browser" not in _BROWSER:
        from playwright.sync_api import sync_playwright

        playwright = sync_playwright().start()
        _BROWSER["browser"] = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        atexit.register(playwright.stop)
    context = _BROWSER["browser"].new_context(viewport={"width": width, "height": height})
    try:
        yield context.new_page()
    finally:
        context.close()


def model_panels(page, url: str, count: int = 2) -> list:
    """Open the app of ``count`` models at ``url``: each model's panel, the first (the default model's) shown,
    the others hidden."""
    from playwright.sync_api import expect

    page.goto(url)
    panels = [page.locator("#panel"), *(page.locator(f"#m{i}-panel") for i in range(1, count))]
    expect(panels[0]).to_be_visible(timeout=60_000)
    for panel in panels[1:]:
        expect(panel).to_be_hidden()
    return panels


def start_generate(page, prompt: str, seed: int, steps: int, concept: str | None = None) -> None:
    """Fill the Generate form (the prompt, one concept if given, a fixed seed, the steps) and press Generate."""
    page.locator("#prompt textarea").fill(prompt)
    if concept is not None:
        page.locator("#concept-0-text textarea, #concept-0-text input").first.fill(concept)
    page.locator("#randomize input").uncheck()
    page.locator("#seed input").fill(str(seed))
    page.locator("#steps input[type=number]").fill(str(steps))
    page.locator("#steps input[type=number]").press("Enter")
    page.locator("#generate").click()
