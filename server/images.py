"""An uploaded image as a request parameter: where it may come from, how big it may be, and clear errors.

The conversion itself (first frame, EXIF orientation, alpha on white, RGB, the model's size) is the library's
:func:`sega.images.load_image`; here the file is checked first, so that a bad upload gets an error that names
``image`` and never reaches the model.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import PIL.Image

from sega.images import load_image

from .errors import InvalidInput


def upload_path(payload, allowed_roots: Sequence[str | os.PathLike]) -> Path:
    """The file behind an upload: a path, or gradio's file data (``{"path": ...}``, as
    ``gradio_client.handle_file`` sends it). Only files under ``allowed_roots`` (gradio's upload cache) are
    read, so an API caller cannot make the server open its own files."""
    if payload is None:
        raise InvalidInput("image is required (a PNG, JPEG or WebP file)")
    raw = payload.get("path") if isinstance(payload, Mapping) else payload
    if not isinstance(raw, (str, os.PathLike)) or not str(raw):
        raise InvalidInput(f"image must be an uploaded file (gradio_client.handle_file(path)); got {type(payload).__name__}")
    path = Path(raw).resolve()
    roots = [Path(r).resolve() for r in allowed_roots]
    if not any(path.is_relative_to(root) for root in roots):
        raise InvalidInput("image must be a file uploaded to this app (gradio_client.handle_file(path))")
    if not path.is_file():
        raise InvalidInput("image: the uploaded file is missing; upload it again")
    return path


def read_upload(path: Path, size: int, max_megabytes: int, max_pixels: int) -> tuple[PIL.Image.Image, list[str]]:
    """The image at ``path`` ready for the model (longer side ``size``), or InvalidInput naming ``image``.

    Args:
        path: the uploaded file.
        size: the model's native size in pixels.
        max_megabytes: the largest file accepted (SEGA_MAX_IMAGE_MB).
        max_pixels: the most pixels a decoded image may have (SEGA_MAX_IMAGE_PIXELS); checked from the file's
            header before anything is decoded, so a decompression bomb costs nothing.
    """
    n_bytes = path.stat().st_size
    if n_bytes == 0:
        raise InvalidInput("image: the file is empty")
    if n_bytes > max_megabytes * 1024 * 1024:
        raise InvalidInput(f"image must be at most {max_megabytes} MB, got {n_bytes / 1024 / 1024:.1f} MB")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
        try:
            with PIL.Image.open(path) as header:
                width, height = header.size
        except (PIL.Image.DecompressionBombWarning, PIL.Image.DecompressionBombError):
            raise InvalidInput(f"image has too many pixels (at most {max_pixels} allowed)") from None
        except (PIL.UnidentifiedImageError, OSError, SyntaxError):
            raise InvalidInput("image is not a PNG, JPEG or WebP image (or the file is damaged)") from None
    if width * height > max_pixels:
        raise InvalidInput(f"image has {width}×{height} = {width * height} pixels; at most {max_pixels} allowed")
    try:
        return load_image(path, size)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


# ----------------------------------------------------------------------------------------------
# Masks: where each concept edited (the "mask" parameter), as data in the JSON and as overlays
# ----------------------------------------------------------------------------------------------

MASK_COLOR = (255, 0, 64)  # the overlay's tint where a concept edited


def mask_to_data_url(mask) -> str:
    """A mask in [0, 1] (H, W) as an 8-bit grayscale PNG data URL (white = edited at every step)."""
    import base64
    import io

    import numpy as np

    values = np.clip(np.rint(np.asarray(mask, dtype=np.float32) * 255), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(values, mode="L").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def mask_from_data_url(url: str):
    """The (H, W) float mask in [0, 1] of :func:`mask_to_data_url`."""
    import base64
    import io

    import numpy as np

    prefix = "data:image/png;base64,"
    if not isinstance(url, str) or not url.startswith(prefix):
        raise ValueError("a mask must be a PNG data URL (data:image/png;base64,...)")
    with PIL.Image.open(io.BytesIO(base64.b64decode(url[len(prefix):]))) as image:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def mask_overlay(image: PIL.Image.Image, mask, strength: float = 0.6) -> PIL.Image.Image:
    """``image`` tinted with :data:`MASK_COLOR` where ``mask`` (any size, nearest-resized) is high."""
    import numpy as np

    m = PIL.Image.fromarray(np.clip(np.rint(np.asarray(mask, np.float32) * 255), 0, 255).astype(np.uint8), mode="L")
    alpha = np.asarray(m.resize(image.size, PIL.Image.Resampling.NEAREST), dtype=np.float32)[..., None] / 255.0
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    tinted = base * (1 - strength * alpha) + np.array(MASK_COLOR, np.float32) * strength * alpha
    return PIL.Image.fromarray(np.clip(np.rint(tinted), 0, 255).astype(np.uint8))


def mask_overlays(image_path: str | None, masks: list[dict]) -> list[tuple[PIL.Image.Image, str]]:
    """(overlay, caption) per entry of a result JSON's "masks" over the image at ``image_path`` ([] without
    either); the caption is the concept with its direction (+ add, − remove)."""
    if not masks or not image_path:
        return []
    with PIL.Image.open(image_path) as image:
        image = image.convert("RGB")
        return [(mask_overlay(image, mask_from_data_url(m["mask"])), f"{'−' if m.get('reverse') else '+'}{m['concept']}")
                for m in masks]
