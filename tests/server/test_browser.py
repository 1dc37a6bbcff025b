"""Headless Chromium drives the app like a visitor.

The README's screenshot is refreshed only on request:
``SEGA_SCREENSHOT=assets/screenshot.png python -m pytest tests/server/test_browser.py``.
"""

import os
from pathlib import Path

import pytest

from server.profiles import DEMO_PROFILE
from tests.served import browser_page, import_app, serve

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def server():
    with serve(import_app()) as url:
        yield url


def test_two_concepts_one_removed_shows_both_images(server, tmp_path):
    from playwright.sync_api import expect

    with browser_page() as page:
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
    assert 0 < screenshot.stat().st_size < 300_000


def test_an_uploaded_image_is_edited_in_the_second_tab(server, tmp_path):
    from playwright.sync_api import expect

    from sega.demo.editing import EXAMPLES_DIR

    with browser_page(height=1000) as page:
        page.goto(server)
        page.get_by_role("tab", name="Edit an image").click()
        page.locator("#edit-image input[type=file]").set_input_files(str(EXAMPLES_DIR / "red-circle.png"))
        expect(page.locator("#edit-image img").first).to_be_visible(timeout=30_000)
        page.locator("#add-edit-concept").click()
        page.locator("#edit-concept-0-text textarea, #edit-concept-0-text input").first.fill("blue")
        page.locator("#edit-concept-1-text textarea, #edit-concept-1-text input").first.fill("red")
        page.locator("#edit-concept-1-direction").get_by_text("remove").click()
        page.locator("#edit-randomize input").uncheck()
        page.locator("#edit-seed input").fill("3")

        page.locator("#edit").click()
        for image in ("#edit-original img", "#edit-edited img"):
            expect(page.locator(image).first).to_be_visible(timeout=120_000)
        summary = page.locator("#edit-summary")
        expect(summary).to_contain_text("your image 32×32 px", timeout=30_000)
        assert "+'blue'" in summary.inner_text() and "−'red'" in summary.inner_text()
        page.screenshot(path=str(tmp_path / "edit.png"), full_page=True)
