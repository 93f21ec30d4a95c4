"""A rendered image becomes a PNG (A1111 infotext + the job's JSON inside) and a JSON sidecar."""

from __future__ import annotations

import hashlib
import io
import json
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

import sdfarm
from sdfarm.infotext import job_infotext
from sdfarm.jobs import RenderJob

PNG_JOB_KEY = "sdfarm"  # second text chunk: the full job as JSON


def versions() -> dict[str, str]:
    return {name: version(name) for name in ("torch", "diffusers", "transformers")} | {
        "sdfarm": sdfarm.__version__,
        "python": platform.python_version(),
    }


@dataclass(frozen=True)
class Encoded:
    png: bytes
    sha256: str
    infotext: str


def encode_png(image: Image.Image, job: RenderJob, model_short_hash: str,
               lora_hashes: Mapping[str, str] | None = None, *, model_name: str | None = None,
               vae_name: str | None = None, refiner_name: str | None = None) -> Encoded:
    """lora_hashes: A1111's short LoRA hashes by sha256 (worker.assets.AssetFiles.lora_hashes);
    model_name, vae_name, refiner_name: as job_infotext records them."""
    infotext = job_infotext(job, model_short_hash, lora_hashes, model_name=model_name, vae_name=vae_name,
                            refiner_name=refiner_name)
    info = PngInfo()
    info.add_text("parameters", infotext)  # tEXt, or iTXt when not Latin-1 (Pillow decides)
    info.add_text(PNG_JOB_KEY, json.dumps({"id": job.id, **job.model_dump(mode="json")}, ensure_ascii=False))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, compress_level=4)
    data = buf.getvalue()
    return Encoded(data, hashlib.sha256(data).hexdigest(), infotext)


def sidecar(
    job: RenderJob,
    batch_id: str,
    index: int,
    encoded: Encoded,
    image_key: str,
    timings: dict[str, float],
    worker: dict[str, Any],
    lib_versions: dict[str, str],
) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "job_id": job.id,
        "batch_id": batch_id,
        "index": index,
        "job": job.model_dump(mode="json"),
        "seed": job.seed,
        "model": {"name": job.model, "sha256": job.model_hash, "hash": job.model_hash[:10]},
        "loras": [{"name": x.name, "weight": x.weight, "sha256": x.sha256} for x in job.loras],
        "embeddings": [{"name": x.name, "sha256": x.sha256} for x in job.embeddings],
        "sampler": job.sampler,
        "schedule_type": job.schedule_type,
        "infotext": encoded.infotext,
        "image": {"key": image_key, "sha256": encoded.sha256, "bytes": len(encoded.png),
                  "width": job.output_size[0], "height": job.output_size[1], "format": "png"},
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "worker": worker,
        "versions": lib_versions,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
