"""Out of GPU memory: the failed attempt's memory is free before the halves run.

On CUDA, a retry from inside the `except` block cannot work: the exception's traceback keeps the
failed call's frames, and so its tensors, alive, and empty_cache() frees nothing. The tensors here
stand in for a failed call's activations; the halves check that they are gone.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from PIL import Image

from sdfarm.jobs import RenderJob
from sdfarm.models import Registry
from worker.pipeline import LoadedModel, load_model
from worker.render import render, render_split


@pytest.fixture(scope="module")
def loaded(registry: Registry) -> LoadedModel:
    return load_model(registry, "tiny-sd15", "cpu")


def jobs(loaded: LoadedModel, n: int) -> list[RenderJob]:
    return [RenderJob.model_validate({"model": "tiny-sd15", "model_hash": loaded.identity, "seed": i,
                                      "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2})
            for i in range(n)]


@pytest.mark.parametrize("static_batch", [None, 4])
def test_the_failed_attempt_is_freed_before_the_chunk_is_split(loaded: LoadedModel, static_batch: int | None
                                                               ) -> None:
    attempts: list[weakref.ref[torch.Tensor]] = []

    def small_device(model: LoadedModel, part: list[RenderJob]) -> list[Image.Image]:
        assert all(ref() is None for ref in attempts), "a failed attempt's tensors are still alive"
        if len(part) > 1 and (model.static_batch or 0) != 1:
            activations = torch.zeros(1024)  # what the failed call held when it ran out of memory
            attempts.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return render(model, part)

    loaded.static_batch = static_batch
    try:
        images = render_split(loaded, jobs(loaded, 2), small_device)
    finally:
        loaded.static_batch = None
    assert len(images) == 2
    assert attempts
