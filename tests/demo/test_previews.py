"""The demo model's live previews: a latent-to-RGB map fitted to its VAE, which shows where a run is going."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL

from sega.demo.previews import DEMO_LATENT_RGB_BIAS, DEMO_LATENT_RGB_FACTORS, fit_latent_rgb, map_error
from sega.demo.shapes import DEFAULT_MODEL_DIR
from sega.previews import SD15_LATENT_RGB_FACTORS
from server import gpu, loading
from server import params as api


def test_the_demo_factors_are_a_least_squares_fit_of_its_vae():
    vae = AutoencoderKL.from_pretrained(DEFAULT_MODEL_DIR / "vae").eval()
    refit = fit_latent_rgb(vae, images=200, seed=5)
    ours, best = map_error(vae, DEMO_LATENT_RGB_FACTORS, DEMO_LATENT_RGB_BIAS), map_error(vae, *refit)
    assert ours[0] <= 1.03 * best[0]  # as good as a fresh fit on other images
    assert ours[0] < 0.6 * ours[1]  # it explains most of the colours' spread...
    assert ours[0] < 0.5 * map_error(vae, SD15_LATENT_RGB_FACTORS, torch.zeros(3))[0]  # ...which SD's map does not


def test_the_demo_models_previews_approach_the_image_with_edits():
    loaded = loading.load_pipeline(str(DEFAULT_MODEL_DIR), device="cpu")
    loaded.pipe.set_progress_bar_config(disable=True)
    params = api.parse_request(loaded, {"prompt": "a large red circle on a white background", "seed": 3,
                                        "steps": 20, "concepts": [{"prompt": "blue", "preset": "color"}]})
    *steps, result = gpu.denoise(loaded, params, previews=True)
    previews = {s.done: np.asarray(s.preview, dtype=float) for s in steps if s.preview is not None}
    # The final image at the previews' resolution (the latent's, 16 px for the 32 px image).
    final = np.asarray(result.edited.resize((16, 16), resample=4), dtype=float)
    first, last = (np.abs(previews[k] - final).mean() for k in (min(previews), max(previews)))
    # Of 255: the map's own error (RMS 0.4 of [-1, 1], about 50) bounds how close a preview can get.
    assert last < 0.8 * first and last < 45
