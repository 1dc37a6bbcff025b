"""The ``image`` parameter of /edit: an uploaded file, read and prepared for the model (server.images), named in
the JSON of the parameters used, and its keyword of ``pipe.invert(...)``."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import PIL.Image

from .context import Context
from .images import read_upload, upload_path
from .keywords import Keyword


@dataclass(frozen=True)
class UploadedImage:
    """An uploaded image made ready for the model, and what names it in the JSON of the parameters used."""

    image: PIL.Image.Image
    name: str  # the file's name as uploaded
    sha256: str  # of the prepared image's pixels

    def to_json(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "width": self.image.width, "height": self.image.height}


def check_image(value, ctx: Context) -> UploadedImage:
    path = upload_path(value, ctx.upload_roots)
    image, notes = read_upload(path, ctx.loaded.native_size, ctx.limits.max_image_mb, ctx.limits.max_image_pixels)
    ctx.notices += notes
    name = (value.get("orig_name") if isinstance(value, Mapping) else None) or path.name
    return UploadedImage(image, str(name), hashlib.sha256(image.tobytes()).hexdigest())


def image_keyword(upload: UploadedImage) -> list[Keyword]:
    size = max(upload.image.size)
    return [Keyword("image", f"load_image({upload.name!r}, size={size})[0]", lambda _pipe: upload.image,
                    ("from sega.images import load_image",), "invert")]
