"""Editing real images with the demo model: uploads drawn by the renderer (never by the model), and the
settings the app uses for them.

The "Edit an image" tab's examples are PNG files in ``assets/edit-examples``, written by
:func:`write_example_images` from :data:`EXAMPLE_IMAGES` (128 px, so the app's resize to 32 px is exercised).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image

from .shapes import DEFAULT_MODEL_DIR, ShapeSpec, render

EXAMPLES_DIR = DEFAULT_MODEL_DIR.parent / "edit-examples"
UPLOAD_RESOLUTION = 128

# file name -> (what it shows, the renderer's seed for its position and size)
EXAMPLE_IMAGES: dict[str, tuple[ShapeSpec, int]] = {
    "red-circle.png": (ShapeSpec("large", "red", "circle", "white"), 3),
    "blue-square-on-black.png": (ShapeSpec("large", "blue", "square", "black"), 5),
    "yellow-triangle.png": (ShapeSpec("small", "yellow", "triangle", "white"), 7),
}

# /edit's defaults on the demo model: 25 steps as for generation, a fifth of them skipped (keeps the layout).
DEMO_EDIT_DEFAULTS: dict = {"steps": 25, "skip": 0.2, "guidance_scale": 5.0, "source_guidance_scale": 0.0}

# (label, image path, source prompt, concepts as the API takes them, seed)
DEMO_EDIT_EXAMPLES: list[tuple[str, str, str, list[dict], int]] = [
    ("colour: red → blue", str(EXAMPLES_DIR / "red-circle.png"), "",
     [{"prompt": "blue", "preset": "color"}, {"prompt": "red", "reverse": True, "preset": "color"}], 1),
    ("background: black → white", str(EXAMPLES_DIR / "blue-square-on-black.png"), "",
     [{"prompt": "white background", "preset": "background"},
      {"prompt": "black background", "reverse": True, "preset": "background"}], 2),
    ("colour: yellow → green", str(EXAMPLES_DIR / "yellow-triangle.png"), "",
     [{"prompt": "green", "preset": "color"}, {"prompt": "yellow", "reverse": True, "preset": "color"}], 3),
]


def upload_image(spec: ShapeSpec, seed: int, resolution: int = UPLOAD_RESOLUTION) -> PIL.Image.Image:
    """An image a visitor could upload: ``spec`` drawn by the renderer at ``resolution`` px."""
    return PIL.Image.fromarray(render(spec, np.random.default_rng(seed), resolution=resolution, supersample=2))


def write_example_images(folder: str | Path = EXAMPLES_DIR) -> list[Path]:
    """(Re)write the example uploads; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (spec, seed) in EXAMPLE_IMAGES.items():
        upload_image(spec, seed).save(folder / name, optimize=True)
        paths.append(folder / name)
    return paths
