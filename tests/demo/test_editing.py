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


def test_the_edit_tabs_examples_do_what_their_labels_say():
    import torch

    from sega import EditConcept, SegaPipeline
    from sega.demo.editing import DEMO_EDIT_DEFAULTS, DEMO_EDIT_EXAMPLES, edit_upload
    from sega.demo.presets import DEMO_PRESET_TABLES
    from sega.demo.shapes import DEFAULT_MODEL_DIR
    from sega.images import load_image

    pipe = SegaPipeline.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    # as the app fills the rows: the default mask
    presets = DEMO_PRESET_TABLES.table("edit", DEMO_EDIT_DEFAULTS["mask"])
    for label, path, _source, concepts, seed in DEMO_EDIT_EXAMPLES:
        image, _ = load_image(path, 32)
        edits = [EditConcept(c["prompt"], reverse=c.get("reverse", False), **presets[c["preset"]])
                 for c in concepts]
        reconstruction, edited = edit_upload(pipe, image, edits, seed, dict(DEMO_EDIT_DEFAULTS))
        before, after = describe(reconstruction).attributes(), describe(edited).attributes()
        kind = concepts[0]["preset"]
        # The added concept's word is the new value of its attribute; nothing else changes.
        assert after == {**before, {"color": "color", "shape": "shape"}[kind]: concepts[0]["prompt"]}, label
