"""The tiny model on CUDA through load_model, eager and compiled: fp16, channels_last, chunks whose
images do not depend on their chunk-mates (nor on padding), compiled against eager, and an
out-of-memory split that really runs out of memory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from sdfarm.jobs import RenderJob
from sdfarm.models import Registry
from tests.conftest import TINY
from tests.gpu.conftest import CHUNK_MAX_DIFF, COMPILED_MEAN_DIFF, differences, pixels
from worker.pipeline import LoadedModel, load_model
from worker.render import render, render_split

PROMPTS = ["a red fox in snow", "a lighthouse at dusk", "a bowl of ramen, steam", "an origami owl"]


@pytest.fixture(scope="module")
def eager(registry: Registry) -> LoadedModel:
    return load_model(registry, TINY, "cuda", compile=False)


@pytest.fixture(scope="module")
def compiled(registry: Registry, cache_dir: Path) -> LoadedModel:
    """Every call at 4 images (a chunk of 4 as it is, one job alone padded); graphs cached where the
    tier's workers (SDFARM_CACHE_DIR) find them."""
    return load_model(registry, TINY, "cuda", compile=True, static_batch=4, cache_root=cache_dir)


@pytest.fixture(params=["eager", "compiled"])
def loaded(request: pytest.FixtureRequest) -> LoadedModel:
    model: LoadedModel = request.getfixturevalue(request.param)
    return model


def job(loaded: LoadedModel, index: int, **changes: Any) -> RenderJob:
    return RenderJob.model_validate({"model": TINY, "model_hash": loaded.identity, "prompt": PROMPTS[index % 4],
                                     "negative_prompt": "blurry", "seed": 100 + index, "width": 64, "height": 64,
                                     "steps": 6, **changes})


def test_the_pipeline_is_fp16_on_cuda_with_the_unet_in_channels_last(loaded: LoadedModel,
                                                                      request: pytest.FixtureRequest) -> None:
    assert loaded.device.type == "cuda"
    assert loaded.compiled is (request.node.callspec.params["loaded"] == "compiled")
    assert loaded.dtype == torch.float16
    pipe = loaded.pipe
    for name in ("unet", "vae", "text_encoder"):
        dtypes = {p.dtype for p in getattr(pipe, name).parameters()}
        assert dtypes == {torch.float16}, f"{name} holds {dtypes}"
    convs = [p for p in pipe.unet.parameters() if p.dim() == 4]
    assert convs, "the UNet has convolution weights"
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)


def test_a_chunk_of_four_renders_and_each_image_is_its_job_alone(loaded: LoadedModel,
                                                                 record_property: Callable[[str, object], None]
                                                                 ) -> None:
    jobs = [job(loaded, i) for i in range(4)]
    images = render(loaded, jobs)
    assert [im.size for im in images] == [(64, 64)] * 4
    for image in images:  # the decode refuses NaN, so these are finite; a blank frame would show here
        assert pixels(image).std() > 1
        assert 5 < pixels(image).mean() < 250
    assert min(differences(a, b)[1] for i, a in enumerate(images) for b in images[i + 1:]) > 10  # four pictures
    worst = 0
    for j, in_chunk in zip(jobs, images, strict=True):
        alone = render(loaded, [j])[0]  # compiled: padded with copies of itself to the static batch
        worst = max(worst, differences(alone, in_chunk)[1])
    record_property("alone_vs_chunk_max_levels", worst)
    assert worst <= CHUNK_MAX_DIFF


def test_compiled_images_match_eager_within_the_stated_tolerance(eager: LoadedModel, compiled: LoadedModel,
                                                                 record_property: Callable[[str, object], None]
                                                                 ) -> None:
    jobs = [job(eager, i) for i in range(4)]
    pairs = [differences(a, b) for a, b in zip(render(eager, jobs), render(compiled, jobs), strict=True)]
    means, maxes = [m for m, _ in pairs], [x for _, x in pairs]
    record_property("compiled_vs_eager_mean_levels", round(max(means), 3))
    record_property("compiled_vs_eager_max_levels", max(maxes))
    assert max(means) <= COMPILED_MEAN_DIFF, pairs


def peak_bytes(fn: Callable[[], object]) -> int:
    """Device memory fn takes at its peak, above what is allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def test_a_chunk_that_really_runs_out_of_memory_is_split_and_gives_the_single_images(
        eager: LoadedModel, record_property: Callable[[str, object], None]) -> None:
    jobs = [job(eager, i, width=512, height=512, steps=2) for i in range(8)]
    singles = [render(eager, [j])[0] for j in jobs]
    per_image = peak_bytes(lambda: render(eager, jobs[:1]))
    attempts: list[tuple[int, str]] = []

    def observed(model: LoadedModel, chunk: list[RenderJob]) -> list[Image.Image]:
        try:
            images = render(model, chunk)
        except torch.OutOfMemoryError:
            attempts.append((len(chunk), "out of memory"))
            raise
        attempts.append((len(chunk), "rendered"))
        return images

    # Cap this process at what it holds now plus three images' worth: a chunk of 8 cannot fit, one image can.
    torch.cuda.empty_cache()
    cap = torch.cuda.memory_reserved() + 3 * per_image
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(eager.device).total_memory)
    try:
        images = render_split(eager, jobs, observed)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    record_property("oom_split_attempts", attempts)
    record_property("oom_split_per_image_mib", round(per_image / 2**20, 1))
    assert attempts[0] == (8, "out of memory")
    assert any(state == "rendered" for _, state in attempts)
    assert sum(n for n, state in attempts if state == "rendered") == 8  # every job rendered exactly once
    for image, single in zip(images, singles, strict=True):
        assert differences(image, single)[1] <= CHUNK_MAX_DIFF
    whole = render(eager, jobs)  # without the cap the chunk fits: the cap, not the chunk, ran out
    for image, single in zip(whole, singles, strict=True):
        assert differences(image, single)[1] <= CHUNK_MAX_DIFF


LONG = "a lighthouse on a cliff at dusk, storm clouds, crashing waves, seagulls, " * 2  # two 75-token chunks


@pytest.mark.parametrize("prompt", ["a [red:blue:0.5] fox AND a hen:0.6", LONG])
def test_scheduled_and_long_prompts_render_on_cuda_as_eager(eager: LoadedModel, compiled: LoadedModel,
                                                            prompt: str) -> None:
    """The UNet hooks (prompt editing and AND on the scheduled path; a cond and uncond of different
    lengths masked) run eagerly around the CUDA UNet, eager and compiled, fp16; a job renders alone as
    in a chunk."""
    jobs = [job(eager, i, prompt=prompt, sampler="DPM++ 2M SDE") for i in range(3)]
    alone = render(eager, jobs[:1])[0]
    chunked = render(eager, jobs)
    assert differences(alone, chunked[0])[1] <= CHUNK_MAX_DIFF
    assert pixels(alone).std() > 0
    fast = render(compiled, [job(compiled, 0, prompt=prompt, sampler="DPM++ 2M SDE")])[0]
    assert differences(alone, fast)[0] <= COMPILED_MEAN_DIFF
