"""Inpainting "Only masked" (A1111's inpaint_full_res, v1.10: modules/processing.py,
StableDiffusionProcessingImg2Img.init and apply_overlay; modules/masking.py): the job's width x height
renders only the region around the mask, which then goes back into the image at the image's own size.

- The region is the mask's bounding box grown by `inpaint_full_res_padding` pixels, then widened or
  heightened to the job's aspect ratio, kept inside the image.
- The image and the mask are cut to the region and brought to the job's size by "Resize and fill".
- The render is brought back to the region's size by "Crop and resize" and pasted there; the image
  itself goes over it wherever the (blurred) mask keeps it.
- A mask with nothing in it has no region: the job renders the whole image, all of it repainted, as
  img2img (A1111 renders it at the job's size; here it goes back at the image's, as the sidecar says).
"""

from __future__ import annotations

from typing import NamedTuple

from PIL import Image, ImageOps

from sdfarm.jobs import RenderJob

from .fit import CROP_AND_RESIZE, RESIZE_AND_FILL, fit

Region = tuple[int, int, int, int]  # x1, y1, x2, y2


class OnlyMasked(NamedTuple):
    """What puts an "Only masked" render back: the image at its own size, the mask that keeps it
    (A1111's mask_for_overlay: blurred, not doubled) and the region rendered."""

    original: Image.Image
    overlay_mask: Image.Image
    region: Region


def crop_region(mask: Image.Image, pad: int) -> Region | None:
    """The mask's bounding box grown by pad, inside the image; None for an empty mask."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height)


def expand_region(region: Region, width: int, height: int, image_width: int, image_height: int) -> Region:
    """The region grown on its short side to the job's aspect (masking.py, expand_crop_region), shifted
    back inside the image where it overhangs, then cut at its far edge."""
    x1, y1, x2, y2 = region
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _grow(low: int, high: int, by: int, limit: int) -> tuple[int, int]:
    low, high = low - by // 2, high + by - by // 2
    if high >= limit:
        low, high = low - (high - limit), limit
    if low < 0:
        low, high = 0, high - low
    return low, min(high, limit)


def prepare(job: RenderJob, original: Image.Image, mask: Image.Image) -> tuple[Image.Image, Image.Image, OnlyMasked]:
    """(init, mask) at the job's size, and how to put the render back; `mask` is the finished mask at
    the image's own size (before any resize)."""
    region = crop_region(mask, job.inpaint_full_res_padding)
    if region is None:  # nothing masked: the whole image, all of it repainted (as img2img)
        region, mask = (0, 0, *mask.size), Image.new("L", mask.size, 255)
    region = expand_region(region, job.width, job.height, mask.width, mask.height)
    init = fit(original.crop(region), RESIZE_AND_FILL, job.width, job.height)
    return init, fit(mask.crop(region), RESIZE_AND_FILL, job.width, job.height), OnlyMasked(original, mask, region)


def uncrop(rendered: Image.Image, back: OnlyMasked) -> Image.Image:
    """The render in its region of the image, the image over it where the mask keeps it."""
    x1, y1, x2, y2 = back.region
    canvas = Image.new("RGBA", back.original.size)
    canvas.paste(fit(rendered.convert("RGB"), CROP_AND_RESIZE, x2 - x1, y2 - y1), (x1, y1))
    kept = Image.new("RGBa", back.original.size)
    kept.paste(back.original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(back.overlay_mask.convert("L")))
    canvas.alpha_composite(kept.convert("RGBA"))
    return canvas.convert("RGB")
