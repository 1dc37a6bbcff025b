"""Per-concept presets (scale, threshold, warmup) and generation defaults for Stable Diffusion 1.x/2.x.

The values are the SEGA authors' published ones (Brack et al., arXiv 2301.12247, SD 1.5, 50 steps):
edit scale 3 to 10 (their examples 4 to 5.4), threshold 0.9 to 0.99, warmup 5 to 10 steps, momentum scale 0.3
and beta 0.6, guidance scale 7. The bundled demo model has its own, in :mod:`sega.demo.presets`.
"""

from __future__ import annotations

SD_PRESETS: dict[str, dict] = {
    "object": {"scale": 5.0, "threshold": 0.95, "warmup": 10},
    "style": {"scale": 7.0, "threshold": 0.9, "warmup": 5},
    "face": {"scale": 5.0, "threshold": 0.975, "warmup": 10},
    "custom": {"scale": 5.0, "threshold": 0.95, "warmup": 10},
}
SD_DEFAULTS: dict = {"steps": 50, "guidance_scale": 7.0, "momentum_scale": 0.3, "momentum_beta": 0.6,
                     "default_preset": "face", "mask": "none"}

# Stable Diffusion XL. Generation: the SEGA authors publish no SDXL numbers, so the presets are the SD ones
# above (the same guidance ranges), at StableDiffusionXLPipeline's default guidance scale 5.0. Uploaded images:
# LEDITS++'s SDXL defaults and example (diffusers' LEditsPPPipelineStableDiffusionXL: edit_guidance_scale 5,
# edit_threshold 0.9, warmup 0; its example adds "tomato" at scale 10, threshold 0.85 and removes "tennis ball"
# at 5, 0.9, after inverting with skip 0.2 and source guidance 3.5).
SDXL_PRESETS: dict[str, dict] = {name: dict(values) for name, values in SD_PRESETS.items()}
SDXL_EDIT_PRESETS: dict[str, dict] = {
    "object": {"scale": 10.0, "threshold": 0.85, "warmup": 0},
    "style": {"scale": 5.0, "threshold": 0.9, "warmup": 0},
    "face": {"scale": 5.0, "threshold": 0.9, "warmup": 0},
    "custom": {"scale": 5.0, "threshold": 0.9, "warmup": 0},
}
SDXL_DEFAULTS: dict = {"steps": 50, "guidance_scale": 5.0, "momentum_scale": 0.3, "momentum_beta": 0.6,
                       "default_preset": "face", "mask": "none"}
SDXL_EDIT_DEFAULTS: dict = {"steps": 50, "skip": 0.2, "source_guidance_scale": 3.5, "mask": "none"}
