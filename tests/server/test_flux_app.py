"""FLUX.1 in the app: a folder of tiny random FLUX components (laid out as a real FLUX checkpoint, with FLUX's 16
latent channels) is recognised, loaded on the CPU with the FLUX profile of its kind ([schnell]-like without a
guidance embedding, [dev]-like with one), and served over gradio_client and in the browser: one app serves the
[schnell]-like folder (the default), the demo model and the [dev]-like folder. The profile and loading tests are
fast; the app and browser tests are slow (tests/conftest.py: they use the ``flux_server`` fixture)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from benchmarks.load import app_process
from sega import SegaPipeline, SegaXLPipeline
from sega.demo.shapes import DEFAULT_MODEL_DIR
from sega.pipeline_flux import SegaFluxPipeline
from server import loading, service, snippets
from server import params as api
from server.profiles import FLUX_DEV_PROFILE, FLUX_SCHNELL_PROFILE
from tests.served import browser_page, model_panels, pixels
from tests.tiny_flux import save_tiny_flux

NATIVE = 128  # FluxPipeline's default_sample_size 128 times the tiny VAE's factor 1
SIZE = 32  # what the tests ask for: small is fast on a CPU
PROMPT = "a large red circle"


@pytest.fixture(scope="module")
def schnell_folder(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("tiny") / "tiny-flux-schnell", guidance_embeds=False,
                          latent_channels=16)


@pytest.fixture(scope="module")
def dev_folder(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("tiny") / "tiny-flux-dev", guidance_embeds=True,
                          latent_channels=16)


# ------------------------------------------------------------------------------------------------
# Recognising and loading (fast)
# ------------------------------------------------------------------------------------------------


def test_a_flux_checkpoint_is_recognised_from_its_model_index():
    assert loading.pipeline_class_for({"_class_name": "FluxPipeline"}) is SegaFluxPipeline
    # Another pipeline class around a FLUX transformer is FLUX too.
    assert loading.pipeline_class_for({"_class_name": "Other", "transformer": ["diffusers", "FluxTransformer2DModel"],
                                       "text_encoder_2": ["transformers", "T5EncoderModel"]}) is SegaFluxPipeline
    assert loading.pipeline_class_for({"_class_name": "StableDiffusionXLPipeline",
                                       "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}) \
        is SegaXLPipeline
    assert loading.pipeline_class_for({"_class_name": "StableDiffusionPipeline"}) is SegaPipeline


def test_flux_from_the_hub_without_a_gpu_falls_back_with_the_reason(monkeypatch):
    # As if the hub's model_index.json said FLUX (this machine may be offline): no download is tried on a CPU.
    monkeypatch.setattr(loading, "pipeline_class", lambda model: SegaFluxPipeline if "FLUX" in model
                        else SegaPipeline)
    loaded = loading.load_pipeline("black-forest-labs/FLUX.1-schnell", device="cpu")
    assert loaded.is_demo
    assert "black-forest-labs/FLUX.1-schnell" in loaded.fallback_reason
    assert "FLUX.1 model, which needs a GPU" in loaded.fallback_reason


def test_a_local_flux_folder_loads_on_the_cpu_with_its_profile(schnell_folder, dev_folder):
    schnell = loading.load_pipeline(str(schnell_folder), device="cpu")
    dev = loading.load_pipeline(str(dev_folder), device="cpu")
    assert isinstance(schnell.pipe, SegaFluxPipeline) and schnell.fallback_reason is None
    assert schnell.profile is FLUX_SCHNELL_PROFILE and dev.profile is FLUX_DEV_PROFILE
    assert schnell.native_size == NATIVE and schnell.size_multiple == 2  # 2 x the VAE's factor (16 for FLUX.1)
    # What each model uses: [schnell] has no guidance scale; neither has a negative prompt, scheduler or mask.
    for loaded, steps, guidance, warmup, tokens in ((schnell, 4, None, 1, 256), (dev, 28, 3.5, 4, 512)):
        defaults = api.defaults(loaded)
        assert (defaults["steps"], defaults["guidance_scale"]) == (steps, guidance)
        assert defaults["negative_prompt"] is defaults["scheduler"] is defaults["mask"] is None
        assert loaded.profile.concept_defaults() == {"preset": "default", "scale": 5.0, "threshold": 0.9,
                                                     "warmup": warmup, "reverse": False, "cooldown": None,
                                                     "weight": 1.0}
        params = api.parse_request(loaded, {"prompt": PROMPT, "seed": 1, "concepts": [{"prompt": "blue"}]},
                                   api.Limits())
        keywords = params.pipeline_keywords()
        assert keywords["max_sequence_length"].build(loaded.pipe) == tokens
        assert not {"negative_prompt", "scheduler"} & set(keywords)
        assert ("guidance_scale" in keywords) == (guidance is not None)


def test_the_api_refuses_what_flux_does_not_use_and_uploads(schnell_folder, dev_folder):
    schnell = loading.load_pipeline(str(schnell_folder), device="cpu")
    dev = loading.load_pipeline(str(dev_folder), device="cpu")
    for raw, words in (({"negative_prompt": "blurry"}, "takes no negative prompt"),
                       ({"guidance_scale": 3.5}, "no guidance embedding"),
                       ({"scheduler": "DDIM"}, "own flow-matching scheduler"),
                       ({"mask": "cross-attention"}, "implicit masks")):
        with pytest.raises(api.InvalidInput, match=words):
            api.parse_request(schnell, {"prompt": PROMPT, **raw}, api.Limits())
    # [dev] takes a guidance scale; an empty negative prompt and mask "none" are what not using them sends.
    params = api.parse_request(dev, {"prompt": PROMPT, "guidance_scale": 2.0, "negative_prompt": "",
                                     "mask": "none"}, api.Limits())
    assert params.guidance_scale == 2.0
    with pytest.raises(api.InvalidInput, match=f"needs a Stable Diffusion or SDXL model; {dev.model_id} is a "
                                               "flux-dev model"):
        api.parse_request(dev, {"image": "photo.png"}, api.Limits(), "edit")


def test_gpu_time_and_zero_gpu_limits_follow_the_flux_profile(schnell_folder):
    loaded = loading.load_pipeline(str(schnell_folder), device="cpu")
    params = api.parse_request(loaded, {"prompt": PROMPT, "steps": 4, "width": 1024, "height": 1024,
                                        "concepts": [{"prompt": "blue"}]}, api.Limits())
    # One estimate per image (distilled guidance, no unconditional one): 1 + (1 + 1 concept) per step.
    profile = FLUX_SCHNELL_PROFILE
    per_1024 = profile.gpu_seconds_per_sample * 4
    assert service.gpu_seconds(params, profile) == max(15, int(np.ceil(profile.gpu_fixed_seconds + 4 * 3 * per_1024)))
    for profile in (FLUX_SCHNELL_PROFILE, FLUX_DEV_PROFILE):
        zero = api.Limits.from_env({"SPACES_ZERO_GPU": "true"}, profile.zero_gpu_limits)
        assert zero.max_size == 1024 and zero.max_steps >= profile.defaults["steps"]
        worst = service.gpu_duration(zero.max_steps, zero.max_concepts, 1024, 1024, per_image=1,
                                     per_sample=profile.gpu_seconds_per_sample, fixed=profile.gpu_fixed_seconds)
        assert worst <= 120  # an anonymous visitor's daily quota


# ------------------------------------------------------------------------------------------------
# Running (slow: a few seconds per run on a CPU)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_library_snippet_reproduces_the_app_result(schnell_folder, tmp_path, monkeypatch):
    from PIL import Image

    loaded = loading.load_pipeline(str(schnell_folder), device="cpu")
    loaded.pipe.set_progress_bar_config(disable=True)
    params = api.parse_request(loaded, {"prompt": PROMPT, "seed": 3, "steps": 3, "width": 16, "height": 16,
                                        "concepts": [{"prompt": "blue"}]}, api.Limits())
    previews = []
    result = service.generate(loaded, params, previews=True,
                              progress_callback=lambda done, total, **extra: previews.append(extra.get("preview")))
    # Live previews through FLUX's latent-to-RGB factors, at latent resolution (the tiny VAE's factor is 1).
    assert [p.size for p in previews if p is not None] == [(16, 16)] * 2
    library = snippets.library_snippet(params)
    assert "from sega import EditConcept, SegaFluxPipeline" in library and "max_sequence_length=256" in library
    assert "dtype=torch.bfloat16" in library and "scheduler" not in library and "guidance_scale" not in library
    monkeypatch.chdir(tmp_path)
    exec(compile(library, "as_code", "exec"), {})
    assert np.array_equal(np.asarray(Image.open("original.png")), np.asarray(result.original))
    assert np.array_equal(np.asarray(Image.open("edited.png")), np.asarray(result.edited))


def _env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "TQDM_DISABLE": "1"}
    for name in ("SEGA_MODEL", "SEGA_MODELS"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def flux_server(schnell_folder, dev_folder, tmp_path_factory):
    """One app start for the module: a [schnell]-like folder (the default), the demo model, a [dev]-like folder."""
    log = tmp_path_factory.mktemp("logs") / "app.log"
    args = ["app.py", *(arg for model in (schnell_folder, DEFAULT_MODEL_DIR, dev_folder) for arg in ("--model", str(model)))]
    with app_process(args, _env(), log, timeout=600) as (url, _pid):
        yield url


def test_generate_over_the_api(flux_server, schnell_folder):
    from gradio_client import Client, handle_file

    client = Client(flux_server, verbose=False)
    request = {"prompt": PROMPT, "steps": 3, "seed": 1, "width": SIZE, "height": SIZE, "api_name": "/generate"}
    original, edited, used = client.predict(concepts=[{"prompt": "blue"}], **request)
    assert pixels(original).shape == pixels(edited).shape == (SIZE, SIZE, 3)
    assert not np.array_equal(pixels(original), pixels(edited))
    assert used["model"] == str(schnell_folder) and used["guidance_scale"] is None
    assert used["concepts"][0]["warmup"] == FLUX_SCHNELL_PROFILE.concept_defaults()["warmup"]
    again_original, again_edited, _ = client.predict(concepts=[{"prompt": "blue"}], **request)
    assert np.array_equal(pixels(again_original), pixels(original))
    assert np.array_equal(pixels(again_edited), pixels(edited))
    with pytest.raises(Exception, match="takes no negative prompt"):
        client.predict(negative_prompt="blurry", **request)
    with pytest.raises(Exception, match=f"needs a Stable Diffusion or SDXL model; {schnell_folder}"):
        client.predict(image=handle_file(original), model=str(schnell_folder), api_name="/edit")


def test_the_browser_generates_with_a_concept(flux_server):
    from playwright.sync_api import expect

    with browser_page(height=1000) as page:
        page.goto(flux_server)
        expect(page.locator("#prompt textarea")).to_be_visible(timeout=60_000)
        # Only what FLUX.1-schnell uses.
        for absent in ("#guidance", "#negative-prompt", "#mask", "#scheduler"):
            expect(page.locator(absent)).to_have_count(0)
        page.locator("#prompt textarea").fill(PROMPT)
        page.locator("#concept-0-text textarea, #concept-0-text input").first.fill("blue")
        for slider, value in (("#width", SIZE), ("#height", SIZE)):
            page.locator(f"{slider} input[type=number]").fill(str(value))
            page.locator(f"{slider} input[type=number]").press("Enter")
        page.locator("#generate").click()
        for image in ("#original img", "#edited img"):
            expect(page.locator(image).first).to_be_visible(timeout=240_000)
        expect(page.locator("#summary")).to_contain_text("+'blue'", timeout=30_000)
        expect(page.locator("#summary")).to_contain_text(f"4 steps · {SIZE}×{SIZE} px")
        page.get_by_role("tab", name="Edit an image").click()
        expect(page.locator("#edit-unsupported")).to_contain_text("needs a Stable Diffusion or SDXL model")
        expect(page.locator("#edit")).to_have_count(0)


# ------------------------------------------------------------------------------------------------
# One app, several models: the [schnell]-like folder (the default), the demo model and a [dev]-like folder
# ------------------------------------------------------------------------------------------------


def test_several_models_over_the_api(flux_server, dev_folder):
    from gradio_client import Client

    client = Client(flux_server, verbose=False)
    _, _, used = client.predict(prompt=PROMPT, steps=2, seed=1, model=str(DEFAULT_MODEL_DIR), api_name="/generate")
    assert used["model"] == str(DEFAULT_MODEL_DIR) and used["width"] == 32 and used["scheduler"] == "DDIM"
    original, edited, used = client.predict(prompt=PROMPT, steps=2, seed=1, width=SIZE, height=SIZE,
                                            model=str(dev_folder), concepts=[{"prompt": "blue", "warmup": 0}],
                                            api_name="/generate")
    assert used["model"] == str(dev_folder) and used["guidance_scale"] == 3.5 and used["scheduler"] is None
    assert not np.array_equal(pixels(original), pixels(edited))


def test_the_models_switch_in_the_browser(flux_server, dev_folder):
    from playwright.sync_api import expect

    with browser_page(height=1000) as page:
        schnell_panel, demo_panel, flux_panel = model_panels(page, flux_server, 3)
        page.locator("#model").get_by_label(dev_folder.name).check()
        expect(flux_panel).to_be_visible(timeout=30_000)
        expect(schnell_panel).to_be_hidden()
        expect(demo_panel).to_be_hidden()
        # [dev] has a guidance scale, but no negative prompt; its sizes go in steps of 2 x the VAE's factor.
        expect(page.locator("#m2-guidance")).to_be_visible()
        expect(page.locator("#m2-negative-prompt")).to_have_count(0)
        assert page.locator("#m2-width input[type=range]").get_attribute("max") == str(2 * NATIVE)
        page.locator("#m2-prompt textarea").fill(PROMPT)
        page.locator("#m2-concept-0-text textarea, #m2-concept-0-text input").first.fill("blue")
        for name, value in (("steps", 2), ("width", SIZE), ("height", SIZE)):
            page.locator(f"#m2-{name} input[type=number]").fill(str(value))
            page.locator(f"#m2-{name} input[type=number]").press("Enter")
        page.locator("#m2-generate").click()
        expect(page.locator("#m2-summary")).to_contain_text(f"{SIZE}×{SIZE} px · guidance 3.5", timeout=240_000)
        expect(page.locator("#m2-summary")).to_contain_text("+'blue'")
