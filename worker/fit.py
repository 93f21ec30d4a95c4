"""An init image (and its mask) brought to the job's size by A1111's img2img resize modes (v1.10,
modules/images.py, resize_image; upscaler for img2img: None, so Lanczos):

- "Just resize": stretched to the size.
- "Crop and resize": scaled to cover the size, keeping its aspect, centred; the overhang is cut off.
- "Resize and fill": scaled to fit inside, centred; the empty bands are filled by stretching the
  image's outermost row or column of pixels.
"""

from __future__ import annotations

from PIL import Image

JUST_RESIZE = "Just resize"
CROP_AND_RESIZE = "Crop and resize"
RESIZE_AND_FILL = "Resize and fill"


def fit(image: Image.Image, mode: str, width: int, height: int) -> Image.Image:
    """The image at width x height, in its own mode (a grey mask stays grey)."""
    if mode == JUST_RESIZE:
        return _resize(image, width, height)
    ratio, source = width / height, image.width / image.height
    cover = mode == CROP_AND_RESIZE
    wide = ratio > source if cover else ratio < source
    tall = ratio <= source if cover else ratio >= source
    w = width if wide else image.width * height // image.height
    h = height if tall else image.height * width // image.width
    resized = _resize(image, w, h)
    out = Image.new(image.mode, (width, height))
    out.paste(resized, (width // 2 - w // 2, height // 2 - h // 2))
    if not cover and ratio < source:  # bands above and below: the first and last rows, stretched
        band = height // 2 - h // 2
        if band > 0:
            out.paste(resized.resize((width, band), box=(0, 0, width, 0)), (0, 0))
            out.paste(resized.resize((width, band), box=(0, h, width, h)), (0, band + h))
    elif not cover and ratio > source:  # bands left and right: the first and last columns
        band = width // 2 - w // 2
        if band > 0:
            out.paste(resized.resize((band, height), box=(0, 0, 0, height)), (0, 0))
            out.paste(resized.resize((band, height), box=(w, 0, w, height)), (band + w, 0))
    return out


def _resize(image: Image.Image, width: int, height: int) -> Image.Image:
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)
