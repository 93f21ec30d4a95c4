"""Variation seeds and seed resizing as A1111 draws them (modules/rng.py: ImageRNG.first, slerp)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sdfarm.batchfile import stream_file
from sdfarm.infotext import job_infotext, parse_infotext
from sdfarm.jobs import RenderJob
from sdfarm.models import Registry
from worker.encode import encode_png
from worker.noise import job_noise
from worker.pipeline import LoadedModel, load_model
from worker.render import render

BASE = {"model": "tiny-sd15", "model_hash": "0" * 64, "prompt": "a lighthouse", "seed": 5, "width": 64, "height": 64}


def job(**changes: Any) -> RenderJob:
    return RenderJob.model_validate({**BASE, **changes})


def draw(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def noise(j: RenderJob) -> torch.Tensor:
    return job_noise(j, torch.Generator("cpu").manual_seed(j.seed), 4, 8)


def test_the_variation_slerps_from_the_seeds_noise_to_the_subseeds() -> None:
    seed_noise, sub_noise = draw(5, (4, 8, 8)), draw(9, (4, 8, 8))
    assert torch.equal(noise(job(seed_resize_from=[128, 64], width=128, height=64)),
                       draw(5, (4, 8, 16)))  # resized from its own size: the plain draw
    assert torch.allclose(noise(job(subseed=9, subseed_strength=1.0)), sub_noise, atol=1e-5)
    half = noise(job(subseed=9, subseed_strength=0.5))
    # A1111's slerp runs along dimension 1 of the (C, H, W) noise, per (channel, column); halfway it
    # is (a + b) * sin(omega / 2) / sin(omega), omega the angle between the two columns
    cos = (seed_noise / seed_noise.norm(dim=1, keepdim=True) * sub_noise / sub_noise.norm(dim=1, keepdim=True)).sum(1)
    omega = torch.acos(cos)
    assert torch.allclose(half, (torch.sin(omega / 2) / torch.sin(omega)).unsqueeze(1) * (seed_noise + sub_noise),
                          atol=1e-5)


def test_noise_resized_from_another_size_is_centred_in_the_seeds_own() -> None:
    # a 64x64 job with the noise of a 128x128 one: the centre 8x8 of the seed's 16x16 draw
    small = noise(job(seed_resize_from=[128, 128]))
    assert torch.equal(small, draw(5, (4, 16, 16))[:, 4:12, 4:12])
    # a 128x128 job with the noise of a 64x64 one: the seed's own draw around it, the 8x8 in the centre
    big = noise(job(width=128, height=128, seed_resize_from=[64, 64]))
    generator = torch.Generator("cpu").manual_seed(5)
    around = torch.randn((4, 16, 16), generator=generator)
    assert torch.equal(big[:, 4:12, 4:12], draw(5, (4, 8, 8)))
    assert torch.equal(big[:, :4], around[:, :4])


def test_what_changes_nothing_is_left_out_and_what_cannot_render_is_refused() -> None:
    assert job(subseed=9).id == job().id  # no strength: no variation
    assert job(subseed=9, subseed_strength=0).id == job().id
    assert job(subseed="9", subseed_strength="0").id == job().id  # as a CSV cell gives them
    assert job(seed_resize_from=[64, 64]).id == job().id
    with pytest.raises(ValueError, match="subseed_strength needs subseed"):
        job(subseed_strength=0.5)
    for bad in (True, 9.5, -1, 2**32):
        with pytest.raises(ValueError, match=r"is not allowed \(allowed: an integer 0\.\.4294967295\)"):
            job(subseed=bad, subseed_strength=0.5)
    with pytest.raises(ValueError, match="100x64 is not allowed"):
        job(seed_resize_from=[100, 64])


@pytest.fixture(scope="module")
def loaded(registry: Registry) -> LoadedModel:
    return load_model(registry, "tiny-sd15", "cpu")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def test_a_variation_renders_between_its_seeds_and_alone_as_in_a_chunk(loaded: LoadedModel) -> None:
    def at(**changes: Any) -> RenderJob:
        return job(model_hash=loaded.identity, steps=6, **changes)

    plain_5, plain_9 = (pixels(render(loaded, [at(seed=s)])[0]) for s in (5, 9))
    full = pixels(render(loaded, [at(subseed=9, subseed_strength=1.0)])[0])
    assert np.abs(full - plain_9).max() <= 1  # DPM++ 2M adds no noise: the subseed's noise is the image
    half_job = at(subseed=9, subseed_strength=0.5)
    half = pixels(render(loaded, [half_job])[0])
    assert np.abs(half - plain_5).max() > 0
    assert np.abs(half - plain_9).max() > 0
    _, inside = render(loaded, [at(seed=7, subseed=3, subseed_strength=0.2), half_job])
    assert np.abs(pixels(inside) - half).max() <= 2


def test_the_infotext_records_it_and_reads_back_as_the_same_job(tmp_path: Path, registry: Registry,
                                                                  loaded: LoadedModel) -> None:
    j = job(model_hash=registry.identity("tiny-sd15"), subseed=9, subseed_strength=0.25,
            seed_resize_from=[128, 96])
    text = job_infotext(j, j.model_hash[:10])
    assert "VAE" not in text
    info = parse_infotext(text)
    assert (info["Variation seed"], info["Variation seed strength"], info["Seed resize from-1"],
            info["Seed resize from-2"]) == ("9", "0.25", "128", "96")
    (tmp_path / "v.png").write_bytes(encode_png(Image.new("RGB", (64, 64)), j, j.model_hash[:10]).png)
    back, = stream_file(tmp_path / "v.png", registry, 10).plan().jobs
    assert back.id == j.id


def noised(loaded: LoadedModel, jobs: list[RenderJob], inputs: Any = None) -> list[torch.Tensor]:
    """The noise of every add_noise call while the jobs render (an img2img pass's start noise)."""
    import diffusers

    seen: list[torch.Tensor] = []
    original = diffusers.EulerDiscreteScheduler.add_noise

    def spy(self: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        seen.append(noise.clone())
        return original(self, latents, noise, timesteps)

    diffusers.EulerDiscreteScheduler.add_noise = spy  # type: ignore[method-assign]
    try:
        render(loaded, jobs, inputs)
    finally:
        diffusers.EulerDiscreteScheduler.add_noise = original  # type: ignore[method-assign]
    return seen


def test_the_hires_pass_is_noised_with_the_variation_at_its_size(loaded: LoadedModel) -> None:
    # A1111 (processing.py, sample_hr_pass): an ImageRNG of the hires latent shape with the same seeds,
    # subseeds and strength, then rng.next()
    varied = job(model_hash=loaded.identity, steps=3, sampler="Euler", subseed=9, subseed_strength=0.4,
                 hires={"scale": 2, "steps": 2, "denoising_strength": 0.5})
    start, = noised(loaded, [varied])
    want = job_noise(varied, torch.Generator("cpu").manual_seed(5), 4, 8, size=(128, 128))
    assert torch.equal(start[0], want)
    assert not torch.equal(want, draw(5, (4, 16, 16)))  # not the seed's plain draw


def test_img2img_is_noised_with_the_variation(loaded: LoadedModel) -> None:
    import hashlib

    init = Image.new("RGB", (64, 64), (40, 120, 200))
    ref = {"key": "inputs/i.png", "sha256": hashlib.sha256(init.tobytes()).hexdigest(), "width": 64, "height": 64}
    varied = job(model_hash=loaded.identity, steps=4, sampler="Euler", strength=0.5, init_image=ref,
                 subseed=9, subseed_strength=0.7, seed_resize_from=[96, 96])
    start, = noised(loaded, [varied], {varied.id: (init, None)})
    assert torch.equal(start[0], job_noise(varied, torch.Generator("cpu").manual_seed(5), 4, 8))


def test_inpainting_at_full_strength_keeps_the_variation(loaded: LoadedModel) -> None:
    # at strength 1 diffusers' inpaint pipeline starts from pure noise and adds none to the init
    # latents: the variation goes in as its latents (it was dropped before: the same image either way)
    import hashlib

    init = Image.new("RGB", (64, 64), (40, 120, 200))
    mask = Image.new("L", (64, 64), 255)
    ref = {"key": "inputs/i.png", "sha256": hashlib.sha256(init.tobytes()).hexdigest(), "width": 64, "height": 64}
    mref = {"key": "inputs/m.png", "sha256": hashlib.sha256(mask.tobytes()).hexdigest(), "width": 64, "height": 64}
    base = {"model_hash": loaded.identity, "steps": 3, "sampler": "Euler", "strength": 1.0, "init_image": ref,
            "mask_image": mref, "mask_blur": 0}
    plain, varied = job(**base), job(**base, subseed=9, subseed_strength=0.6)
    a, b, again = (np.asarray(render(loaded, [j], {j.id: (init, mask)})[0], dtype=np.int16)
                   for j in (plain, varied, varied))
    assert np.abs(a - b).max() > 0
    assert np.array_equal(b, again)
