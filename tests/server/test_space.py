"""The Space's front matter (README.md) preloads what the app serves on ZeroGPU by default, and every served
model's largest request stays within an anonymous visitor's daily GPU quota."""

from __future__ import annotations

from pathlib import Path

import yaml

from server import params as api
from server import service
from server.loading import SD_MODEL_ID, requested_models
from server.profiles import SD_PROFILE, SDXL_PROFILE

README = Path(__file__).resolve().parents[2] / "README.md"
ANONYMOUS_DAILY_SECONDS = 120  # ZeroGPU's quota for visitors who are not logged in


def front_matter() -> dict:
    _, header, _ = README.read_text().split("---\n", 2)
    return yaml.safe_load(header)


def test_the_front_matter_preloads_the_models_served_on_zerogpu():
    zero_gpu = {"SPACES_ZERO_GPU": "true"}
    served = requested_models(None, zero_gpu)
    assert served == [SD_MODEL_ID]  # the default stays SD 1.5 unless the operator says otherwise
    meta = front_matter()
    preloaded = {line.split()[0]: line.split()[1].split(",") for line in meta["preload_from_hub"]}
    for model in served:
        assert model in meta["models"] and model in preloaded
        # What SD 1.5's pipeline loads: every component's config and weights.
        for component in ("unet", "vae", "text_encoder"):
            assert f"{component}/config.json" in preloaded[model]
            assert f"{component}/diffusion_pytorch_model.safetensors" in preloaded[model] or \
                f"{component}/model.safetensors" in preloaded[model]


def test_every_models_largest_request_fits_an_anonymous_visitors_day():
    env = {"SPACES_ZERO_GPU": "true"}
    for profile in (SD_PROFILE, SDXL_PROFILE):
        limits = api.Limits.from_env(env, profile.zero_gpu_limits)
        for inversion in (False, True):
            worst = service.gpu_duration(limits.max_steps, limits.max_concepts, limits.max_size, limits.max_size,
                                         inversion=inversion, per_sample=profile.gpu_seconds_per_sample,
                                         fixed=profile.gpu_fixed_seconds)
            assert worst <= ANONYMOUS_DAILY_SECONDS, (profile.name, inversion, worst)
