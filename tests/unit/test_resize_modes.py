"""img2img resize modes as A1111 v1.10 has them (modules/images.py, resize_image): the expected images
are built here from its geometry (src_w, src_h, the paste box, the edge bands)."""

from __future__ import annotations

import hashlib
import typing

import numpy as np
import pytest
from PIL import Image

from sdfarm.jobs import RenderJob
from worker.assets import as_input
from worker.fit import CROP_AND_RESIZE, JUST_RESIZE, RESIZE_AND_FILL, fit
from worker.masks import finish_mask

LANCZOS = Image.Resampling.LANCZOS


def gradient(width: int, height: int) -> Image.Image:
    """Every pixel distinct: red along x, green along y."""
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    return Image.fromarray(np.stack([x, y, np.full_like(x, 90)], axis=-1).astype(np.uint8), "RGB")


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_the_modes_are_the_jobs() -> None:
    assert typing.get_args(RenderJob.model_fields["resize_mode"].annotation) == (
        JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL)


def test_just_resize_stretches() -> None:
    image = gradient(40, 20)
    assert np.array_equal(arr(fit(image, JUST_RESIZE, 32, 32)), arr(image.resize((32, 32), LANCZOS)))


@pytest.mark.parametrize(("size", "target"), [((40, 20), (32, 32)), ((20, 40), (32, 32)), ((30, 30), (48, 24))])
def test_crop_and_resize_covers_and_cuts_the_overhang_evenly(size: tuple[int, int], target: tuple[int, int]) -> None:
    image, (w, h) = gradient(*size), target
    ratio, source = w / h, size[0] / size[1]
    src_w = w if ratio > source else size[0] * h // size[1]
    src_h = h if ratio <= source else size[1] * w // size[0]
    left, top = src_w // 2 - w // 2, src_h // 2 - h // 2
    want = image.resize((src_w, src_h), LANCZOS).crop((left, top, left + w, top + h))
    assert np.array_equal(arr(fit(image, CROP_AND_RESIZE, w, h)), arr(want))


def test_resize_and_fill_fits_inside_and_stretches_the_edges_into_the_bands() -> None:
    image = gradient(40, 20)  # wider than the 32x32 target: bands above and below
    got = arr(fit(image, RESIZE_AND_FILL, 32, 32))
    inner = arr(image.resize((32, 16), LANCZOS))  # src_w = 32, src_h = 20 * 32 // 40
    assert np.array_equal(got[8:24], inner)  # pasted at height // 2 - src_h // 2 = 8
    for band, edge in ((got[:8], inner[0]), (got[24:], inner[-1])):
        assert (band == band[0]).all()  # one row, stretched
        assert np.abs(band[0] - edge).max() <= 2
    tall = arr(fit(gradient(20, 40), RESIZE_AND_FILL, 32, 32))  # bands left and right
    assert np.array_equal(tall[:, 8:24], arr(gradient(20, 40).resize((16, 32), LANCZOS)))
    assert (tall[:, :8] == tall[:, :1]).all()


def test_a_mask_follows_its_images_mode_and_stays_grey() -> None:
    j = RenderJob.model_validate({"model": "m", "model_hash": "ab" * 32, "prompt": "p", "seed": 1, "width": 64,
                                  "height": 64, "mask_blur": 0, "resize_mode": "Crop and resize",
                                  "init_image": {"key": "inputs/a.png", "sha256": "01" * 32, "width": 128,
                                                 "height": 64},
                                  "mask_image": {"key": "inputs/m.png", "sha256": "02" * 32, "width": 128,
                                                 "height": 64}})
    mask = Image.new("L", (128, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # the left quarter: cut off by the centre crop
    finished = finish_mask(mask, j)
    assert finished.mode == "L"
    assert finished.size == (64, 64)
    assert np.asarray(finished).max() == 0
    with pytest.raises(ValueError, match="resize_mode needs init_image"):
        RenderJob.model_validate({"model": "m", "model_hash": "ab" * 32, "prompt": "p", "seed": 1,
                                  "resize_mode": "Resize and fill"})


def test_a_translucent_masks_alpha_reaches_the_mask_reader() -> None:
    # A1111 reads an RGBA mask that is not fully opaque by its alpha; the worker used to decode every
    # input to RGB, which dropped the alpha before finish_mask could read it
    rgba = Image.new("RGBA", (16, 16), (255, 255, 255, 0))
    rgba.paste((255, 255, 255, 255), (0, 0, 8, 16))
    kept = as_input(rgba, mask=True)
    assert kept.mode == "RGBA"
    assert as_input(Image.new("RGB", (4, 4), (200, 200, 200)), mask=True).mode == "L"
    assert as_input(rgba, mask=False).mode == "RGB"
    j = RenderJob.model_validate({"model": "m", "model_hash": "ab" * 32, "prompt": "p", "seed": 1, "width": 64,
                                  "height": 64, "mask_blur": 0, "init_image": {
                                      "key": "inputs/a.png", "sha256": hashlib.sha256(b"a").hexdigest(),
                                      "width": 16, "height": 16},
                                  "mask_image": {"key": "inputs/m.png", "sha256": "02" * 32, "width": 16,
                                                 "height": 16}})
    mask = np.asarray(finish_mask(kept, j))
    assert mask[:, :24].min() > 200  # the opaque half is repainted
    assert mask[:, 40:].max() < 50  # the transparent half (white in RGB) is kept
