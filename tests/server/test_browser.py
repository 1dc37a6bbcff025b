"""Headless Chromium drives the app like a visitor.

The README's screenshot is refreshed only on request:
``SEGA_SCREENSHOT=assets/screenshot.png python -m pytest tests/server/test_browser.py``.
"""

import dataclasses
import io
import os
import struct
import zlib
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import pytest
from PIL import Image

from sega.inversion import performed_steps
from server.profiles import DEMO_PROFILE
from tests.served import browser_page, pixels, serve

pytestmark = pytest.mark.slow

# Small upload limits for this module's server, so that the refusals can be tried with small files.
IMAGE_MB, IMAGE_PIXELS = 1, 500_000
ERROR_TOAST = "[data-testid=toast-body].error"
RUN_TIMEOUT = 120_000  # ms
FEW_STEPS = 12
EDIT_STEPS = FEW_STEPS + 3  # what skip leaves of them is past every preset's warmup (checked where presets run)


@pytest.fixture(scope="module")
def server(app_module):
    small = {model_id: dataclasses.replace(limits, max_image_mb=IMAGE_MB, max_image_pixels=IMAGE_PIXELS)
             for model_id, limits in app_module.LIMITS.items()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(app_module, "LIMITS", small)  # read per request, and by launch() for max_file_size
        with serve(app_module) as url:
            yield url


def text_field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def number_of(page, elem_id: str):
    """The number box of a slider or number widget."""
    return page.locator(f"#{elem_id} input[type=number]").first


def set_number(page, elem_id: str, value) -> None:
    box = number_of(page, elem_id)
    box.fill(str(value))
    box.press("Enter")


def no_error(page) -> None:
    from playwright.sync_api import expect

    expect(page.locator(ERROR_TOAST)).to_have_count(0)


def run(page, button: str, prefix: str = "") -> str:
    """Press Generate or Edit with Random seed on; wait for the new seed, both images and no error.

    Returns the seed used."""
    from playwright.sync_api import expect

    randomize = page.locator(f"#{prefix}randomize input")
    randomize.check()
    before = page.locator(f"#{prefix}seed-used input").input_value()
    page.locator(button).click()
    seed_used = page.locator(f"#{prefix}seed-used input")
    expect(seed_used).not_to_have_value(before, timeout=RUN_TIMEOUT)
    for image in (f"#{prefix}original img", f"#{prefix}edited img"):
        expect(page.locator(image).first).to_be_visible(timeout=30_000)
    no_error(page)
    used = seed_used.input_value()
    # The seed used is back in the Seed box, and Random seed stays on.
    expect(page.locator(f"#{prefix}seed input")).to_have_value(used)
    assert randomize.is_checked()
    return used


def shown(page, server: str, selector: str) -> np.ndarray:
    """The RGB pixels of the image an <img> shows, as served to the browser."""
    src = page.locator(selector).first.get_attribute("src")
    body = page.request.get(urljoin(server, src)).body()
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def expect_row(page, row: str, concept: dict, endpoint: str, mask: str | None = None) -> None:
    """The row shows ``concept`` with the keys it leaves out filled from its preset (as the API fills them, from
    the table of ``mask``; default: the endpoint's default mask mode)."""
    from playwright.sync_api import expect

    mask = mask or (DEMO_PROFILE.edit_defaults if endpoint == "edit" else DEMO_PROFILE.defaults)["mask"]
    full = DEMO_PROFILE.concept_defaults(concept.get("preset"), endpoint, mask) | concept
    expect(text_field(page, f"{row}-text")).to_have_value(full["prompt"])
    for key in ("scale", "threshold", "warmup"):
        expect(number_of(page, f"{row}-{key}")).to_have_value(f"{full[key]:g}")
    expect(page.locator(f"#{row}-direction input[value={'remove' if full['reverse'] else 'add'}]")).to_be_checked()


def fake_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with no pixel data at all."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


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
        custom = DEMO_PROFILE.presets.table()["custom"]
        # removed, with the custom preset's values
        assert "+'blue'" in text and f"−'red' (scale {custom['scale']:g}, threshold {custom['threshold']:g}," in text
        assert "25 steps" in text
        expect(page.locator("#seed-used input")).to_have_value("7")

        screenshot = Path(os.environ.get("SEGA_SCREENSHOT") or tmp_path / "screenshot.png")
        page.screenshot(path=str(screenshot), full_page=True)
    assert 0 < screenshot.stat().st_size < 300_000


def test_masks_are_shown_beside_the_result_in_both_tabs(server):
    """With a mask, a gallery shows each concept's mask over the image with edits; without, it is hidden."""
    from playwright.sync_api import expect

    from sega.demo.editing import EXAMPLES_DIR

    with browser_page(height=1200) as page:
        page.goto(server)
        page.locator("#prompt textarea").fill("a large red circle on a white background")
        page.locator("#add-concept").click()
        text_field(page, "concept-0-text").fill("blue")
        text_field(page, "concept-1-text").fill("red")
        page.locator("#concept-1-direction").get_by_text("remove").click()
        # the mask mode first: choosing it refills the rows from their presets (the demo model's for masks)
        page.locator("#mask input[value=intersect]").check()
        set_number(page, "steps", 10)
        for i in range(2):
            set_number(page, f"concept-{i}-warmup", 2)
        run(page, "#generate")
        gallery = page.locator("#masks")
        expect(gallery.locator("img")).to_have_count(2, timeout=RUN_TIMEOUT)
        expect(gallery).to_contain_text("+blue")
        expect(gallery).to_contain_text("−red")
        overlay, result = shown(page, server, "#masks img"), shown(page, server, "#edited img")
        # Tinted where masked. The run's seed is random and the tint follows the mask averaged over the steps
        # (a position masked at a few steps is tinted faintly): 40 to over 50 seen, hence a visible-tint bound.
        assert overlay.shape == result.shape and np.abs(overlay.astype(int) - result).max() > 15
        page.locator("#mask input[value=none]").check()
        run(page, "#generate")
        expect(gallery).to_be_hidden(timeout=RUN_TIMEOUT)
        no_error(page)

        page.get_by_role("tab", name="Edit an image").click()
        page.locator("#edit-image input[type=file]").set_input_files(str(EXAMPLES_DIR / "red-circle.png"))
        expect(page.locator("#edit-image img").first).to_be_visible(timeout=30_000)
        text_field(page, "edit-concept-0-text").fill("blue")
        page.locator("#edit-mask input[value=cross-attention]").check()
        set_number(page, "edit-steps", 10)
        set_number(page, "edit-concept-0-warmup", 2)
        run(page, "#edit", "edit-")
        edit_gallery = page.locator("#edit-masks")
        expect(edit_gallery.locator("img")).to_have_count(1, timeout=RUN_TIMEOUT)
        expect(edit_gallery).to_contain_text("+blue")


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


# ------------------------------------------------------------------------------------------------------------
# The paths visitors take: examples, presets, uploads, "Edit this image", "As code"
# ------------------------------------------------------------------------------------------------------------


def test_every_generate_example_fills_the_form_and_generates(server):
    from playwright.sync_api import expect

    with browser_page() as page:
        page.goto(server)
        for label, prompt, concepts, seed in DEMO_PROFILE.examples:
            page.locator("button.gallery-item:visible", has_text=label).click()
            expect(text_field(page, "prompt")).to_have_value(prompt)
            for i, concept in enumerate(concepts):
                expect_row(page, f"concept-{i}", concept, "generate")
            expect(page.locator(f"#concept-{len(concepts) - 1}").first).to_be_visible()
            # the example's own (cached) result, with its seed
            expect(page.locator("#seed-used input")).to_have_value(str(seed), timeout=RUN_TIMEOUT)
            no_error(page)
            set_number(page, "steps", FEW_STEPS)  # a short run of the filled form (the example reset the steps)
            run(page, "#generate")


def test_every_edit_example_fills_the_form_and_edits(server):
    from playwright.sync_api import expect

    with browser_page(height=1000) as page:
        page.goto(server)
        page.get_by_role("tab", name="Edit an image").click()
        for label, _, source, concepts, seed in DEMO_PROFILE.edit_examples:
            page.locator("button.gallery-item:visible", has_text=label).click()
            expect(number_of(page, "edit-seed")).to_have_value(str(seed))
            expect(text_field(page, "edit-source-prompt")).to_have_value(source)
            expect(page.locator("#edit-image img").first).to_be_visible()
            for i, concept in enumerate(concepts):
                expect_row(page, f"edit-concept-{i}", concept, "edit")
            set_number(page, "edit-steps", EDIT_STEPS)
            run(page, "#edit", "edit-")


def test_clicking_an_example_again_resets_a_changed_row(server):
    from playwright.sync_api import expect

    label, _, concepts, _ = DEMO_PROFILE.examples[0]
    with browser_page() as page:
        page.goto(server)
        example = page.locator("button.gallery-item:visible", has_text=label)
        example.click()
        expect_row(page, "concept-0", concepts[0], "generate")
        text_field(page, "concept-0-text").fill("green")
        set_number(page, "concept-0-scale", 3)
        page.locator("#concept-0-direction").get_by_text("remove").click()
        expect(number_of(page, "concept-0-scale")).to_have_value("3")
        example.click()
        expect_row(page, "concept-0", concepts[0], "generate")
        no_error(page)


def pick_preset(page, row: str, name: str) -> None:
    page.locator(f"#{row}-preset input").click()
    page.get_by_role("option", name=name, exact=True).click()


def try_every_preset(page, endpoint: str, prefix: str, button: str) -> None:
    """With each mask mode, every preset of the row fills its numbers from that mode's table; switching the mode
    refills the row from its preset. Without a mask every preset runs with its numbers; with one, the last
    preset runs (the numbers reach the run the same way whatever the table: one run shows it for masks)."""
    from playwright.sync_api import expect

    row, mask_id = f"{prefix}concept-0", f"{prefix}mask"
    for mask in ("none", "intersect"):
        page.locator(f"#{mask_id} input[value={mask}]").check()
        current = page.locator(f"#{row}-preset input").input_value()
        expect_row(page, row, {"prompt": "blue", "preset": current}, endpoint, mask)  # refilled for the mode
        table = DEMO_PROFILE.presets.table(endpoint, mask)
        for i, (name, values) in enumerate(table.items()):
            pick_preset(page, row, name)
            expect_row(page, row, {"prompt": "blue", "preset": name}, endpoint, mask)
            if mask != "none" and i < len(table) - 1:
                continue
            seed = run(page, button, prefix)
            # the summary follows from the run's JSON (its own event): wait for this run's
            expect(page.locator(f"#{prefix}summary")).to_contain_text(f"seed {seed}", timeout=30_000)
            expect(page.locator(f"#{prefix}summary")).to_contain_text(
                f"+'blue' (scale {values['scale']:g}, threshold {values['threshold']:g}, from step {values['warmup']})")


def test_each_preset_of_a_row_generates(server):
    from playwright.sync_api import expect

    with browser_page() as page:
        page.goto(server)
        # the help texts are shown with the sliders
        expect(page.get_by_text("Higher edits LESS of the image").first).to_be_visible()
        text_field(page, "prompt").fill("a large red circle on a white background")
        text_field(page, "concept-0-text").fill("blue")
        assert FEW_STEPS > max(p["warmup"] for table in DEMO_PROFILE.presets.tables()
                               for p in table.values())  # every preset still applies
        set_number(page, "steps", FEW_STEPS)
        try_every_preset(page, "generate", "", "#generate")


def test_each_preset_of_an_edit_row_edits(server):
    from playwright.sync_api import expect

    from sega.demo.editing import EXAMPLES_DIR

    with browser_page(height=1000) as page:
        page.goto(server)
        page.get_by_role("tab", name="Edit an image").click()
        page.locator("#edit-image input[type=file]").set_input_files(str(EXAMPLES_DIR / "red-circle.png"))
        expect(page.locator("#edit-image img").first).to_be_visible(timeout=30_000)
        text_field(page, "edit-concept-0-text").fill("blue")
        assert performed_steps(EDIT_STEPS, DEMO_PROFILE.edit_defaults["skip"]) > max(
            p["warmup"] for table in DEMO_PROFILE.presets.tables()
            for p in table.values())  # what skip leaves is past every warmup
        set_number(page, "edit-steps", EDIT_STEPS)
        try_every_preset(page, "edit", "edit-", "#edit")


def test_a_transparent_upload_is_edited_on_white_as_over_the_api(server, tmp_path):
    from gradio_client import Client, handle_file
    from playwright.sync_api import expect

    rgba = np.zeros((64, 64, 4), np.uint8)  # left half: transparent black; right half: opaque blue
    rgba[:, 32:] = (30, 60, 220, 255)
    path = tmp_path / "transparent.png"
    Image.fromarray(rgba, "RGBA").save(path)
    with browser_page(height=1000) as page:
        page.goto(server)
        page.get_by_role("tab", name="Edit an image").click()
        page.locator("#edit-image input[type=file]").set_input_files(str(path))
        expect(page.locator("#edit-image img").first).to_be_visible(timeout=30_000)
        page.locator("#edit-randomize input").uncheck()
        set_number(page, "edit-seed", 5)
        page.locator("#edit").click()
        expect(page.locator("#edit-seed-used input")).to_have_value("5", timeout=RUN_TIMEOUT)
        expect(page.get_by_text("transparent areas were filled with white").first).to_be_visible()
        no_error(page)
        reconstruction = shown(page, server, "#edit-original img")
    # The transparent half comes out white (not black), and the same file edits the same over the API.
    assert reconstruction[:, :12].mean() > 200 and reconstruction[:, -12:, 2].mean() > reconstruction[:, -12:, 0].mean()
    api_reconstruction, _, _ = Client(server, verbose=False).predict(image=handle_file(str(path)), seed=5,
                                                                     api_name="/edit")
    assert np.array_equal(reconstruction, pixels(api_reconstruction))


def test_uploads_over_the_pixel_or_file_size_limit_are_refused(server, tmp_path, monkeypatch):
    import PIL.ImageFile
    from playwright.sync_api import expect

    # Headers that claim more pixels than SEGA_MAX_IMAGE_PIXELS, one of them more than PIL itself opens.
    claims = {"claims-4mp.png": (2000, 2000), "claims-900mp.png": (30_000, 30_000)}
    for name, size in claims.items():
        (tmp_path / name).write_bytes(fake_png(*size))
    decoded = []
    real_load = PIL.ImageFile.ImageFile.load
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load",
                        lambda self: decoded.append(os.path.basename(str(getattr(self, "filename", "")))) or
                        real_load(self))
    big = tmp_path / "big.png"  # random pixels do not compress: about 1.5 MB
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (720, 720, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > IMAGE_MB * 1024 * 1024
    with browser_page(height=1000) as page:
        page.goto(server)
        page.get_by_role("tab", name="Edit an image").click()
        for name in claims:
            page.locator("#edit-image input[type=file]").set_input_files(str(tmp_path / name))
            page.locator("#edit").click()
            toast = page.locator(ERROR_TOAST).last
            expect(toast).to_be_visible(timeout=30_000)
            expect(toast).to_contain_text("image has")
            expect(toast).to_contain_text(f"at most {IMAGE_PIXELS}")
            page.locator("[data-testid=toast-close]").last.click()
            expect(page.locator(ERROR_TOAST)).to_have_count(0)
        assert not set(decoded) & set(claims)  # refused from the header, never decoded
        # A file above SEGA_MAX_IMAGE_MB is refused by gradio as it is uploaded.
        page.locator("#edit-image input[type=file]").set_input_files(str(big))
        expect(page.locator(ERROR_TOAST).last).to_contain_text(f"maximum allowed size of {IMAGE_MB}", timeout=30_000)
        expect(page.locator("#edit-image img")).to_have_count(0)


def test_edit_this_image_sends_the_result_and_its_prompt_to_the_edit_tab(server, monkeypatch):
    from playwright.sync_api import expect

    prompt = "a large red circle on a white background"
    with browser_page(height=1000) as page:
        page.goto(server)
        text_field(page, "prompt").fill(prompt)
        text_field(page, "concept-0-text").fill("blue")
        set_number(page, "steps", FEW_STEPS)
        run(page, "#generate")
        generated = shown(page, server, "#edited img")
        # "As code" calls the address the visitor used
        page.get_by_text("As code").first.click()
        expect(page.locator("#client-code")).to_contain_text(f"Client('{server}')")

        page.locator("#edit-this").click()
        expect(page.get_by_role("tab", name="Edit an image")).to_have_attribute("aria-selected", "true")
        expect(page.locator("#edit-image img").first).to_be_visible(timeout=30_000)
        expect(text_field(page, "edit-source-prompt")).to_have_value(prompt)
        assert np.array_equal(shown(page, server, "#edit-image img"), generated)
        # On a Space, "As code" names the Space instead.
        monkeypatch.setenv("SPACE_ID", "someone/sega")
        set_number(page, "edit-steps", EDIT_STEPS)
        run(page, "#edit", "edit-")
        page.get_by_text("As code").last.click()
        expect(page.locator("#edit-client-code")).to_contain_text("Client('someone/sega')")
        expect(page.locator("#edit-summary")).to_contain_text("your image 32×32 px")
