"""Per-concept presets and generation defaults for the bundled shapes model."""

from __future__ import annotations

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
