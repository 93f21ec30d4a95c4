"""The refiner on CUDA: loaded beside the SDXL model in fp16, its eager UNet taking over from the
model's eager or compiled one, SDXL's refiner conditioning on the device, and a refiner of the model's
own weights leaving the image as it was."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sdfarm.jobs import RenderJob
from sdfarm.models import Registry
from tests.conftest import SDXL, XL_REFINER, XL_TWIN
from tests.gpu.conftest import CHUNK_MAX_DIFF, COMPILED_MEAN_DIFF, differences
from worker.assets import AssetFiles
from worker.pipeline import load_model
from worker.refiner import use_refiner
from worker.render import render


def job(registry: Registry, refiner: str | None = None, **changes: Any) -> RenderJob:
    fields: dict[str, Any] = {"model": SDXL, "model_hash": registry.identity(SDXL), "prompt": "a glass teapot",
                              "negative_prompt": "blurry", "seed": 9, "width": 64, "height": 64, "steps": 8,
                              "sampler": "DPM++ 2M", "refiner_switch_at": 0.5}
    if refiner is not None:
        fields["refiner"] = {"name": refiner, "sha256": registry.identity(refiner)}
    else:
        fields.pop("refiner_switch_at")
    return RenderJob.model_validate({**fields, **changes})


@pytest.mark.parametrize("compiled", [False, True])
def test_the_refiner_takes_over_on_cuda_from_an_eager_or_compiled_model(registry: Registry, cache_dir: Path,
                                                                      tmp_path: Path, compiled: bool) -> None:
    files = AssetFiles(registry, None, tmp_path)
    loaded = load_model(registry, SDXL, "cuda", compile=compiled, static_batch=2, cache_root=cache_dir)
    plain = render(loaded, [job(registry)])[0]
    twin = job(registry, XL_TWIN)
    held = use_refiner(loaded, twin, files)
    assert held is not None
    assert (held.device.type, held.dtype) == ("cuda", torch.float16)
    same = render(loaded, [twin])[0]
    if compiled:  # the model's calls compiled, the twin's eager: Inductor's fp16 rounding, as compiled vs eager
        assert differences(plain, same)[0] <= COMPILED_MEAN_DIFF
    else:
        assert differences(plain, same)[1] <= CHUNK_MAX_DIFF
    refined = job(registry, XL_REFINER, hires={"scale": 1.5, "steps": 4, "denoising_strength": 0.5})
    refiner = use_refiner(loaded, refined, files)
    assert refiner is not None
    calls: list[int] = []
    hook = refiner.pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        image = render(loaded, [refined])[0]
    finally:
        hook.remove()
    assert calls  # the refiner's UNet rendered the hires pass's last calls
    assert np.asarray(image).std() > 1
    assert loaded.pipe.unet.config.cross_attention_dim == 32 + 48  # the model's own UNet is given back
