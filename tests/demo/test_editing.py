"""The demo model's uploads for the "Edit an image" tab: drawn by the renderer, never by the model."""

import numpy as np
import PIL.Image

from sega.demo.editing import EXAMPLE_IMAGES, EXAMPLES_DIR, upload_image
from sega.demo.shapes import describe


def test_the_committed_example_uploads_are_the_renderers_drawings():
    for name, (spec, seed) in EXAMPLE_IMAGES.items():
        committed = np.asarray(PIL.Image.open(EXAMPLES_DIR / name).convert("RGB"))
        assert np.array_equal(committed, np.asarray(upload_image(spec, seed))), name
        assert describe(committed).attributes() == vars(spec), name
