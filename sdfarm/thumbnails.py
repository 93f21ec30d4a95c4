"""The gallery's thumbnails: a small WebP of each image (longest side SIDE), stored under
layout.thumbnail_key. The worker writes one beside each PNG, before the sidecar; the API makes the
missing one of an image stored before thumbnails existed, from its PNG."""

from __future__ import annotations

import io
from typing import Final

from PIL import Image

SIDE: Final = 256  # pixels, the longest side
QUALITY: Final = 80
METHOD: Final = 2  # libwebp's effort (0..6): 2 costs about half of the default 4, for the same size here
CONTENT_TYPE: Final = "image/webp"


def thumbnail(image: Image.Image, side: int = SIDE) -> bytes:
    """The image as a WebP no larger than side x side, its aspect ratio kept (never enlarged)."""
    small = image.convert("RGBA" if image.mode in ("RGBA", "LA", "PA") else "RGB")  # a copy, whatever the mode
    small.thumbnail((side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, format="WEBP", quality=QUALITY, method=METHOD)
    return buf.getvalue()


def thumbnail_of_png(png: bytes, side: int = SIDE) -> bytes:
    """The thumbnail of a stored image, from its bytes."""
    with Image.open(io.BytesIO(png)) as image:
        return thumbnail(image, side)
