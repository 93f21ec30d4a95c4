"""Download a batch's images and sidecars with a manifest; draw a contact sheet."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from sdfarm.errors import InvalidInput
from sdfarm.jobs import RenderJob
from sdfarm.layout import failed_key, failed_prefix, image_key, sidecar_key
from sdfarm.store import MissingObject, Store

from .control import read_batch_jobs


@dataclass(frozen=True)
class FetchResult:
    folder: Path
    images: int
    missing: int
    failed: int
    manifest: Path


def fetch(store: Store, batch_id: str, dest: Path, threads: int = 8) -> FetchResult:
    """Write <dest>/<index>-<job_id>.png and .json for every finished job, and manifest.jsonl
    with one line per job of the batch: its status (done, failed, missing) and files."""
    dest.mkdir(parents=True, exist_ok=True)
    jobs = read_batch_jobs(store, batch_id)
    failed_ids = {k.rsplit("/", 1)[1].removesuffix(".json") for k in store.keys(failed_prefix(batch_id))}

    def one(index_job: tuple[int, RenderJob]) -> dict[str, Any]:
        index, job = index_job
        stem = f"{index:06d}-{job.id}"
        entry = {"index": index, "job_id": job.id, "prompt": job.prompt, "seed": job.seed}
        try:
            sidecar = store.get(sidecar_key(job.id))  # the commit marker first
            png = store.get(image_key(job.id))
        except MissingObject:
            if job.id in failed_ids:
                reason = store.get_json(failed_key(batch_id, job.id)).get("reason", "")
                return {**entry, "status": "failed", "reason": reason}
            return {**entry, "status": "missing"}
        (dest / f"{stem}.png").write_bytes(png)
        (dest / f"{stem}.json").write_bytes(sidecar)
        return {**entry, "status": "done", "image": f"{stem}.png", "sidecar": f"{stem}.json"}

    with ThreadPoolExecutor(threads) as pool:
        rows = list(pool.map(one, jobs))
    manifest = dest / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    count = {s: sum(1 for r in rows if r["status"] == s) for s in ("done", "missing", "failed")}
    return FetchResult(dest, count["done"], count["missing"], count["failed"], manifest)


MAX_LINK_S = 7 * 24 * 3600


def links(store: Store, batch_id: str, expires_s: int) -> list[dict[str, Any]]:
    """Short-lived presigned GET links to a batch's finished images (never PUT: a PUT link could
    overwrite an output)."""
    if not 1 <= expires_s <= MAX_LINK_S:
        raise InvalidInput(f"expires {expires_s}s is not allowed (allowed: 1..{MAX_LINK_S} seconds)")
    jobs = read_batch_jobs(store, batch_id)
    with ThreadPoolExecutor(8) as pool:
        done = list(pool.map(lambda ij: store.exists(sidecar_key(ij[1].id)), jobs))
    return [{"index": index, "job_id": job.id, "url": store.presigned_get(image_key(job.id), expires_s)}
            for (index, job), ok in zip(jobs, done, strict=True) if ok]


def contact_sheet(folder: Path, out: Path, thumb: int = 128, columns: int = 8) -> Path:
    """A grid of a fetched batch's images, each captioned with its seed, in batch order."""
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    done = [r for r in rows if r["status"] == "done"]
    if not done:
        raise ValueError(f"no images in {folder}")
    cols = min(columns, len(done))
    caption = 14
    sheet = Image.new("RGB", (cols * thumb, -(-len(done) // cols) * (thumb + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, row in enumerate(done):
        with Image.open(folder / row["image"]) as img:
            tile = img.convert("RGB").resize((thumb, thumb), Image.Resampling.LANCZOS)
        x, y = n % cols * thumb, n // cols * (thumb + caption)
        sheet.paste(tile, (x, y))
        draw.text((x + 2, y + thumb + 1), f"#{row['index']} seed {row['seed']}", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
