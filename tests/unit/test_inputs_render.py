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
from worker.masks import MaskModels, finish_mask
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
