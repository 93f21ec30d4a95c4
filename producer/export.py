"""Export a finished batch in the formats trainers load, to a local folder or an S3 prefix.

- imagefolder: images + metadata.jsonl (Hugging Face `datasets.load_dataset("imagefolder", ...)`)
- webdataset: tar shards of <key>.png + <key>.json (`webdataset.WebDataset(...)`)
- parquet: manifest.parquet, one row per image: parameters, keys, hashes (`pyarrow`, pandas, polars)
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdfarm.errors import InvalidInput
from sdfarm.layout import image_key, sidecar_key
from sdfarm.store import MissingObject, Store

from .control import read_batch_jobs

FORMATS = ("imagefolder", "webdataset", "parquet")


@dataclass(frozen=True)
class Sample:
    key: str  # <index>_<job_id>: no dots, as WebDataset wants
    png: bytes
    sidecar: dict[str, Any]

    def row(self) -> dict[str, Any]:
        """One flat record of everything a training script filters or conditions on."""
        job, side = self.sidecar["job"], self.sidecar
        return {
            "key": self.key, "job_id": side["job_id"], "batch_id": side["batch_id"], "index": side["index"],
            "prompt": job["prompt"], "negative_prompt": job["negative_prompt"], "seed": job["seed"],
            "width": job["width"], "height": job["height"], "steps": job["steps"],
            "guidance_scale": job["guidance_scale"], "sampler": job["sampler"],
            "schedule_type": job["schedule_type"], "clip_skip": job["clip_skip"], "model": job["model"],
            "model_hash": job["model_hash"], "image_key": side["image"]["key"], "image_sha256": side["image"]["sha256"],
            "infotext": side["infotext"], "worker": side["worker"]["hostname"], "created_at": side["created_at"],
        }


def samples(store: Store, batch_id: str) -> list[Sample]:
    """The batch's finished images, in batch order (jobs with no output are left out)."""
    jobs = read_batch_jobs(store, batch_id)

    def load(index_job: tuple[int, Any]) -> Sample | None:
        index, job = index_job
        try:
            side = store.get_json(sidecar_key(job.id))
            return Sample(f"{index:06d}_{job.id}", store.get(image_key(job.id)), side)
        except MissingObject:
            return None

    with ThreadPoolExecutor(8) as pool:
        return [s for s in pool.map(load, jobs) if s is not None]


def write_imagefolder(items: list[Sample], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in items:
        (folder / f"{s.key}.png").write_bytes(s.png)
        lines.append(json.dumps({"file_name": f"{s.key}.png", **s.row()}, ensure_ascii=False))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return [folder / "metadata.jsonl", *(folder / f"{s.key}.png" for s in items)]


def write_webdataset(items: list[Sample], folder: Path, shard_size: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for n, start in enumerate(range(0, len(items), shard_size)):
        path = folder / f"shard-{n:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for s in items[start:start + shard_size]:
                for name, data in ((f"{s.key}.png", s.png),
                                   (f"{s.key}.json", json.dumps(s.sidecar, ensure_ascii=False).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    info.mtime = 0  # the same batch gives byte-identical shards
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def write_parquet(items: list[Sample], folder: Path) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist([s.row() for s in items]), path)
    return [path]


def export(store: Store, batch_id: str, fmt: str, dest: str, shard_size: int = 1000) -> tuple[int, list[str]]:
    """Write the export to dest (a folder, or s3://bucket/prefix). Returns (images, files written)."""
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown export format {fmt!r} (allowed: {', '.join(FORMATS)})")
    if shard_size < 1:
        raise InvalidInput(f"shard size {shard_size} is not allowed (allowed: 1 or more)")
    items = samples(store, batch_id)
    if not items:
        raise InvalidInput(f"batch {batch_id} has no finished images to export")

    def write(folder: Path) -> list[Path]:
        if fmt == "imagefolder":
            return write_imagefolder(items, folder)
        if fmt == "webdataset":
            return write_webdataset(items, folder, shard_size)
        return write_parquet(items, folder)

    if not dest.startswith("s3://"):
        return len(items), [str(p) for p in write(Path(dest))]
    bucket, _, prefix = dest.removeprefix("s3://").partition("/")
    with tempfile.TemporaryDirectory() as tmp:
        files = write(Path(tmp))
        keys = [f"{prefix.rstrip('/')}/{p.relative_to(tmp).as_posix()}".lstrip("/") for p in files]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda pk: store.client.put_object(Bucket=bucket, Key=pk[1], Body=pk[0].read_bytes()),
                          zip(files, keys, strict=True)))
    return len(items), [f"s3://{bucket}/{k}" for k in keys]
