"""img2img, inpainting and CLIPSeg text masks change the output the way they should (tiny SD1.5, CPU)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sdfarm.jobs import RenderJob
from sdfarm.models import Registry
from worker.masks import MaskModels, finish_mask, overlay
from worker.pipeline import LoadedModel, load_model
from worker.render import render
from worker.testing import write_tiny_clipseg


@pytest.fixture(scope="module")
def loaded(registry: Registry) -> LoadedModel:
    return load_model(registry, "tiny-sd15", "cpu")


@pytest.fixture(scope="module")
def clipseg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clipseg(tmp_path_factory.mktemp("clipseg") / "clipseg")


def picture(seed: int, size: int = 64) -> Image.Image:
    """A smooth random picture: blocks of colour, so that it survives resizing."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR)


def ref(image: Image.Image) -> dict[str, Any]:
    return {"key": "inputs/x.png", "sha256": hashlib.sha256(image.tobytes()).hexdigest(),
            "width": image.width, "height": image.height}


def make(loaded: LoadedModel, init: Image.Image, **changes: Any) -> RenderJob:
    base = {"model": "tiny-sd15", "model_hash": loaded.identity, "prompt": "a red fox in snow", "seed": 11,
            "width": 64, "height": 64, "steps": 6, "init_image": ref(init)}
    return RenderJob.model_validate({**base, **changes})


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def test_img2img_follows_its_init_image_and_strength(loaded: LoadedModel) -> None:
    a, b = picture(1), picture(2)
    # 2 of 6 steps (A1111: int(0.3 * 6) + 1): low enough that the random tiny model keeps its init image
    job_a, job_b = make(loaded, a, strength=0.3), make(loaded, b, strength=0.3)
    out_a = pixels(render(loaded, [job_a], {job_a.id: (a, None)})[0])
    again = pixels(render(loaded, [job_a], {job_a.id: (a, None)})[0])
    out_b = pixels(render(loaded, [job_b], {job_b.id: (b, None)})[0])
    strong = make(loaded, a, strength=1.0)
    out_strong = pixels(render(loaded, [strong], {strong.id: (a, None)})[0])
    assert np.array_equal(out_a, again)  # the same job gives the same image on two runs
    assert np.abs(out_a - out_b).max() > 10  # another init image, another result
    assert np.abs(out_a - out_strong).max() > 10  # strength matters


def test_inpainting_keeps_pixels_outside_the_mask(loaded: LoadedModel) -> None:
    init = picture(3)
    raw = Image.new("L", (64, 64), 0)
    raw.paste(255, (16, 16, 48, 48))  # repaint the centre square
    job = make(loaded, init, mask_image=ref(raw), mask_blur=2, strength=1.0)
    mask = finish_mask(raw, job)
    out = pixels(render(loaded, [job], {job.id: (init, mask)})[0])
    keep = np.ones((64, 64), bool)
    keep[10:54, 10:54] = False  # outside the square and its blur
    assert np.abs(out[keep] - pixels(init)[keep]).max() <= 2
    assert np.abs(out[24:40, 24:40] - pixels(init)[24:40, 24:40]).max() > 10  # inside was repainted


def test_a_clipseg_text_mask_is_computed_from_the_image(clipseg: Path) -> None:
    masks = MaskModels(torch.device("cpu"))
    one = np.asarray(masks.text_mask(clipseg, picture(4, 96), "background", 0.5))
    two = np.asarray(masks.text_mask(clipseg, picture(5, 96), "background", 0.5))
    other_text = np.asarray(masks.text_mask(clipseg, picture(4, 96), "a cat", 0.5))
    assert one.shape == (96, 96)
    assert set(np.unique(one)) <= {0, 255}
    assert (one != two).any()  # a different image gives a different mask
    assert (one != other_text).any()  # and so does another text
    assert 0 < (one == 255).mean() < 1 or 0 < (two == 255).mean() < 1  # a real partition, not all or nothing


def test_dilation_grows_the_mask(loaded: LoadedModel) -> None:
    raw = Image.new("L", (64, 64), 0)
    raw.paste(255, (30, 30, 34, 34))
    base = make(loaded, picture(1), mask_image=ref(raw), mask_blur=0)
    grown = make(loaded, picture(1), mask_image=ref(raw), mask_blur=0, mask_dilate=4)
    assert (np.asarray(finish_mask(raw, base)) > 127).sum() == 16
    assert (np.asarray(finish_mask(raw, grown)) > 127).sum() == 144


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_init_noise_is_the_seeds_first_draw_and_the_init_latents_the_posterior_mean(
        loaded: LoadedModel, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A1111 (modules/processing.py, StableDiffusionProcessingImg2Img.sample) noises the init latents
    with the seed's first draw. diffusers' own VAE encode would spend that draw on the posterior."""
    import diffusers

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = diffusers.DPMSolverMultistepScheduler.add_noise

    def spy(self: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        seen.append((latents.clone(), noise.clone()))
        return original(self, latents, noise, timesteps)

    monkeypatch.setattr(diffusers.DPMSolverMultistepScheduler, "add_noise", spy)
    a, b = picture(5), picture(6)
    mask = Image.new("L", (64, 64), 255) if mode == "inpaint" else None
    changes: dict[str, Any] = {"strength": 0.5}
    if mask is not None:
        changes.update(mask_image=ref(mask), mask_blur=0)
    jobs = [make(loaded, a, seed=3, **changes), make(loaded, b, seed=4, **changes)]
    render(loaded, jobs, {jobs[0].id: (a, mask), jobs[1].id: (b, mask)})
    latents, noise = seen[0]
    pipe = loaded.variant(mode)
    with torch.inference_mode():
        pixels_in = pipe.image_processor.preprocess([a, b], height=64, width=64)
        mean = pipe.vae.encode(pixels_in).latent_dist.mean * pipe.vae.config.scaling_factor
    assert torch.allclose(latents, mean, atol=1e-5)
    for i, seed in enumerate((3, 4)):
        first_draw = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(seed))
        assert torch.equal(noise[i : i + 1], first_draw)


# --- masks as A1111 v1.10 reads them: modules/images.py create_binary_mask, and
# modules/processing.py StableDiffusionProcessingImg2Img.init (cv2.GaussianBlur with kernel size
# 2 * int(2.5 * blur + 0.5) + 1 at the mask's own resolution, then "Just resize", then
# mask_for_overlay = clip(mask * 2)) ---

def opencv_gaussian(mask: np.ndarray, sigma: float) -> np.ndarray:
    """cv2.GaussianBlur(mask, (k, 1), sigma) then (1, k): OpenCV's kernel (getGaussianKernel's
    formula) and default border BORDER_REFLECT_101, which scipy calls "mirror"."""
    from scipy.ndimage import correlate

    k = 2 * int(2.5 * sigma + 0.5) + 1
    g = np.exp(-((np.arange(k) - (k - 1) / 2) ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    return np.clip(np.rint(correlate(mask.astype(np.float64), np.outer(g, g), mode="mirror")), 0, 255)


def test_a_mask_is_blurred_at_its_own_resolution_with_opencvs_kernel_then_resized(loaded: LoadedModel) -> None:
    raw = np.zeros((96, 96), np.uint8)
    raw[20:60, 30:80] = 255
    raw[70:90, 10:40] = 100  # grey levels are kept: not binarised
    job = make(loaded, picture(1, 96), mask_image=ref(Image.fromarray(raw)), mask_blur=4)
    want = Image.fromarray(opencv_gaussian(raw, 4).astype(np.uint8)).resize((64, 64), Image.Resampling.LANCZOS)
    got = finish_mask(Image.fromarray(raw), job)
    assert np.abs(pixels(got.convert("RGB")) - pixels(want.convert("RGB"))).max() <= 1  # OpenCV's fixed point
    sharp = finish_mask(Image.fromarray(raw), make(loaded, picture(1, 96), mask_image=ref(Image.fromarray(raw)),
                                                   mask_blur=0, width=96, height=96))
    assert np.array_equal(np.asarray(sharp), raw)


def test_a_translucent_rgba_mask_is_its_alpha_channel_rounded(loaded: LoadedModel) -> None:
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere: the colour is not what counts
    rgba[:, :32, 3], rgba[:, 32:, 3] = 200, 100
    job = make(loaded, picture(1), mask_image=ref(Image.fromarray(rgba, "RGBA")), mask_blur=0)
    got = np.asarray(finish_mask(Image.fromarray(rgba, "RGBA"), job))
    assert (got[:, :32] == 255).all()
    assert (got[:, 32:] == 0).all()
    opaque = rgba.copy()
    opaque[..., 3] = 255  # fully opaque RGBA: read as grey levels
    assert (np.asarray(finish_mask(Image.fromarray(opaque, "RGBA"), job)) == 255).all()


def test_the_render_shows_through_twice_the_mask() -> None:
    init, rendered = Image.new("RGB", (256, 1), "black"), Image.new("RGB", (256, 1), "white")
    mask = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(1, 256), "L")
    got = np.asarray(overlay(init, rendered, mask))[0, :, 0].astype(int)
    want = np.minimum(2 * np.arange(256), 255)  # A1111's mask_for_overlay
    assert np.abs(got - want).max() <= 1
