"""Inpainting's masked content and "Inpaint not masked" as A1111 v1.10 has them (modules/processing.py,
StableDiffusionProcessingImg2Img.init; modules/masking.py, fill): "fill" paints the masked area with
the colours around it before encoding (as every mode but "original" does), "latent noise" puts the
seed's noise in the masked area of the init latents, "latent nothing" zeros; the latent mask is the
finished mask at latent size, bicubic, rounded."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sdfarm.infotext import job_infotext, parse_infotext
from sdfarm.jobs import RenderJob
from sdfarm.models import Registry
from tests.image_refs import image_ref
from worker.masks import fill, finish_mask
from worker.pipeline import LoadedModel, load_model
from worker.render import render


@pytest.fixture(scope="module")
def loaded(registry: Registry) -> LoadedModel:
    return load_model(registry, "tiny-sd15", "cpu")


INIT = Image.new("RGB", (64, 64), (200, 40, 40))
MASK = Image.new("L", (64, 64), 0)
MASK.paste(255, (32, 0, 64, 64))  # the right half is repainted


def job(loaded: LoadedModel | None = None, **changes: Any) -> RenderJob:
    return RenderJob.model_validate({"model": "tiny-sd15", "model_hash": loaded.identity if loaded else "ab" * 32,
                                     "prompt": "a fox", "seed": 21, "width": 64, "height": 64, "steps": 4,
                                     "strength": 0.5, "init_image": image_ref(INIT), "mask_image": image_ref(MASK),
                                     "mask_blur": 0, **changes})


def init_latents(loaded: LoadedModel, j: RenderJob, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """The init latents the scheduler noises (what A1111 calls init_latent)."""
    import diffusers

    seen: list[torch.Tensor] = []
    original = diffusers.DPMSolverMultistepScheduler.add_noise

    def spy(self: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        seen.append(latents.clone())
        return original(self, latents, noise, timesteps)

    monkeypatch.setattr(diffusers.DPMSolverMultistepScheduler, "add_noise", spy)
    render(loaded, [j], {j.id: (INIT, finish_mask(MASK, j))})
    return seen[0][0]


@pytest.mark.parametrize("content", ["latent nothing", "latent noise"])
def test_latent_masked_content_replaces_the_masked_latents(loaded: LoadedModel, content: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    original = init_latents(loaded, job(loaded), monkeypatch)
    got = init_latents(loaded, job(loaded, inpaint_fill=content), monkeypatch)
    # latent columns 0..3 kept, 4..7 repainted (the right half, rounded at latent size)
    assert not torch.equal(got[:, :, :4], original[:, :, :4])  # encoded from the filled image ...
    filled = init_latents(loaded, job(loaded, inpaint_fill="fill"), monkeypatch)
    assert torch.equal(got[:, :, :4], filled[:, :, :4])  # ... as "fill" is, where the mask keeps
    if content == "latent nothing":
        assert not got[:, :, 4:].any()
    else:
        noise = torch.randn((4, 8, 8), generator=torch.Generator("cpu").manual_seed(21))  # the seed's first draw
        assert torch.equal(got[:, :, 4:], noise[:, :, 4:])


def test_fill_paints_the_masked_area_with_the_colours_around_it() -> None:
    image = Image.new("RGB", (64, 64), (0, 0, 255))
    image.paste((200, 40, 40), (0, 0, 32, 64))
    out = np.asarray(fill(image, MASK), dtype=np.int16)
    assert np.array_equal(out[:, :32], np.asarray(image, dtype=np.int16)[:, :32])  # kept pixels stay
    assert np.abs(out[:, 40:] - np.array([200, 40, 40])).max() < 30  # the masked blue became the kept red


def test_inpaint_not_masked_repaints_what_the_mask_keeps() -> None:
    inverted = np.asarray(finish_mask(MASK, job(inpaint_invert=True)))
    assert (inverted[:, :32] == 255).all()
    assert (inverted[:, 32:] == 0).all()


def test_masked_content_and_mask_mode_are_recorded_and_need_a_mask() -> None:
    info = parse_infotext(job_infotext(job(inpaint_fill="latent noise", inpaint_invert=True), "0" * 10))
    assert (info["Masked content"], info["Mask mode"]) == ("latent noise", "Inpaint not masked")
    assert "Masked content" not in parse_infotext(job_infotext(job(), "0" * 10))
    with pytest.raises(ValueError, match="inpaint_fill needs mask_image or mask_prompt"):
        RenderJob.model_validate({"model": "m", "model_hash": "ab" * 32, "prompt": "p", "seed": 1,
                                  "init_image": image_ref(INIT), "inpaint_fill": "fill"})
