"""Download a batch's images and sidecars with a manifest; draw a contact sheet."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from sdfarm.errors import InvalidInput
from sdfarm.extra_networks import lora_tag, lora_tags
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


CAPTION_FONT_PX = 11
CAPTION_LINES = 3  # the prompt's; the "#index seed" line comes above them
CAPTION_INK = (24, 24, 24)
CAPTION_MARGIN = 2  # pixels left and right of a caption, inside its cell
ELLIPSIS = "…"

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def caption_font(size: int = CAPTION_FONT_PX) -> Font:
    """Pillow's built-in font (no font file): scalable from Pillow 10.1, the fixed bitmap before."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow 10.0: no size
        return ImageFont.load_default()


def caption_prompt(folder: Path, row: dict[str, Any]) -> str:
    """The job's prompt from the image's sidecar (the manifest's copy when that is unreadable), and
    the sidecar's LoRAs that the prompt does not already name as <lora:name:w> tags, then its negative
    prompt, if any ("| negative: ...")."""
    meta: dict[str, Any] = {}
    try:
        if isinstance(read := json.loads((folder / row["sidecar"]).read_text()), dict):
            meta = read
    except (KeyError, OSError, ValueError):
        pass
    job: dict[str, Any] = meta["job"] if isinstance(meta.get("job"), dict) else {}
    prompt = str(job.get("prompt") or meta.get("prompt") or row.get("prompt") or "")
    try:
        tagged = {tag.name for tag in lora_tags(prompt)}
    except ValueError:
        tagged = set()
    unet: dict[Any, Any] = {x.get("name"): x.get("unet_weight") for x in job.get("loras") or ()
                           if isinstance(x, dict)}
    for lora in meta.get("loras") or ():
        if isinstance(lora, dict) and lora.get("name") and lora["name"] not in tagged:
            name = str(lora["name"])
            try:
                unet_weight = unet.get(name)
                tag = lora_tag(name, float(lora.get("weight", 1.0)),
                               None if unet_weight is None else float(unet_weight))
            except (TypeError, ValueError):
                tag = f"<lora:{name}>"
            prompt = f"{prompt} {tag}" if prompt else tag
    if negative := str(job.get("negative_prompt") or ""):
        prompt = f"{prompt} | negative: {negative}"
    return prompt


def wrap_caption(text: str, font: Font, width: float, lines: int = CAPTION_LINES) -> list[str]:
    """`text` word-wrapped to `width` pixels in `font` over at most `lines` lines; a word wider than
    a line is split, and text left over ends the last line with "…"."""
    def fits(s: str) -> bool:
        return font.getlength(s) <= width

    out: list[str] = []
    words = text.split()
    while words and len(out) < lines:
        line = ""
        while words and fits(f"{line} {words[0]}".lstrip()):
            line = f"{line} {words.pop(0)}".lstrip()
        if not line:  # a word wider than the line: as many of its characters as fit
            word, cut = words[0], 1
            while cut < len(word) and fits(word[: cut + 1]):
                cut += 1
            line, words[:1] = word[:cut], [word[cut:]] if word[cut:] else []
        out.append(line)
    if words:
        last = out[-1]
        while last and not fits(last.rstrip() + ELLIPSIS):
            last = last[:-1]
        out[-1] = last.rstrip() + ELLIPSIS
    return out


def contact_sheet(folder: Path, out: Path, thumb: int = 128, columns: int = 8) -> Path:
    """A grid of a fetched batch's images in batch order, each scaled to fit a `thumb`-pixel square
    (aspect ratio kept, centred on white) over a caption: its index and seed, then its prompt (with
    the sidecar's LoRAs) over at most three lines."""
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    done = [r for r in rows if r["status"] == "done"]
    if not done:
        raise ValueError(f"no images in {folder}")
    cols = min(columns, len(done))
    font = caption_font()
    line_h = math.ceil(font.getbbox("Ágjy|")[3]) + 1
    caption = 2 + (1 + CAPTION_LINES) * line_h + 2
    sheet = Image.new("RGB", (cols * thumb, -(-len(done) // cols) * (thumb + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, row in enumerate(done):
        x, y = n % cols * thumb, n // cols * (thumb + caption)
        with Image.open(folder / row["image"]) as img:
            tile = ImageOps.contain(img.convert("RGBA"), (thumb, thumb), Image.Resampling.LANCZOS)
        sheet.paste(tile, (x + (thumb - tile.width) // 2, y + (thumb - tile.height) // 2), tile)
        text = [f"#{row['index']} seed {row['seed']}",
                *wrap_caption(caption_prompt(folder, row), font, thumb - 2 * CAPTION_MARGIN)]
        for i, line in enumerate(text):
            draw.text((x + CAPTION_MARGIN, y + thumb + 2 + i * line_h), line, fill=CAPTION_INK, font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
