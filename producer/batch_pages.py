"""A batch's results a page at a time (for the HTTP API): its finished images with their sidecars and
presigned links, and its failures with their reasons.

Cheap whatever the batch's size: which jobs are done comes from the progress board's bitmap (one
Redis read); a page costs a GET of each of its images' sidecars and a HEAD of each thumbnail. The
batch's job list is the gallery's (browse.JobLists: read from jobs.jsonl once, kept for a few
batches)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Any

from sdfarm.layout import failed_prefix, image_key, sidecar_key, thumbnail_key
from sdfarm.progress import ProgressBoard
from sdfarm.store import MissingObject, Store

from .browse import JobLists

_THREADS = 16  # S3 requests of one page in flight


@dataclass(frozen=True)
class Image:
    """A finished image: its job, what rendered it (from the sidecar) and links to its objects."""

    index: int
    job_id: str
    seed: int
    prompt: str
    negative_prompt: str
    model: str
    infotext: str
    width: int
    height: int
    bytes: int
    sha256: str
    created_at: str
    image_url: str
    sidecar_url: str
    thumbnail_url: str | None  # None: the worker wrote no thumbnail (an older worker)


@dataclass(frozen=True)
class ImagePage:
    total: int  # images the batch has so far (jobs done)
    images: list[Image]


@dataclass(frozen=True)
class Failure:
    index: int
    job_id: str
    reason: str
    worker: str
    at: float


def set_bits(bitmap: bytes, skip: int, limit: int) -> list[int]:
    """Positions of the set bits of a bitmap (bit i, most significant first, is position i): `limit`
    of them at most, after the first `skip`."""
    found: list[int] = []
    for byte_index, byte in enumerate(bitmap):
        if not byte:
            continue
        for bit in range(8):
            if byte & (0x80 >> bit):
                if skip:
                    skip -= 1
                    continue
                found.append(byte_index * 8 + bit)
                if len(found) == limit:
                    return found
    return found


def image_page(store: Store, board: ProgressBoard, job_lists: JobLists, batch_id: str, offset: int, limit: int,
               expires_s: int) -> ImagePage:
    """The batch's finished images in batch order, `limit` of them from the `offset`th."""
    bits = board.done_bits(batch_id)
    rows = job_lists.rows(batch_id)  # in batch order: row i is job i
    indexes = [i for i in set_bits(bits, offset, limit) if i < len(rows)]

    def one(index: int) -> Image | None:
        job_id = rows[index].job_id
        try:
            meta = store.get_json(sidecar_key(job_id))
        except MissingObject:  # a done bit without its sidecar: not an image to show
            return None
        thumb = thumbnail_key(job_id)
        return _image(index, job_id, meta, store.presigned_get(image_key(job_id), expires_s),
                      store.presigned_get(sidecar_key(job_id), expires_s),
                      store.presigned_get(thumb, expires_s) if store.exists(thumb) else None)

    with ThreadPoolExecutor(min(_THREADS, max(len(indexes), 1))) as pool:
        images = [image for image in pool.map(one, indexes) if image is not None]
    return ImagePage(total=sum(bin(byte).count("1") for byte in bits), images=images)


def _image(index: int, job_id: str, meta: dict[str, Any], image_url: str, sidecar_url: str,
           thumbnail_url: str | None) -> Image:
    job, image = meta.get("job", {}), meta.get("image", {})
    return Image(index=index, job_id=job_id, seed=int(meta.get("seed", job.get("seed", 0))),
                 prompt=str(job.get("prompt", "")), negative_prompt=str(job.get("negative_prompt", "")),
                 model=str(job.get("model", "")), infotext=str(meta.get("infotext", "")),
                 width=int(image.get("width", 0)), height=int(image.get("height", 0)),
                 bytes=int(image.get("bytes", 0)), sha256=str(image.get("sha256", "")),
                 created_at=str(meta.get("created_at", "")), image_url=image_url, sidecar_url=sidecar_url,
                 thumbnail_url=thumbnail_url)


def failures(store: Store, batch_id: str, limit: int) -> list[Failure]:
    """Up to `limit` of the batch's failed jobs with the reasons their workers recorded, by index."""
    keys = list(islice(store.keys(failed_prefix(batch_id)), limit))

    def one(key: str) -> Failure | None:
        try:
            record = store.get_json(key)
        except MissingObject:  # retried since it was listed
            return None
        return Failure(index=int(record.get("index", -1)), job_id=str(record.get("job_id", "")),
                       reason=str(record.get("reason", "")), worker=str(record.get("worker", "")),
                       at=float(record.get("at", 0.0)))

    with ThreadPoolExecutor(min(_THREADS, max(len(keys), 1))) as pool:
        found = [f for f in pool.map(one, keys) if f is not None]
    return sorted(found, key=lambda f: f.index)
