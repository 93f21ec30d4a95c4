"""Inpainting "Only masked" (inpaint_full_res) as A1111 v1.10 has it: the crop region (modules/masking.py,
get_crop_region and expand_crop_region, restated here), the region rendered at the job's size and put
back into the image at its own size (modules/processing.py, apply_overlay and uncrop)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdfarm.infotext import job_infotext, parse_infotext
from sdfarm.jobs import RenderJob
from sdfarm.models import Registry
from tests.image_refs import image_ref
from worker.masks import JobInput, shape_mask
from worker.only_masked import crop_region, expand_region, prepare
from worker.pipeline import LoadedModel, load_model
from worker.render import render


def a1111_region(box: tuple[int, int, int, int], pad: int, w: int, h: int, iw: int, ih: int) -> tuple[int, ...]:
    x1, y1, x2, y2 = max(box[0] - pad, 0), max(box[1] - pad, 0), min(box[2] + pad, iw), min(box[3] + pad, ih)
    if (x2 - x1) / (y2 - y1) > w / h:
        y1, y2 = a1111_axis(y1, y2, int((x2 - x1) / (w / h) - (y2 - y1)), ih)
    else:
        x1, x2 = a1111_axis(x1, x2, int((y2 - y1) * (w / h) - (x2 - x1)), iw)
    return x1, y1, x2, y2


def a1111_axis(a: int, b: int, diff: int, size: int) -> tuple[int, int]:
    """expand_crop_region on one axis, step for step."""
    a, b = a - diff // 2, b + diff - diff // 2
    if b >= size:
        d = b - size
        a, b = a - d, b - d
    if a < 0:
        a, b = a - a, b - a
    if b >= size:
        b = size
    return a, b


@pytest.mark.parametrize(("box", "pad", "size", "image"), [
    ((100, 100, 150, 120), 32, (512, 512), (512, 512)),   # wide box, square job: grown in height
    ((10, 10, 20, 200), 0, (512, 256), (512, 512)),       # tall box, wide job: grown in width, off the left edge
    ((480, 400, 510, 500), 16, (256, 512), (512, 512)),   # at the bottom right corner
    ((0, 0, 64, 64), 8, (768, 512), (640, 480)),
])
def test_the_crop_region_is_a1111s(box: tuple[int, int, int, int], pad: int, size: tuple[int, int],
                                   image: tuple[int, int]) -> None:
    mask = Image.new("L", image, 0)
    mask.paste(255, box)
    region = crop_region(mask, pad)
    assert region is not None
    assert expand_region(region, *size, *image) == a1111_region(box, pad, *size, *image)
    assert crop_region(Image.new("L", image, 0), pad) is None


@pytest.fixture(scope="module")
def loaded(registry: Registry) -> LoadedModel:
    return load_model(registry, "tiny-sd15", "cpu")


def test_only_the_region_is_rendered_and_goes_back_at_the_images_size(loaded: LoadedModel) -> None:
    rng = np.random.default_rng(1)
    original = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((128, 128))
    raw = Image.new("L", (128, 128), 0)
    raw.paste(255, (80, 80, 104, 104))
    j = RenderJob.model_validate({"model": "tiny-sd15", "model_hash": loaded.identity, "prompt": "a fox", "seed": 2,
                                  "width": 64, "height": 64, "steps": 3, "strength": 0.9,
                                  "init_image": image_ref(original), "mask_image": image_ref(raw), "mask_blur": 0,
                                  "inpaint_full_res": True,
                                  "inpaint_full_res_padding": 8})
    assert j.output_size == (128, 128)  # what the sidecar says
    init, mask, back = prepare(j, original, shape_mask(raw, j))
    assert back.region == (72, 72, 112, 112)  # the box grown by 8: square already
    assert init.size == mask.size == (64, 64)
    out, = render(loaded, [j], {j.id: JobInput(init, mask, back)})
    assert out.size == (128, 128)
    a, b = np.asarray(out, dtype=np.int16), np.asarray(original, dtype=np.int16)
    assert np.array_equal(a[:72], b[:72])  # outside the region: the image itself
    assert np.array_equal(a[:, :72], b[:, :72])
    assert np.abs(a[84:100, 84:100] - b[84:100, 84:100]).max() > 10  # inside the mask: repainted
    info = parse_infotext(job_infotext(j, "0" * 10))
    assert (info["Inpaint area"], info["Masked area padding"], info["Size-1"]) == ("Only masked", "8", "64")
