"""The app in-process on the demo model, called through its public API with gradio_client."""

import json

import httpx
import numpy as np
import pytest

from tests.served import pixels

pytestmark = pytest.mark.slow

STEPS = 10
PROMPT = "a large red circle on a white background"


def generate(client, **kwargs):
    original, edited, used = client.predict(api_name="/generate", **{"prompt": PROMPT, "steps": STEPS, **kwargs})
    return pixels(original), pixels(edited), used


def test_the_api_lists_two_endpoints_with_named_parameters(client, app_module):
    info = client.view_api(return_format="dict", print_info=False)
    assert list(info["named_endpoints"]) == ["/generate", "/edit"] and not info["unnamed_endpoints"]
    edit = info["named_endpoints"]["/edit"]["parameters"]
    assert [p["parameter_name"] for p in edit] == ["image", "source_prompt", "concepts", "seed", "steps", "skip",
                                                   "source_guidance_scale", "guidance_scale", "momentum_scale",
                                                   "momentum_beta", "mask", "model"]
    assert [p["parameter_name"] for p in edit if not p["parameter_has_default"]] == ["image"]
    params = info["named_endpoints"]["/generate"]["parameters"]
    assert [p["parameter_name"] for p in params] == ["prompt", "concepts", "seed", "steps", "guidance_scale",
                                                     "negative_prompt", "width", "height", "momentum_scale",
                                                     "momentum_beta", "scheduler", "mask", "model"]
    required = [p["parameter_name"] for p in params if not p["parameter_has_default"]]
    assert required == ["prompt"]
    defaults = {p["parameter_name"]: p["parameter_default"] for p in params}
    assert defaults["steps"] == app_module.DEFAULTS["steps"] and defaults["width"] == app_module.LOADED.native_size
    assert defaults["model"] == app_module.LOADED.model_id  # one model served: its id is the default
    assert len(info["named_endpoints"]["/generate"]["returns"]) == 3


def test_edit_differs_and_the_same_seed_gives_the_same_pair(client):
    # The colour preset starts at step 10 (of the demo's 25); this test runs 10 steps, so it starts earlier.
    concepts = [{"prompt": "blue", "preset": "color", "warmup": 2}]
    original, edited, used = generate(client, concepts=concepts, seed=42)
    assert original.shape == edited.shape == (32, 32, 3)
    assert np.abs(original.astype(int) - edited.astype(int)).mean() > 1.0
    assert used["seed"] == 42 and used["steps"] == STEPS
    assert used["concepts"][0]["prompt"] == "blue" and {"scale", "threshold", "warmup", "cooldown", "reverse",
                                                          "weight"} <= set(used["concepts"][0])
    original2, edited2, used2 = generate(client, concepts=concepts, seed=42)
    # The app computes every pair in one pass: the same answer, pixel for pixel.
    assert np.array_equal(original, original2)
    assert np.array_equal(edited, edited2)
    assert {k: v for k, v in used2.items() if k != "summary"} == {k: v for k, v in used.items() if k != "summary"}
    assert not used["cache_hit"] and not used2["cache_hit"]

    # Only the concepts change: the same image without edits (to float round-off in other batches: a PNG
    # pixel may move by one level), another edit.
    original3, edited3, _ = generate(client, concepts=[{"prompt": "black background", "preset": "background"}],
                                     seed=42)
    assert np.abs(original.astype(int) - original3.astype(int)).max() <= 1
    assert not np.array_equal(edited, edited3)


def test_the_scheduler_is_an_api_parameter(client):
    _, _, euler = generate(client, seed=4, scheduler="Euler", concepts=[{"prompt": "blue"}])
    _, _, ddim = generate(client, seed=4, concepts=[{"prompt": "blue"}])
    assert euler["scheduler"] == "Euler" and ddim["scheduler"] == "DDIM"


def test_masks_come_back_in_the_json_one_per_concept(client):
    from server.images import mask_from_data_url

    swap = [{"prompt": "blue", "preset": "color", "warmup": 2}, {"prompt": "red", "reverse": True, "preset": "color",
                                                                  "warmup": 2}]
    original, edited, used = generate(client, concepts=swap, seed=8, mask="intersect")
    assert used["mask"] == "intersect"
    assert [(m["concept"], m["reverse"]) for m in used["masks"]] == [("blue", False), ("red", True)]
    for m in used["masks"]:
        mask = mask_from_data_url(m["mask"])
        assert mask.shape == (16, 16)  # the latent's size (32 px images, a 2x VAE)
        assert 0 < mask.mean() < 1 and mask.max() > 0.5  # where the concept edited, not everywhere
    # The same seed without masks: the same image without edits, another edit, no masks.
    original2, edited2, plain = generate(client, concepts=swap, seed=8, mask="none")
    assert np.array_equal(original, original2) and not np.array_equal(edited, edited2)
    assert plain["mask"] == "none" and plain["masks"] == []


def test_no_concepts_and_no_seed(client):
    original, edited, used = generate(client, concepts=[])
    assert np.array_equal(original, edited)
    assert used["concepts"] == [] and isinstance(used["seed"], int)
    # The reported seed reproduces the pair.
    original2, _, _ = generate(client, concepts=[], seed=used["seed"])
    assert np.array_equal(original, original2)


def test_a_long_prompt_is_truncated_with_a_notice(client):
    _, _, used = generate(client, prompt=PROMPT + " and a blue square" * 4, steps=2)
    assert any("token limit" in n for n in used["notices"])


@pytest.mark.parametrize("kwargs, field", [
    ({"steps": 0}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"width": 36}, "width"),
    ({"height": 4096}, "height"),
    ({"seed": -1}, "seed"),
    ({"guidance_scale": 1e9}, "guidance_scale"),
    ({"momentum_beta": 1}, "momentum_beta"),
    ({"concepts": "blue"}, "concepts"),
    ({"concepts": {"prompt": "blue"}}, "concepts"),
    ({"concepts": [{"prompt": "blue"}] * 7}, "concepts"),
    ({"concepts": [{"prompt": ""}]}, "concepts[0].prompt"),
    ({"concepts": [{"prompt": "blue", "strength": 3}]}, "concepts[0]"),
    ({"concepts": [{"prompt": "blue", "scale": "big"}]}, "concepts[0].scale"),
    ({"prompt": "\n\t"}, "prompt"),
    ({"scheduler": "PNDM"}, "scheduler"),
    ({"steps": 1001}, "steps"),
    ({"mask": "everywhere"}, "mask"),
])
def test_invalid_input_gets_an_error_naming_the_field(client, kwargs, field):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        client.predict(api_name="/generate", **{"prompt": PROMPT, "steps": 2, **kwargs})
    assert str(info.value).startswith(field)


def test_nan_over_raw_http_is_rejected_and_the_app_keeps_serving(server, client):
    # gradio_client refuses to send NaN; a hand-written request can.
    body = '{"data": ["a red circle", [], 1, NaN, null, "", null, null, null, null, null, null, null]}'
    r = httpx.post(f"{server}gradio_api/call/generate", content=body, headers={"content-type": "application/json"})
    event_id = r.json()["event_id"]
    stream = httpx.get(f"{server}gradio_api/call/generate/{event_id}", timeout=60).text
    assert "event: error" in stream
    error = json.loads(stream.split("data:", 1)[1].strip().splitlines()[0])
    assert error["error"].startswith("steps must be an integer in [1, ") and error["error"].endswith("got nan")
    original, edited, _ = generate(client, steps=2, seed=1)
    assert original.shape == (32, 32, 3)


def test_a_failure_inside_one_generation_reaches_only_that_request(client, app_module, monkeypatch):
    from gradio_client.exceptions import AppError

    real = app_module.run_on_gpu

    def fail_once(params, stop=None, previews=False):
        monkeypatch.setattr(app_module, "run_on_gpu", real)
        raise RuntimeError("injected fault")

    monkeypatch.setattr(app_module, "run_on_gpu", fail_once)
    with pytest.raises(AppError, match=r"Generation failed \(RuntimeError\)"):
        generate(client, steps=2, seed=1)
    original, _, used = generate(client, steps=2, seed=1)
    assert original.shape == (32, 32, 3) and used["seed"] == 1


def test_the_form_is_built_from_the_declarations(app_module):
    """Every numeric widget of both tabs has the range, step and starting value server/form.py derives from the
    API's declarations (tests/server/test_form.py checks those against every preset and example)."""
    from server import form

    (panel,) = app_module.PANELS  # one model served: one panel
    limits = app_module.LIMITS[panel.model_id]
    numeric = lambda widgets: {name: w for name, w in widgets.items() if name not in (  # noqa: E731
        "negative_prompt", "scheduler", "mask", "source_prompt")}
    specs = {
        "generate": (form.settings(panel.loaded, limits), {"seed": panel.seed, **numeric(panel.settings)}),
        "edit": (form.settings(panel.loaded, limits, "edit"), {"seed": panel.edit_seed, **numeric(panel.edit_settings)}),
    }
    pairs = []
    for widgets, components in specs.values():
        assert set(components) == set(widgets)  # every numeric parameter of the endpoint is on the form
        pairs += [(components[name], widgets[name]) for name in widgets]
    for rows, endpoint in ((panel.concept_rows, "generate"), (panel.edit_rows, "edit")):
        widgets = form.concept_widgets(panel.loaded, limits, endpoint)
        for row in rows.rows:
            pairs += [(getattr(row, name), widget) for name, widget in widgets.items()]
    assert len(pairs) == 14 + 5 * 2 * limits.max_concepts
    for component, spec in pairs:
        assert (component.minimum, component.maximum, component.step) == (spec.low, spec.high, spec.step), spec
        assert component.value == spec.default and component.label == spec.label and component.info == spec.info
    assert "LESS" in panel.concept_rows.rows[0].threshold.info  # the direction of the threshold is explained
