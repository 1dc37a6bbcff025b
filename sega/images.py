"""Input images as people send them, made ready for a model: one RGB frame at the model's size.

    from sega.images import load_image
    image, notes = load_image("photo.jpg", size=512)   # longer side 512, both sides multiples of 8
"""

from __future__ import annotations

import os
from pathlib import Path

import PIL.Image
import PIL.ImageOps

FORMATS = ("PNG", "JPEG", "WEBP")
BACKGROUND = (255, 255, 255)  # transparent areas become white


def fit_size(width: int, height: int, size: int, multiple: int = 8) -> tuple[int, int]:
    """``(w, h)`` with the longer side ``size`` and the aspect ratio kept, both rounded to ``multiple``."""
    scale = size / max(width, height)

    def snap(x: float) -> int:
        return max(multiple, int(round(x * scale / multiple)) * multiple)

    return snap(width), snap(height)


def flatten(image: PIL.Image.Image) -> tuple[PIL.Image.Image, list[str]]:
    """One RGB frame: the first frame of an animation, EXIF orientation applied, alpha on white, any mode
    (greyscale, palette, CMYK, 16-bit) converted to RGB. Returns the image and notes on what was done."""
    notes = []
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
        notes.append(f"image: an animation of {image.n_frames} frames; its first frame was used.")
    image.load()
    image = PIL.ImageOps.exif_transpose(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            notes.append("image: transparent areas were filled with white.")
        background = PIL.Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        image = PIL.Image.alpha_composite(background, rgba)
    elif image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16-bit and float greyscale: scale to 8 bits before converting (PIL would clip instead).
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB"), notes


def resize_for_model(image: PIL.Image.Image, size: int) -> tuple[PIL.Image.Image, list[str]]:
    """``image`` resized to the model's native size on its longer side (sides multiples of 8), with a note."""
    target = fit_size(*image.size, size)
    if target == image.size:
        return image, []
    note = (f"image: resized from {image.width}×{image.height} to {target[0]}×{target[1]} px (the model's "
            f"{size} px on the longer side, both sides multiples of 8).")
    return image.resize(target, PIL.Image.Resampling.LANCZOS), [note]


def load_image(source: str | os.PathLike | PIL.Image.Image, size: int) -> tuple[PIL.Image.Image, list[str]]:
    """An image file (PNG, JPEG or WebP) or PIL image as one RGB frame of the model's size, with notes.

    Args:
        source: a path or an opened PIL image.
        size: the model's native size in pixels (SD 1.5: 512); the longer side becomes this.

    Raises ValueError naming ``image`` for files that are not PNG, JPEG or WebP images or cannot be read.
    """
    if isinstance(source, PIL.Image.Image):
        image, notes = flatten(source)
    else:
        try:
            with PIL.Image.open(Path(source)) as opened:
                if opened.format not in FORMATS:
                    raise ValueError(f"image must be a PNG, JPEG or WebP file; got {opened.format}")
                image, notes = flatten(opened)
        except (PIL.UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ValueError(f"image could not be read as a PNG, JPEG or WebP image ({exc})") from None
    image, resize_notes = resize_for_model(image, size)
    return image, notes + resize_notes
