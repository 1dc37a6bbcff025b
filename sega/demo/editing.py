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
DEMO_EDIT_DEFAULTS: dict = {"steps": 25, "skip": 0.2, "source_guidance_scale": 5.0, "mask": "none"}

# (label, image path, source prompt, concepts as the API takes them, seed); each one checked to work by
# tests/demo/test_editing.py. No background swap: it does not work on inverted images of this model (card).
DEMO_EDIT_EXAMPLES: list[tuple[str, str, str, list[dict], int]] = [
    ("colour: red → blue", str(EXAMPLES_DIR / "red-circle.png"), "",
     [{"prompt": "blue", "preset": "color"}, {"prompt": "red", "reverse": True, "preset": "color"}], 1),
    ("colour on black: blue → yellow", str(EXAMPLES_DIR / "blue-square-on-black.png"), "",
     [{"prompt": "yellow", "preset": "color"}, {"prompt": "blue", "reverse": True, "preset": "color"}], 2),
    ("shape: triangle → circle", str(EXAMPLES_DIR / "yellow-triangle.png"), "",
     [{"prompt": "circle", "preset": "shape"}, {"prompt": "triangle", "reverse": True, "preset": "shape"}], 3),
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


# ----------------------------------------------------------------------------------------------
# Evaluation on uploads: python -m sega.demo eval --real
# ----------------------------------------------------------------------------------------------

REAL_KINDS = ("reconstruction", "color", "background", "shape")


def real_input(seed: int) -> tuple[ShapeSpec, PIL.Image.Image]:
    """A random shape at a random position and size, drawn at upload resolution, then prepared as the app does."""
    from ..images import load_image
    from .shapes import random_spec

    rng = np.random.default_rng(seed)
    spec = random_spec(rng)
    upload = PIL.Image.fromarray(render(spec, rng, resolution=UPLOAD_RESOLUTION, supersample=2))
    image, _ = load_image(upload, 32)
    return spec, image


def real_edit_case(kind: str, spec: ShapeSpec, seed: int, settings: dict[str, dict]) -> tuple[list, str | None, str | None]:
    """(concepts, attribute that must change, its new value) for one kind of edit of an uploaded image."""
    from ..concepts import EditConcept
    from .shapes import BACKGROUNDS, COLORS, SHAPES

    if kind == "reconstruction":
        return [], None, None
    values = {"color": list(COLORS), "background": list(BACKGROUNDS), "shape": list(SHAPES)}[kind]
    old = getattr(spec, kind)
    choices = [v for v in values if v != old]
    new = choices[seed % len(choices)]
    word = (lambda v: f"{v} background") if kind == "background" else (lambda v: v)
    s = settings[kind]
    return [EditConcept(word(new), **s), EditConcept(word(old), reverse=True, **s)], kind, new


def edit_upload(pipe, image: PIL.Image.Image, concepts: list, seed: int, edit: dict) -> tuple[np.ndarray, np.ndarray]:
    """(reconstruction, edited) as uint8 arrays, through the library's inversion as the app runs it."""
    import torch

    inversion = pipe.invert(image, source_prompt="", num_inference_steps=edit["steps"], skip=edit["skip"],
                            source_guidance_scale=edit["source_guidance_scale"],
                            generator=torch.Generator().manual_seed(seed))
    from ..masks import MASK_MODES

    masks = MASK_MODES[edit.get("mask", "none")] if concepts else {}
    out = pipe("", inversion=inversion, concepts=concepts or None, **masks,
               edit_momentum_scale=edit.get("momentum_scale", 0.3), edit_mom_beta=edit.get("momentum_beta", 0.6),
               return_original=True, output_type="np")

    def to_uint8(x):
        return np.clip(np.rint(x[0] * 255), 0, 255).astype(np.uint8)

    return to_uint8(out.original_images), to_uint8(out.images)


def evaluate_real(pipe, seeds: list[int], settings: dict[str, dict], edit: dict,
                  kinds: tuple[str, ...] = REAL_KINDS) -> dict[str, dict]:
    """Per kind: success (the attribute changed as asked), kept (the other three attributes too; for the
    reconstruction both mean all four as in the input) and the mean mask IoU with the input."""
    from .shapes import describe, mask_iou

    results: dict[str, dict] = {}
    for kind in kinds:
        wins, kept, ious = [], [], []
        for seed in seeds:
            spec, image = real_input(seed)
            given = describe(np.asarray(image))
            concepts, attribute, target = real_edit_case(kind, spec, seed, settings)
            reconstruction, edited = edit_upload(pipe, image, concepts, seed, edit)
            after = describe(reconstruction if kind == "reconstruction" else edited)
            # Success: the wanted attribute reads as asked (and a shape is still there); "kept": every other
            # attribute reads as in the input too. For the reconstruction both mean all four as in the input.
            wanted = vars(spec) if kind == "reconstruction" else {**vars(spec), attribute: target}
            kept.append(after.attributes() == wanted)
            wins.append(kept[-1] if kind == "reconstruction" else
                        after.shape is not None and getattr(after, attribute) == target)
            ious.append(mask_iou(given.mask, after.mask))
        results[kind] = {"success": float(np.mean(wins)), "kept": float(np.mean(kept)), "iou": float(np.mean(ious)),
                         "n": len(seeds)}
    return results


# What a sweep on uploads maximises per kind: a background swap must keep the shape ("kept": the other three
# attributes read as in the input), the others must first of all succeed.
SWEEP_GOAL = {"background": "kept"}


def sweep_real(pipe, seeds: list[int], grid: dict[str, list], edit: dict,
               kinds: tuple[str, ...] = ("color", "background", "shape"), log=print) -> dict:
    """Per kind, the (scale, warmup, threshold) with the best :data:`SWEEP_GOAL` on ``seeds`` (ties: the better
    success, the higher mask IoU, then the lower scale); returns the table and the choice."""
    import itertools

    table, best = [], {}
    for kind in kinds:
        for scale, warmup, threshold in itertools.product(grid["scale"], grid["warmup"], grid["threshold"]):
            setting = {"scale": float(scale), "warmup": int(warmup), "threshold": float(threshold)}
            r = evaluate_real(pipe, seeds, {kind: setting}, edit, kinds=(kind,))[kind]
            table.append({"kind": kind, **setting, **r})
            log(f"{kind:10s} scale {scale:5.1f} warmup {warmup} threshold {threshold}: success {r['success']:.3f} "
                f"kept {r['kept']:.3f} iou {r['iou']:.3f}", flush=True)
            rank = (r[SWEEP_GOAL.get(kind, "success")], r["success"], r["iou"], -scale)
            if kind not in best or rank > best[kind][0]:
                best[kind] = (rank, setting)
    return {"table": table, "best": {k: v[1] for k, v in best.items()}}
