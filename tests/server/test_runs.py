"""A run as the app follows it, on tiny random components: /edit's progress (inversion steps, then the
denoising steps that skip leaves), a stop during the inversion and live previews
(server/gpu.py, server/service.py)."""


import numpy as np
import pytest
from PIL import Image

from sega.pipeline import SegaPipeline
from server import gpu, loading, service
from server import params as api
from server.profiles import SD_PROFILE, profile_for
from tests.server.test_gpu import counting_generate
from tests.tiny import tiny_components

LIMITS = api.Limits(max_steps=200)


@pytest.fixture(scope="module")
def tiny() -> loading.LoadedModel:
    pipe = SegaPipeline(**tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return loading.LoadedModel(pipe=pipe, model_id="tiny", profile=profile_for(pipe), fallback_reason=None,
                               device="cpu")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    folder = tmp_path_factory.mktemp("upload")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / "a.png")
    return folder / "a.png"


def edit(loaded, image, **raw):
    raw = {"image": str(image), "seed": 1, "concepts": [{"prompt": "blue", "warmup": 0}], **raw}
    return api.parse_request(loaded, raw, LIMITS, "edit", upload_roots=(str(image.parent),))


def test_edit_progress_counts_the_inversion_and_the_steps_that_skip_leaves(tiny, image):
    tiny.pipe.inversion_cache.clear()
    params = edit(tiny, image, steps=10, skip=0.2)  # 8 steps are run: 8 inversion steps, then 8 denoising steps
    items = list(gpu.denoise(tiny, params))
    steps, result = items[:-1], items[-1]
    assert [(s.done, s.total) for s in steps] == [(k, 16) for k in range(1, 17)]
    assert [s.stage for s in steps] == ["inversion"] * 8 + ["denoising"] * 8
    assert isinstance(result, service.GenerationResult) and not result.inversion_reused
    # Again: the inversion comes from the cache, so only the 8 denoising steps are run and counted.
    again = list(gpu.denoise(tiny, edit(tiny, image, steps=10, skip=0.2, concepts=[{"prompt": "square"}])))
    assert [(s.done, s.total, s.stage) for s in again[:-1]] == [(k, 8, "denoising") for k in range(1, 9)]
    assert again[-1].inversion_reused


def test_a_stop_during_the_inversion_ends_it_within_two_steps(tiny, image, monkeypatch):
    tiny.pipe.inversion_cache.clear()
    done = counting_generate(monkeypatch)
    stop = gpu.StopSignal()
    items = []
    for item in gpu.denoise(tiny, edit(tiny, image, steps=100, skip=0.0, seed=7), stop):
        items.append(item)
        if item == gpu.Step(2, 200, "inversion"):
            stop.set()
    # the library counts the inversion's own steps
    assert items[-1] in (gpu.Stopped("Stopped during the inversion, after 2 of 100 steps."),
                         gpu.Stopped("Stopped during the inversion, after 3 of 100 steps."))
    assert max(done) <= 3 and len(tiny.pipe.inversion_cache) == 0  # nothing of the stopped inversion kept


@pytest.mark.parametrize("profile", ["demo", "sd"])
def test_previews_come_every_few_steps_and_approach_the_image_with_edits(tiny, profile):
    loaded = tiny if profile == "demo" else loading.LoadedModel(
        pipe=tiny.pipe, model_id="tiny", profile=SD_PROFILE, fallback_reason=None, device="cpu")
    params = api.parse_request(loaded, {"prompt": "a red circle", "seed": 3, "steps": 20,
                                        "concepts": [{"prompt": "blue", "warmup": 2}]}, LIMITS)
    items = list(gpu.denoise(loaded, params, previews=True))
    result = items[-1]
    previews = {s.done: s.preview for s in items[:-1] if s.preview is not None}
    assert sorted(previews) == list(range(2, 20, service.preview_interval(20)))  # every 2nd step but the last
    side = 16 // tiny.pipe.vae_scale_factor  # the latent-to-RGB map: a picture at latent resolution
    assert {p.size for p in previews.values()} == {(side, side)}
    # Without previews the same request gives the same images, and no step carries one.
    plain = list(gpu.denoise(loaded, params))
    assert all(s.preview is None for s in plain[:-1])
    assert np.array_equal(np.asarray(plain[-1].edited), np.asarray(result.edited))
