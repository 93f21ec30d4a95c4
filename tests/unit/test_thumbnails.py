"""The gallery's thumbnails (sdfarm/thumbnails.py), as the worker writes them beside each PNG: a WebP,
its longest side 256 or less, the aspect ratio kept, never enlarged, cheap to make."""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import pytest
from PIL import Image

from sdfarm.thumbnails import SIDE, thumbnail, thumbnail_of_png


def opened(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def rgb(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    pixel = image.convert("RGB").getpixel(xy)
    assert isinstance(pixel, tuple)
    return pixel


@pytest.mark.parametrize(("size", "expected"), [((512, 768), (171, 256)), ((1024, 1024), (256, 256)),
                                                ((1216, 832), (256, 175)), ((64, 64), (64, 64))])
def test_a_thumbnail_is_a_webp_no_larger_than_its_side_with_the_aspect_kept(
        size: tuple[int, int], expected: tuple[int, int]) -> None:
    image = Image.new("RGB", size, (200, 30, 40))
    thumb = opened(thumbnail(image))
    assert thumb.format == "WEBP"
    assert thumb.size == expected
    assert max(thumb.size) <= SIDE
    centre = rgb(thumb, (thumb.width // 2, thumb.height // 2))
    assert max(abs(a - b) for a, b in zip(centre, (200, 30, 40), strict=True)) < 8  # its colours (lossy, close)
    assert image.size == size  # the rendered image itself is left as it was: the PNG is encoded from it


def test_modes_webp_cannot_hold_are_converted_and_transparency_is_kept() -> None:
    assert opened(thumbnail(Image.new("I;16", (300, 100), 1000))).mode == "RGB"
    assert opened(thumbnail(Image.new("L", (300, 100), 128))).mode == "RGB"
    transparent = opened(thumbnail(Image.new("RGBA", (300, 100), (0, 0, 255, 0))))
    assert transparent.mode == "RGBA"
    assert transparent.getpixel((10, 10))[3] == 0  # type: ignore[index]


def test_the_thumbnail_of_a_stored_png_is_that_image() -> None:
    """What the worker makes when an earlier attempt stored the PNG (and the API, for an image stored
    before thumbnails existed): the thumbnail of the PNG in the bucket, not of a new render."""
    buf = io.BytesIO()
    Image.new("RGB", (640, 320), "red").save(buf, format="PNG")
    thumb = opened(thumbnail_of_png(buf.getvalue()))
    assert thumb.size == (256, 128)
    centre = rgb(thumb, (128, 64))
    assert max(abs(a - b) for a, b in zip(centre, (255, 0, 0), strict=True)) < 15


def test_a_thumbnail_costs_the_worker_little() -> None:
    """Made in the upload threads beside the PNG: well under the PNG's own encoding of a large image."""
    noise = Image.effect_noise((1024, 1024), 64).convert("RGB")
    thumb_s = best_of(3, lambda: thumbnail(noise))
    png_s = best_of(3, lambda: noise.save(io.BytesIO(), format="PNG", compress_level=4))  # worker/encode.py's
    assert len(thumbnail(noise)) < 64 * 1024
    assert thumb_s < max(png_s, 0.05)


def best_of(n: int, step: Callable[[], object]) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return min(times)
