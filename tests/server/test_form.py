"""The browser form is built from the API's declarations: every preset, default and example value fits its
widget, for every model profile and both the default and the ZeroGPU limits, and no widget offers a value the
API refuses. Stable Diffusion's form is built from its profile and sizes, without its weights."""

from __future__ import annotations

import dataclasses

import pytest

from sega.concepts import CONCEPT_RANGES, Range
from server import form, limits
from server import params as api
from server.loading import ModelFacts
from server.profiles import DEMO_PROFILE, SD_PROFILE

MODELS = {
    "demo": ModelFacts(DEMO_PROFILE, native_size=32, min_size=8),
    "sd": ModelFacts(SD_PROFILE, native_size=512, min_size=64),
}
LIMITS = {"default": api.Limits(), "zerogpu": api.Limits(**limits.ZERO_GPU_LIMITS)}
CASES = [pytest.param(MODELS[m], LIMITS[lim], id=f"{m}-{lim}") for m in MODELS for lim in LIMITS]
ENDPOINTS = ("generate", "edit")


def api_range(model, limits, endpoint: str, name: str) -> Range:
    return next(p for p in api.ENDPOINTS[endpoint] if p.name == name).bounds(model, limits)


def within(widget: form.Widget, bounds: Range) -> bool:
    return widget.low in bounds and widget.high in bounds and (widget.low <= widget.high)


def concept_values(model, endpoint: str):
    """Every concept the form may be asked to show: each preset of the endpoint, with and without masks, and
    each example's concepts (filled from their preset, as the form fills a row)."""
    profile = model.profile
    for mask in api.MASK_MODES:
        for name in profile.presets.table(endpoint, mask):
            yield f"preset {name} (mask {mask})", profile.concept_defaults(name, endpoint, mask)
    examples = profile.examples if endpoint == "generate" else [(label, prompt, c, seed) for label, _, prompt, c, seed
                                                                 in profile.edit_examples]
    for label, _, concepts, _ in examples:
        for i, concept in enumerate(concepts):
            yield f"example {label!r} concept {i}", profile.concept_defaults(concept.get("preset"), endpoint) | concept


@pytest.mark.parametrize("model, limits", CASES)
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_every_preset_and_example_concept_fits_its_widget(model, limits, endpoint):
    widgets = form.concept_widgets(model, limits, endpoint)
    assert set(widgets) == set(CONCEPT_RANGES)
    seen = 0
    for where, concept in concept_values(model, endpoint):
        for name, widget in widgets.items():
            assert widget.fits(concept[name]), f"{where}: {name}={concept[name]} does not fit {widget}"
            seen += 1
    assert seen >= len(widgets) * len(model.profile.presets.table(endpoint))
    for name, widget in widgets.items():
        assert within(widget, CONCEPT_RANGES[name]), widget
        assert widget.fits(widget.default)


@pytest.mark.parametrize("model, limits", CASES)
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_every_setting_starts_at_its_default_and_stays_within_the_api(model, limits, endpoint):
    widgets = form.settings(model, limits, endpoint)
    numeric = {p.name for p in api.ENDPOINTS[endpoint] if p.kind in ("int", "float")}
    assert set(widgets) == numeric  # every number of the endpoint has its widget
    defaults = api.defaults(model, endpoint)
    for name, widget in widgets.items():
        assert within(widget, api_range(model, limits, endpoint, name)), widget
        assert widget.fits(widget.default), widget
        if name != "seed" and widget.default is not None:
            assert widget.default == defaults[name]
        # and the API's default fits, too (an empty optional box stands for it)
        assert name == "seed" or widget.fits(defaults[name]), (name, defaults[name], widget)


@pytest.mark.parametrize("model, limits", CASES)
def test_example_seeds_fit_the_seed_box(model, limits):
    seed = form.settings(model, limits)["seed"]
    assert all(seed.fits(s) for *_, s in model.profile.examples)
    edit_seed = form.settings(model, limits, "edit")["seed"]
    assert all(edit_seed.fits(s) for *_, s in model.profile.edit_examples)


def test_a_slider_covers_the_presets_beyond_its_declared_top():
    # The demo model's background preset pulls at 40; the scale slider's declared top is 20.
    top = form.CONCEPT_LOOKS["scale"].top(MODELS["demo"], api.Limits())
    assert DEMO_PROFILE.presets.table()["background"]["scale"] > top
    assert form.concept_widgets(MODELS["demo"], api.Limits())["scale"].high == max(
        p["scale"] for table in DEMO_PROFILE.presets.tables() for p in table.values())  # with masks, too
    assert form.concept_widgets(MODELS["sd"], api.Limits())["scale"].high == top  # SD's presets fit under it


def test_the_limits_narrow_the_form_as_they_narrow_the_api():
    small = api.Limits(max_steps=12, max_size=40)
    widgets = form.settings(MODELS["demo"], small)
    assert widgets["steps"].high == 12 and widgets["width"].high == widgets["height"].high == 40
    assert form.concept_widgets(MODELS["demo"], small)["warmup"].high == max(
        12, *(p["warmup"] for p in DEMO_PROFILE.presets.table().values()))


def test_an_open_top_ends_one_step_below_it():
    widgets = form.settings(MODELS["sd"], api.Limits(), "edit")
    assert widgets["skip"].high == pytest.approx(0.95) and 0.95 in api_range(MODELS["sd"], api.Limits(), "edit", "skip")
    assert form.concept_widgets(MODELS["sd"], api.Limits())["threshold"].high == pytest.approx(0.995)


def test_fits_checks_range_and_step():
    widget = form.Widget("scale", 0.0, 20.0, 0.1, 5.0, "Edit scale")
    assert widget.fits(5.4) and widget.fits(0) and widget.fits(20) and widget.fits(None)
    assert not widget.fits(20.1) and not widget.fits(-0.1) and not widget.fits(5.45) and not widget.fits(True)
    sized = dataclasses.replace(widget, low=8, high=64, step=8)
    assert sized.fits(32) and not sized.fits(36)


def test_the_loaded_demo_model_gives_the_same_form_as_its_facts():
    from sega.demo.shapes import DEFAULT_MODEL_DIR
    from server.loading import load_pipeline

    loaded = load_pipeline(str(DEFAULT_MODEL_DIR))
    assert loaded.facts == dataclasses.replace(MODELS["demo"], model_id=loaded.model_id)
    assert form.settings(loaded, api.Limits()) == form.settings(MODELS["demo"], api.Limits())
