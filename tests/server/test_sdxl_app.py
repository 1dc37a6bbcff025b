"""``python app.py --model <an SDXL folder> --model <the demo model>``: tiny random SDXL components saved with
``save_pretrained`` (as a real SDXL checkpoint is laid out) are detected and served, first (the default), beside
the demo model: /generate and /edit over gradio_client and in the browser with SDXL's profile, and the switch
between the two models' forms."""

from __future__ import annotations

import os

import numpy as np
import PIL.Image
import pytest
from diffusers import StableDiffusionXLPipeline

from benchmarks.load import app_process
from sega import SegaXLPipeline
from sega.demo.shapes import DEFAULT_MODEL_DIR
from server import params as api
from server import service, snippets
from server.loading import load_pipeline
from server.profiles import DEMO_PROFILE, SD_PROFILE, SDXL_PROFILE
from tests.served import browser_page, model_panels, pixels
from tests.tiny import tiny_xl_components

pytestmark = pytest.mark.slow

NATIVE = 16  # the tiny UNet's sample_size 8 times the VAE's factor 2


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    StableDiffusionXLPipeline(**tiny_xl_components(), add_watermarker=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sdxl_server(sdxl_folder, tmp_path_factory):
    """One app start for the module: the SDXL folder (the default) and the demo model."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "TQDM_DISABLE": "1"}
    env.pop("SEGA_MODEL", None)
    env["SEGA_MODELS"] = "ignored-when-the-command-line-names-models"
    log = tmp_path_factory.mktemp("logs") / "app.log"
    args = ["app.py", "--model", str(sdxl_folder), "--model", str(DEFAULT_MODEL_DIR)]
    with app_process(args, env, log, timeout=600) as (url, _pid):
        yield url


def upload(tmp_path) -> str:
    path = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_an_sdxl_folder_loads_with_its_profile_code_and_gpu_time(sdxl_folder):
    loaded = load_pipeline(str(sdxl_folder), device="cpu")
    assert isinstance(loaded.pipe, SegaXLPipeline) and loaded.fallback_reason is None
    assert loaded.profile is SDXL_PROFILE and loaded.native_size == NATIVE
    limits = api.Limits()
    params = api.parse_request(loaded, {"prompt": "a red circle", "steps": 2, "seed": 1,
                                        "concepts": [{"prompt": "blue"}]}, limits)
    assert params.guidance_scale == SDXL_PROFILE.defaults["guidance_scale"] == 5.0
    code = snippets.library_snippet(params)
    assert "from sega import EditConcept, SegaXLPipeline" in code and "SegaXLPipeline.from_pretrained(" in code
    # GPU time follows the model's costs: its profile's constants, and at native sizes SDXL (1024 px) reserves
    # more than SD 1.5 (512 px) for the same steps and concepts.
    request = {"prompt": "a red circle", "steps": 50, "concepts": [{"prompt": "blue"}]}
    xl = api.parse_request(loaded, {**request, "width": 1024, "height": 1024}, limits)
    sd = api.parse_request(loaded, {**request, "width": 512, "height": 512}, limits)
    assert service.gpu_seconds(xl, SDXL_PROFILE) == service.gpu_duration(
        50, 1, 1024, 1024, per_sample=SDXL_PROFILE.gpu_seconds_per_sample, fixed=SDXL_PROFILE.gpu_fixed_seconds)
    assert service.gpu_seconds(xl, SDXL_PROFILE) > service.gpu_seconds(sd, SD_PROFILE)
    # On ZeroGPU the SDXL limits allow its native 1024 px, and the largest request stays within an anonymous
    # visitor's daily 120 s.
    zero = api.Limits.from_env({"SPACES_ZERO_GPU": "true"}, SDXL_PROFILE.zero_gpu_limits)
    assert zero.max_size == 1024
    worst = service.gpu_duration(zero.max_steps, zero.max_concepts, 1024, 1024, inversion=True,
                                 per_sample=SDXL_PROFILE.gpu_seconds_per_sample, fixed=SDXL_PROFILE.gpu_fixed_seconds)
    assert worst <= 120


def test_generate_and_edit_over_the_api(sdxl_server, sdxl_folder, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(sdxl_server, verbose=False)
    # No model named: the first one served, with its own defaults (its native size, SDXL's guidance).
    original, edited, used = client.predict(prompt="a red circle", steps=3, seed=1, api_name="/generate",
                                            concepts=[{"prompt": "blue", "warmup": 1}])
    original, edited = pixels(original), pixels(edited)
    assert original.shape == edited.shape == (NATIVE, NATIVE, 3)
    assert not np.array_equal(original, edited)
    assert used["model"] == str(sdxl_folder) and used["seed"] == 1
    assert used["width"] == used["height"] == NATIVE and used["guidance_scale"] == 5.0

    reconstruction, edited, used = client.predict(image=handle_file(upload(tmp_path)), steps=5, seed=2,
                                                  concepts=[{"prompt": "blue"}], api_name="/edit")
    assert pixels(reconstruction).shape == pixels(edited).shape == (NATIVE, NATIVE, 3)
    assert not np.array_equal(pixels(reconstruction), pixels(edited))
    # Uploaded images take the SDXL edit presets (LEDITS++'s SDXL defaults).
    concept = used["concepts"][0]
    preset = SDXL_PROFILE.concept_defaults(endpoint="edit")
    assert (concept["scale"], concept["threshold"], concept["warmup"]) == (preset["scale"], preset["threshold"],
                                                                           preset["warmup"])


def test_the_browser_generates_and_edits(sdxl_server, tmp_path):
    from playwright.sync_api import expect

    with browser_page(height=1000) as page:
        page.goto(sdxl_server)
        page.locator("#prompt textarea").fill("a red circle")
        page.locator("#concept-0-text textarea, #concept-0-text input").first.fill("blue")
        page.locator("#steps input[type=number]").fill("3")
        page.locator("#steps input[type=number]").press("Enter")
        page.locator("#generate").click()
        for image in ("#original img", "#edited img"):
            expect(page.locator(image).first).to_be_visible(timeout=240_000)
        expect(page.locator("#summary")).to_contain_text("3 steps", timeout=30_000)

        page.get_by_role("tab", name="Edit an image").click()
        page.locator("#edit-image input[type=file]").set_input_files(upload(tmp_path))
        expect(page.locator("#edit-image img").first).to_be_visible(timeout=30_000)
        page.locator("#edit-concept-0-text textarea, #edit-concept-0-text input").first.fill("blue")
        page.locator("#edit-steps input[type=number]").fill("5")
        page.locator("#edit-steps input[type=number]").press("Enter")
        page.locator("#edit").click()
        for image in ("#edit-original img", "#edit-edited img"):
            expect(page.locator(image).first).to_be_visible(timeout=240_000)
        expect(page.locator("#edit-summary")).to_contain_text("+'blue'", timeout=30_000)


# ------------------------------------------------------------------------------------------------
# One app, two models: SDXL (the default) and the bundled demo model
# ------------------------------------------------------------------------------------------------


def test_two_models_over_the_api(sdxl_server, sdxl_folder, tmp_path):
    from gradio_client import Client, handle_file
    client = Client(sdxl_server, verbose=False)
    info = client.view_api(return_format="dict", print_info=False)
    for endpoint in ("/generate", "/edit"):
        defaults = {p["parameter_name"]: p["parameter_default"]
                    for p in info["named_endpoints"][endpoint]["parameters"]}
        # What differs between the models shows no default: the server fills in the chosen model's own.
        assert defaults["model"] is None and defaults["steps"] is None
    # The demo model: its limits and defaults (32 px), its presets.
    _, _, used = client.predict(prompt="a red circle", steps=2, seed=1, model=str(DEFAULT_MODEL_DIR),
                                concepts=[{"prompt": "black background", "preset": "background"}], api_name="/generate")
    assert used["model"] == str(DEFAULT_MODEL_DIR) and used["width"] == 32
    # Each model's presets: the demo's "background" is not one of SDXL's.
    with pytest.raises(Exception, match=r"concepts\[0\]\.preset must be one of object, style, face, custom"):
        client.predict(prompt="a red circle", concepts=[{"prompt": "black background", "preset": "background"}],
                       model=str(sdxl_folder), api_name="/generate")
    with pytest.raises(Exception, match="model must be one of the served models"):
        client.predict(prompt="a red circle", model="no/such-model", api_name="/generate")
    reconstruction, _, used = client.predict(image=handle_file(upload(tmp_path)), steps=4, seed=2,
                                             model=str(DEFAULT_MODEL_DIR), concepts=[{"prompt": "blue"}],
                                             api_name="/edit")
    assert used["model"] == str(DEFAULT_MODEL_DIR) and pixels(reconstruction).shape == (32, 32, 3)
    assert used["concepts"][0]["scale"] == DEMO_PROFILE.concept_defaults(endpoint="edit")["scale"]


def test_two_models_switch_in_the_browser(sdxl_server, sdxl_folder):
    from playwright.sync_api import expect

    with browser_page(height=1000) as page:
        sdxl_panel, demo_panel = model_panels(page, sdxl_server)
        # The default model's form: SDXL's sizes (up to twice its native size), its presets.
        assert page.locator("#width input[type=range]").get_attribute("max") == str(2 * NATIVE)
        page.locator("#concept-0-preset input").click()
        for name in SDXL_PROFILE.presets.table():
            expect(page.get_by_role("option", name=name, exact=True)).to_be_visible()
        page.keyboard.press("Escape")
        page.locator("#prompt textarea").fill("a red circle")
        page.locator("#concept-0-text textarea, #concept-0-text input").first.fill("blue")
        page.locator("#steps input[type=number]").fill("3")
        page.locator("#steps input[type=number]").press("Enter")
        page.locator("#generate").click()
        expect(page.locator("#summary")).to_contain_text(f"{NATIVE}×{NATIVE} px", timeout=240_000)
        expect(page.locator("#summary")).to_contain_text("+'blue'")

        page.locator("#model").get_by_label("demo (bundled)").check()
        expect(demo_panel).to_be_visible(timeout=30_000)
        expect(sdxl_panel).to_be_hidden()
        # The demo's own form: its sizes (up to twice its 32 px), its presets ("background" is not SDXL's).
        assert page.locator("#m1-width input[type=range]").get_attribute("max") == "64"
        page.locator("#m1-concept-0-preset input").click()
        for name in DEMO_PROFILE.presets.table():
            expect(page.get_by_role("option", name=name, exact=True)).to_be_visible()
        page.keyboard.press("Escape")
        page.locator("#m1-prompt textarea").fill("a red circle")
        page.locator("#m1-generate").click()
        expect(page.locator("#m1-summary")).to_contain_text("32×32 px", timeout=240_000)

        # Back to SDXL: what it made is still there.
        page.locator("#model").get_by_label(sdxl_folder.name).check()
        expect(sdxl_panel).to_be_visible(timeout=30_000)
        expect(page.locator("#summary")).to_contain_text(f"{NATIVE}×{NATIVE} px")


def test_which_models_are_served(tmp_path):
    from server.loading import load_models, requested_models

    assert requested_models(["a", "b"], {"SEGA_MODELS": "c", "SEGA_MODEL": "d"}) == ["a", "b"]
    assert requested_models(None, {"SEGA_MODELS": " c , e,", "SEGA_MODEL": "d"}) == ["c", "e"]
    assert requested_models(None, {"SEGA_MODEL": "d"}) == ["d"]
    # Two models that both fail to load fall back to one demo model, which says why for both.
    served = load_models([str(tmp_path / "missing-a"), str(tmp_path / "missing-b")], device="cpu")
    (loaded,) = served.values()
    assert loaded.is_demo and "missing-a" in loaded.fallback_reason and "missing-b" in loaded.fallback_reason
