"""Headless Chromium drives the app like a visitor.

The README's screenshot is refreshed only on request:
``SEGA_SCREENSHOT=assets/screenshot.png python -m pytest tests/server/test_browser.py``.
"""

import os
from pathlib import Path

import pytest

from server.profiles import DEMO_PROFILE
from tests.served import import_app, serve

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def server():
    with serve(import_app()) as url:
        yield url


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed")
def test_two_concepts_one_removed_shows_both_images(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server)
            page.locator("#prompt textarea").fill("a large red circle on a white background")

            page.locator("#add-concept").click()
            expect(page.locator("#concept-1").first).to_be_visible()  # gradio nests the id twice
            page.locator("#concept-0-text textarea, #concept-0-text input").first.fill("blue")
            page.locator("#concept-1-text textarea, #concept-1-text input").first.fill("red")
            page.locator("#concept-1-direction").get_by_text("remove").click()
            page.locator("#concept-1-preset input").click()
            page.get_by_role("option", name="custom").click()

            page.locator("#randomize input").uncheck()
            page.locator("#seed input").fill("7")
            page.locator("#steps input[type=number]").fill("25")
            page.locator("#steps input[type=number]").press("Enter")

            page.locator("#generate").click()
            for image in ("#original img", "#edited img"):
                expect(page.locator(image).first).to_be_visible(timeout=120_000)
            summary = page.locator("#summary")
            expect(summary).to_contain_text("seed 7", timeout=30_000)
            text = summary.inner_text()
            custom = DEMO_PROFILE.presets["custom"]
            # removed, with the custom preset's values
            assert "+'blue'" in text and f"−'red' (scale {custom['scale']:g}, threshold {custom['threshold']:g}," in text
            assert "25 steps" in text
            expect(page.locator("#seed-used input")).to_have_value("7")

            screenshot = Path(os.environ.get("SEGA_SCREENSHOT") or tmp_path / "screenshot.png")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert 0 < screenshot.stat().st_size < 300_000
