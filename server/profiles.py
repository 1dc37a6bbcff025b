"""What the app serves for each kind of model: presets and defaults (to become one model profile)."""

from __future__ import annotations

from sega.demo.presets import DEMO_DEFAULTS, DEMO_PRESETS
from sega.presets import SD_DEFAULTS, SD_PRESETS


def presets_for(is_demo: bool) -> dict[str, dict]:
    """The preset table for the demo model or for Stable Diffusion checkpoints."""
    return DEMO_PRESETS if is_demo else SD_PRESETS


def defaults_for(is_demo: bool) -> dict:
    """Generation defaults (steps, guidance scale, momentum) for the demo model or SD checkpoints."""
    return DEMO_DEFAULTS if is_demo else SD_DEFAULTS
