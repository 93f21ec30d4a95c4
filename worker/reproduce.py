"""`sdfarm reproduce`: render a stored image again from its sidecar alone, in this process, and say
how far the new pixels are from the stored ones.

The job comes from the sidecar (the registry must still hold the same weights and files: each is
checked by its sha256, as a worker checks them); the model loads on the device asked for, as a
worker's would. On the worker configuration that rendered it the difference is the renderer's own
determinism (a few 1/255 steps on a CPU, none on the same GPU type); anything larger means another
configuration or changed weights.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdfarm.errors import InvalidInput
from sdfarm.jobs import RECORDED, RenderJob
from sdfarm.layout import image_key, sidecar_key
from sdfarm.models import Registry
from sdfarm.settings import Settings
from sdfarm.store import Store

from .assets import AssetFiles
from .masks import MaskModels
from .pipeline import load_model
from .render import prepare, render


@dataclass(frozen=True)
class Reproduction:
    job_id: str
    image: Image.Image
    max_diff: int  # the largest difference of one channel of one pixel, 0..255
    mean_diff: float
    pixels_differing: int
    pixels: int
    rendered_by: str  # the stored image's worker: hostname, device, compiled or not


def job_id_of(key: str) -> str:
    """A job id from what a user holds: the id, `renders/<id>.png` or `.json`, or an s3:// URL of them."""
    stem = key.rsplit("/", 1)[-1].removesuffix(".png").removesuffix(".json")
    if len(stem) != 32 or any(c not in "0123456789abcdef" for c in stem):
        raise InvalidInput(f"{key!r} names no job (expected a job id, or renders/<job id>.png)")
    return stem


def reproduce(settings: Settings, key: str, device: str) -> Reproduction:
    job_id = job_id_of(key)
    store = Store.from_settings(settings)
    sidecar = store.get_json(sidecar_key(job_id))
    job = RenderJob.model_validate(sidecar["job"], context=RECORDED)
    registry = Registry.from_settings(settings)
    if (held := registry.identity(job.model)) != job.model_hash:
        raise InvalidInput(f"model {job.model!r}: the registry holds other weights ({held[:10]}) than the image"
                           f" was rendered with ({job.model_hash[:10]})")
    assets = AssetFiles(registry, store, settings.cache_dir)
    loaded = load_model(registry, job.model, device, assets)
    inputs = prepare(loaded, assets, MaskModels(loaded.device), [job])
    image = render(loaded, [job], inputs)[0]
    with Image.open(io.BytesIO(store.get(image_key(job_id)))) as stored:
        before = np.asarray(stored.convert("RGB")).astype(np.int16)
    after = np.asarray(image.convert("RGB")).astype(np.int16)
    if before.shape != after.shape:
        raise InvalidInput(f"job {job_id}: the stored image is {before.shape[1]}x{before.shape[0]}, the render"
                           f" {after.shape[1]}x{after.shape[0]}")
    diff = np.abs(before - after)
    worker = sidecar.get("worker", {})
    rendered_by = f"{worker.get('hostname', '?')} ({worker.get('device', '?')}" + \
        (", compiled)" if worker.get("compiled") else ")")
    return Reproduction(job_id, image, int(diff.max()), float(diff.mean()), int((diff.max(axis=2) > 0).sum()),
                        diff.shape[0] * diff.shape[1], rendered_by)
