"""/edit: editing an uploaded image through the public API (gradio_client, in-process app on the demo model)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sega.demo.editing import EXAMPLE_IMAGES, EXAMPLES_DIR
from sega.demo.shapes import describe
from server import params as api
from server import snippets
from tests.served import pixels

pytestmark = pytest.mark.slow

STEPS = 10
RED_CIRCLE = EXAMPLES_DIR / "red-circle.png"
SWAP = [{"prompt": "blue", "preset": "color", "warmup": 2}, {"prompt": "red", "reverse": True, "preset": "color", "warmup": 2}]


def edit(client, path, **kwargs):
    from gradio_client import handle_file

    reconstruction, edited, used = client.predict(image=handle_file(str(path)), api_name="/edit",
                                                  **{"steps": STEPS, **kwargs})
    return pixels(reconstruction), pixels(edited), used


def test_an_uploaded_image_is_reconstructed_and_edited(client):
    reconstruction, edited, used = edit(client, RED_CIRCLE, concepts=SWAP, seed=3)
    assert reconstruction.shape == edited.shape == (32, 32, 3)
    spec, _ = EXAMPLE_IMAGES["red-circle.png"]
    assert describe(reconstruction).attributes() == vars(spec)  # the reconstruction is the input
    assert np.abs(reconstruction.astype(int) - edited.astype(int)).mean() > 1.0
    assert used["image"]["name"] == "red-circle.png" and (used["image"]["width"], used["image"]["height"]) == (32, 32)
    assert used["seed"] == 3 and used["steps"] == STEPS and used["guidance_scale"] == used["source_guidance_scale"]
    assert any("resized from 128×128 to 32×32" in n for n in used["notices"])
    assert not used["cache_hit"]


def test_an_edit_with_masks_returns_them(client):
    from server.images import mask_from_data_url

    reconstruction, edited, used = edit(client, RED_CIRCLE, concepts=SWAP, seed=3, mask="cross-attention")
    assert used["mask"] == "cross-attention" and [m["concept"] for m in used["masks"]] == ["blue", "red"]
    masks = [mask_from_data_url(m["mask"]) for m in used["masks"]]
    # A cross-attention mask is made of 4x4 cells (the map at a quarter of the 16x16 latent, upsampled).
    for mask in masks:
        cells = mask.reshape(4, 4, 4, 4)
        assert np.array_equal(cells.min(axis=(1, 3)), cells.max(axis=(1, 3))) and 0 < mask.mean() < 1
    assert np.abs(reconstruction.astype(int) - edited.astype(int)).mean() > 1.0


def test_a_second_edit_of_the_same_image_reuses_its_inversion(client):
    first_reconstruction, _, first = edit(client, RED_CIRCLE, concepts=SWAP, seed=11)
    reconstruction, _, again = edit(client, RED_CIRCLE, concepts=[{"prompt": "square", "preset": "shape"}], seed=11)
    assert again["cache_hit"] and not first["cache_hit"]
    assert np.array_equal(reconstruction, first_reconstruction)


def test_the_same_edit_gives_the_same_answer_whatever_ran_before(client):
    """Bit-identical images and the same parameters for one request, first (its inversion computed) and again
    after other requests on the same server: another image, the same image with other concepts, a
    /generate (its inversion then comes from the cache, which must not change the answer)."""
    request = {"concepts": SWAP, "seed": 13, "momentum_scale": 0.3}
    reconstruction, edited, used = edit(client, RED_CIRCLE, **request)
    edit(client, EXAMPLES_DIR / "yellow-triangle.png", concepts=[{"prompt": "blue"}], seed=13)
    edit(client, RED_CIRCLE, concepts=[{"prompt": "square", "preset": "shape"}], seed=13)
    client.predict(prompt="a small blue square on a black background", concepts=[{"prompt": "red"}], seed=13,
                   steps=STEPS, api_name="/generate")
    reconstruction_again, edited_again, used_again = edit(client, RED_CIRCLE, **request)
    assert np.array_equal(reconstruction, reconstruction_again) and np.array_equal(edited, edited_again)
    assert np.abs(reconstruction.astype(int) - edited.astype(int)).mean() > 1.0  # the edit did something
    volatile = ("summary", "cache_hit")  # the time taken; whether the inversion was reused
    assert {k: v for k, v in used.items() if k not in volatile} == \
        {k: v for k, v in used_again.items() if k not in volatile}


def test_the_library_snippet_reproduces_an_edit(client, app_module, tmp_path, monkeypatch):
    reconstruction, edited, used = edit(client, RED_CIRCLE, concepts=SWAP, seed=5)
    raw = {k: used[k] for k in api.API_PARAMS if k in used} | {"image": str(RED_CIRCLE)}
    params = api.parse_request(app_module.LOADED, {**{p.name: used.get(p.name) for p in api.EDIT_PARAMS}, **raw},
                               app_module.LIMITS, "edit", upload_roots=(str(EXAMPLES_DIR),))
    client_code, library = snippets.as_code(params)
    assert 'api_name="/edit"' in client_code and "handle_file('red-circle.png')" in client_code
    monkeypatch.chdir(tmp_path)
    Image.open(RED_CIRCLE).save(tmp_path / "red-circle.png")
    exec(compile(library, "as_code", "exec"), {})
    assert np.array_equal(pixels(tmp_path / "reconstruction.png"), reconstruction)
    assert np.array_equal(pixels(tmp_path / "edited.png"), edited)


def _bad_files(folder) -> dict:
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png, "PNG")
    files = {"notes.png": b"not an image at all", "empty.png": b"", "cut.png": png.getvalue()[:300]}
    paths = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths[name] = folder / name
    Image.new("1", (9000, 9000)).save(folder / "bomb.png")  # 81 megapixels, a few kB on disk
    paths["bomb.png"] = folder / "bomb.png"
    return paths


def test_bad_uploads_get_an_error_naming_image_and_the_server_keeps_serving(client, tmp_path):
    from gradio_client.exceptions import AppError

    for name, path in _bad_files(tmp_path).items():
        with pytest.raises(AppError) as info:
            edit(client, path)
        assert str(info.value).startswith("image"), (name, str(info.value))
    reconstruction, _, _ = edit(client, RED_CIRCLE, seed=1)
    assert reconstruction.shape == (32, 32, 3)


@pytest.mark.parametrize("kwargs, field", [
    ({"skip": 1.0}, "skip"),
    ({"source_guidance_scale": -1}, "source_guidance_scale"),
    ({"concepts": [{"prompt": "blue", "scale": "big"}]}, "concepts[0].scale"),
    ({"steps": 0}, "steps"),
])
def test_bad_values_name_their_field(client, kwargs, field):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        edit(client, RED_CIRCLE, **kwargs)
    assert str(info.value).startswith(field)
