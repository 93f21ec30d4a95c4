"""The renderer in this process, on the tiny random-weight SD1.5-architecture pipeline (CPU)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdfarm.infotext import parse_infotext
from sdfarm.jobs import RenderJob
from sdfarm.models import HashCache, Registry, parse_registry
from sdfarm.samplers import SAMPLERS
from worker.encode import encode_png
from worker.pipeline import LoadedModel, load_model
from worker.render import render


@pytest.fixture(scope="module")
def loaded(registry: Registry) -> LoadedModel:
    return load_model(registry, "tiny-sd15", "cpu")


def job(loaded: LoadedModel, **changes: object) -> RenderJob:
    base = {"model": "tiny-sd15", "model_hash": loaded.identity, "prompt": "a red fox in snow", "seed": 11,
            "width": 64, "height": 64, "steps": 6}
    return RenderJob.model_validate({**base, **changes})


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


STOCHASTIC = ["DPM++ 2M", "Euler a", "DPM++ SDE", "DPM++ 2M SDE"]  # the default, and those that add noise


@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_same_job_same_image(loaded: LoadedModel, sampler: str) -> None:
    a, b = render(loaded, [job(loaded, sampler=sampler)])[0], render(loaded, [job(loaded, sampler=sampler)])[0]
    assert np.array_equal(pixels(a), pixels(b))


@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_alone_and_inside_a_chunk_of_four_give_the_same_image(loaded: LoadedModel, sampler: str) -> None:
    target = job(loaded, seed=5, prompt="a lighthouse", sampler=sampler)
    chunk = [job(loaded, seed=1, prompt="x", sampler=sampler), target,
             job(loaded, seed=2, prompt="y", negative_prompt="z", sampler=sampler),
             job(loaded, seed=3, sampler=sampler)]
    alone = pixels(render(loaded, [target])[0])
    inside = pixels(render(loaded, chunk)[1])
    assert np.abs(alone - inside).max() <= 2


def test_seed_and_prompt_change_the_image(loaded: LoadedModel) -> None:
    base = pixels(render(loaded, [job(loaded)])[0])
    assert np.abs(base - pixels(render(loaded, [job(loaded, seed=12)])[0])).max() > 10
    assert np.abs(base - pixels(render(loaded, [job(loaded, prompt="a blue whale")])[0])).max() > 0


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_renders(loaded: LoadedModel, sampler: str) -> None:
    image = render(loaded, [job(loaded, sampler=sampler, steps=4)])[0]
    assert image.size == (64, 64)
    assert pixels(image).std() > 1  # not a blank frame


def test_schedule_type_and_clip_skip_change_the_image(loaded: LoadedModel) -> None:
    base = pixels(render(loaded, [job(loaded, sampler="DPM++ 2M")])[0])  # Automatic: Karras
    karras = pixels(render(loaded, [job(loaded, sampler="DPM++ 2M Exponential")])[0])
    skip = pixels(render(loaded, [job(loaded, sampler="DPM++ 2M", clip_skip=2)])[0])
    assert np.abs(base - karras).max() > 0
    assert np.abs(base - skip).max() > 0


def test_png_carries_infotext_and_job_json(loaded: LoadedModel) -> None:
    j = job(loaded, negative_prompt="blurry, ugly", prompt="café, 東京")
    encoded = encode_png(render(loaded, [j])[0], j, loaded.short_hash)
    with Image.open(io.BytesIO(encoded.png)) as img:
        text = dict(img.text)  # type: ignore[attr-defined]
    parsed = parse_infotext(text["parameters"])
    assert parsed["Prompt"] == j.prompt
    assert parsed["Negative prompt"] == "blurry, ugly"
    assert parsed["Seed"] == str(j.seed)
    assert parsed["Model hash"] == loaded.identity[:10]
    embedded = json.loads(text["sdfarm"])
    assert embedded["id"] == j.id
    assert RenderJob.model_validate({k: v for k, v in embedded.items() if k != "id"}) == j


def test_single_file_checkpoint_in_ldm_layout_loads_offline_and_renders_the_same(
        loaded: LoadedModel, tiny_model_dir: Path, tmp_path: Path) -> None:
    from tests.ldm import write_single_file

    ckpt = write_single_file(loaded.pipe, tmp_path / "tiny-single.safetensors")
    text = f"models:\n  single:\n    file: {ckpt}\n    config: {tiny_model_dir}\n"
    single_registry = Registry(parse_registry(text, "test", tmp_path), HashCache(tmp_path))
    single = load_model(single_registry, "single", "cpu")
    assert single.identity == hashlib.sha256(ckpt.read_bytes()).hexdigest()  # A1111's model hash basis
    j = job(loaded)
    from_folder = pixels(render(loaded, [j])[0])
    from_file = pixels(render(single, [j.model_copy(update={"model": "single", "model_hash": single.identity})])[0])
    assert np.abs(from_folder - from_file).max() <= 1


def test_out_of_memory_splits_the_chunk_down_to_single_images(loaded: LoadedModel) -> None:
    import torch

    from worker.render import render_split

    calls: list[int] = []

    def small_gpu(model: LoadedModel, jobs: list[RenderJob]) -> list[Image.Image]:
        calls.append(len(jobs))
        if len(jobs) > 1:  # simulated: this "GPU" holds one image at a time
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return render(model, jobs)

    jobs = [job(loaded, seed=s) for s in range(4)]
    images = render_split(loaded, jobs, small_gpu)
    assert calls == [4, 2, 1, 1, 2, 1, 1]
    for image, j in zip(images, jobs, strict=True):
        assert np.abs(pixels(image) - pixels(render(loaded, [j])[0])).max() <= 2

    def no_gpu(model: LoadedModel, jobs: list[RenderJob]) -> list[Image.Image]:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(torch.OutOfMemoryError):
        render_split(loaded, jobs[:2], no_gpu)


@pytest.mark.parametrize("hires", [None, {"scale": 2, "steps": 2, "denoising_strength": 0.6, "upscaler": "Lanczos"}],
                         ids=["plain", "hires-lanczos"])
def test_a_nan_job_fails_alone_and_its_chunk_mates_render_as_they_would_alone(
        loaded: LoadedModel, hires: dict[str, object] | None, caplog: pytest.LogCaptureFixture) -> None:
    """A job queued before weights were bounded (read back as RECORDED): its weight is infinity in
    float32, its latents NaN. It gets its RenderError; the others their images. With hires and an
    image upscaler the first pass is decoded whole, so the NaN fails the batched call: the chunk is
    rendered again in halves down to the job at fault."""
    from sdfarm.errors import RenderError
    from sdfarm.jobs import RECORDED
    from worker.render import render_each

    base = {"model": "tiny-sd15", "model_hash": loaded.identity, "width": 64, "height": 64, "steps": 4,
            "hires": hires}
    absurd = RenderJob.model_validate({**base, "prompt": "a (boat:1" + "0" * 45 + ")", "seed": 2}, context=RECORDED)
    fine = [RenderJob.model_validate({**base, "prompt": p, "seed": s}) for p, s in (("a boat", 1), ("a ship", 3))]
    with caplog.at_level("WARNING", logger="sdfarm.worker"):
        images = render_each(loaded, [fine[0], absurd, fine[1]])
    assert ("rendering them in halves" in caplog.text) == (hires is not None)
    assert isinstance(images[1], RenderError)
    assert "NaN or infinite latents" in str(images[1])
    for image, j in zip((images[0], images[2]), fine, strict=True):
        assert isinstance(image, Image.Image)
        assert np.abs(pixels(image) - pixels(render(loaded, [j])[0])).max() <= 2
    with pytest.raises(RenderError):
        render(loaded, [fine[0], absurd])  # the all-or-nothing form
