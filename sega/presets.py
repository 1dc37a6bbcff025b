"""Per-concept presets (scale, threshold, warmup) and generation defaults, per kind of model."""

from __future__ import annotations

# Stable Diffusion: the authors' published values (SD 1.5, 50 steps; see ../shared/SEGA.md).
SD_PRESETS: dict[str, dict] = {
    "object": {"scale": 5.0, "threshold": 0.95, "warmup": 10},
    "style": {"scale": 7.0, "threshold": 0.9, "warmup": 5},
    "face": {"scale": 5.0, "threshold": 0.975, "warmup": 10},
    "custom": {"scale": 5.0, "threshold": 0.95, "warmup": 10},
}
SD_DEFAULTS: dict = {"steps": 50, "guidance_scale": 7.0, "momentum_scale": 0.3, "momentum_beta": 0.6,
                     "default_preset": "face"}

# The bundled shapes model: chosen by the sweep in its model card (assets/shapes-model/README.md).
DEMO_PRESETS: dict[str, dict] = {
    "color": {"scale": 10.0, "threshold": 0.5, "warmup": 8},
    "background": {"scale": 20.0, "threshold": 0.5, "warmup": 2},
    "shape": {"scale": 10.0, "threshold": 0.5, "warmup": 2},
    "size": {"scale": 10.0, "threshold": 0.5, "warmup": 2},
    "custom": {"scale": 10.0, "threshold": 0.5, "warmup": 8},
}
DEMO_DEFAULTS: dict = {"steps": 25, "guidance_scale": 5.0, "momentum_scale": 0.3, "momentum_beta": 0.6,
                       "default_preset": "color"}


def presets_for(is_demo: bool) -> dict[str, dict]:
    """The preset table for the demo model or for Stable Diffusion checkpoints."""
    return DEMO_PRESETS if is_demo else SD_PRESETS


def defaults_for(is_demo: bool) -> dict:
    """Generation defaults (steps, guidance scale, momentum) for the demo model or SD checkpoints."""
    return DEMO_DEFAULTS if is_demo else SD_DEFAULTS
