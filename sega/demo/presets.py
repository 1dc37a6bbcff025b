"""Per-concept presets (all four tables: :class:`sega.presets.PresetTables`) and generation defaults for the
bundled shapes model."""

from __future__ import annotations

from sega.presets import PresetTables, preset_table

# The bundled shapes model: chosen by the sweep in its model card (assets/shapes-model/README.md).
DEMO_PRESETS: dict[str, dict] = preset_table(
    color=(10.0, 0.8, 10), background=(40.0, 0.0, 0), shape=(15.0, 0.5, 2), size=(10.0, 0.5, 2),
    removal=(30.0, 0.5, 5), custom=(10.0, 0.5, 8),
)
# With an implicit mask (LEDITS++) the threshold is the share of the concept's mask left out, not SEGA's
# per-channel share: presets of their own, chosen by ``python -m sega.demo sweep --mask intersect`` on tuning seeds
# (the model card's "Implicit masks" section).
DEMO_MASK_PRESETS: dict[str, dict] = preset_table(
    color=(10.0, 0.1, 10), background=(40.0, 0.2, 0), shape=(15.0, 0.2, 0), size=(10.0, 0.2, 2),
    removal=(30.0, 0.2, 5), custom=(10.0, 0.3, 8),
)
# Per-concept presets for uploaded images, chosen by sweep_real on tuning images 0-5 (colour, shape, background;
# the model card has the table); the inverted image keeps its layout, so colour and shape start late.
DEMO_EDIT_PRESETS: dict[str, dict] = preset_table(
    color=(5.0, 0.7, 10), background=(30.0, 0.5, 0), shape=(7.5, 0.3, 10), size=(7.5, 0.5, 6),
    custom=(7.5, 0.5, 6),
)
# The same with an implicit mask (LEDITS++; the threshold is the share of the mask left out), chosen by
# ``python -m sega.demo sweep --real --mask intersect`` on tuning images 0-7 (the model card has the table); size
# and custom were not swept and take the values colour and shape both chose.
DEMO_EDIT_MASK_PRESETS: dict[str, dict] = preset_table(
    color=(5.0, 0.2, 8), background=(50.0, 0.3, 0), shape=(5.0, 0.2, 8), size=(5.0, 0.2, 8),
    custom=(5.0, 0.2, 8),
)


DEMO_PRESET_TABLES = PresetTables(DEMO_PRESETS, edit=DEMO_EDIT_PRESETS, masked_generate=DEMO_MASK_PRESETS,
                                  masked_edit=DEMO_EDIT_MASK_PRESETS)
DEMO_DEFAULTS: dict = {"steps": 25, "guidance_scale": 5.0, "momentum_scale": 0.3, "momentum_beta": 0.6,
                       "default_preset": "color", "mask": "none"}

# The app's examples on this model, one per kind of edit, written as SEGA users write them (add the new value,
# remove the old one; removal is one reverse concept): (label, prompt, concepts as the API takes them, seed).
DEMO_EXAMPLES: list[tuple[str, str, list[dict], int]] = [
    ("colour: red → blue", "a large red circle on a white background",
     [{"prompt": "blue", "preset": "color"}, {"prompt": "red", "reverse": True, "preset": "color"}], 1),
    ("background: white → black", "a large green square on a white background",
     [{"prompt": "black background", "preset": "background"},
      {"prompt": "white background", "reverse": True, "preset": "background"}], 2),
    ("shape: square → circle", "a large yellow square on a black background",
     [{"prompt": "circle", "preset": "shape"}, {"prompt": "square", "reverse": True, "preset": "shape"}], 3),
    ("removal: no more blue", "a large blue square on a white background",
     [{"prompt": "blue", "reverse": True, "preset": "removal"}], 4),
    ("size: small → large", "a small red triangle on a white background",
     [{"prompt": "large", "preset": "size"}, {"prompt": "small", "reverse": True, "preset": "size"}], 5),
    ("colour swap + background: red → blue, white → black", "a small red square on a white background",
     [{"prompt": "blue", "preset": "color"}, {"prompt": "red", "reverse": True, "preset": "color"},
      {"prompt": "black background", "preset": "background"}], 6),
]
