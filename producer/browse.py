"""What the gallery shows of a batch: every job in batch order, done, failed (with its reason) or not
yet, filtered by prompt text or seed and cut into pages.

A batch's job list (index, id, prompt, seed) is read once from its record (jobs.jsonl never changes
once written) and kept for a few batches. Which jobs are done comes from the progress bitmap in
Redis (one read), or, for a batch Redis no longer holds, from each shown job's sidecar; which failed,
from the failure records in S3 (batches/<id>/failed/), which hold the reasons.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sdfarm.layout import failed_key, failed_prefix, sidecar_key
from sdfarm.progress import ProgressBoard
from sdfarm.store import MissingObject, Store

from .control import batch_rows

DONE, FAILED, PENDING = "done", "failed", "pending"
PAGE_SIZE = 48


@dataclass(frozen=True)
class JobRow:
    index: int
    job_id: str
    prompt: str
    seed: int


@dataclass(frozen=True)
class Tile:
    row: JobRow
    status: str  # DONE, FAILED or PENDING
    reason: str = ""  # why it failed


@dataclass(frozen=True)
class Page:
    tiles: list[Tile]
    matched: int  # jobs that pass the filter
    number: int  # 1-based
    pages: int


class JobLists:
    """Batches' job lists, the most recently used kept (at most max_batches; max_rows rows in all,
    but always the latest)."""

    def __init__(self, store: Store, max_batches: int = 8, max_rows: int = 200_000) -> None:
        self.store = store
        self.max_batches = max_batches
        self.max_rows = max_rows
        self._kept: OrderedDict[str, list[JobRow]] = OrderedDict()
        self._lock = threading.Lock()

    def rows(self, batch_id: str) -> list[JobRow]:
        with self._lock:
            if batch_id in self._kept:
                self._kept.move_to_end(batch_id)
                return self._kept[batch_id]
        rows = read_rows(self.store, batch_id)
        with self._lock:
            self._kept[batch_id] = rows
            while len(self._kept) > 1 and (len(self._kept) > self.max_batches
                                           or sum(map(len, self._kept.values())) > self.max_rows):
                self._kept.popitem(last=False)
        return rows


def read_rows(store: Store, batch_id: str) -> list[JobRow]:
    """The batch's jobs from its record: index, id, prompt and seed only (not validated again: the
    gallery shows them, it renders nothing)."""
    return [JobRow(int(row["index"]), str(row["id"]), str(row["job"]["prompt"]), int(row["job"]["seed"]))
            for row in batch_rows(store, batch_id)]


def matching(rows: list[JobRow], text: str = "", seed: int | None = None) -> list[JobRow]:
    """Rows whose prompt holds `text` (case-insensitive) and, given a seed, with that seed."""
    needle = text.casefold()
    return [r for r in rows if (not needle or needle in r.prompt.casefold()) and (seed is None or r.seed == seed)]


def is_set(bits: bytes, index: int) -> bool:
    """Bit `index` of a Redis bitmap (bit 0 is the high bit of byte 0)."""
    byte = index >> 3
    return byte < len(bits) and bool(bits[byte] & (0x80 >> (index & 7)))


def page_of(store: Store, board: ProgressBoard, batch_id: str, rows: list[JobRow], number: int,
            size: int = PAGE_SIZE) -> Page:
    """Page `number` (1-based, clamped) of `rows`, each job's status read."""
    pages = max(1, math.ceil(len(rows) / size))
    number = min(max(number, 1), pages)
    shown = rows[(number - 1) * size:number * size]
    done = _done(store, board, batch_id, shown)
    failed = {k.rsplit("/", 1)[1].removesuffix(".json") for k in store.keys(failed_prefix(batch_id))}
    why = _reasons(store, batch_id, [r.job_id for r in shown if r.job_id in failed and r.job_id not in done])
    tiles = [Tile(r, DONE) if r.job_id in done else Tile(r, FAILED, why[r.job_id]) if r.job_id in why
             else Tile(r, PENDING) for r in shown]
    return Page(tiles, len(rows), number, pages)


def _done(store: Store, board: ProgressBoard, batch_id: str, shown: list[JobRow]) -> set[str]:
    if board.read(batch_id) is not None:
        bits = board.done_bits(batch_id)
        return {r.job_id for r in shown if is_set(bits, r.index)}
    with ThreadPoolExecutor(8) as pool:  # no live progress (expired): the sidecars say
        have = list(pool.map(lambda r: store.exists(sidecar_key(r.job_id)), shown))
    return {r.job_id for r, ok in zip(shown, have, strict=True) if ok}


def _reasons(store: Store, batch_id: str, job_ids: list[str]) -> dict[str, str]:
    """The recorded reason of each failed job (read side by side); a record gone since is left out."""
    def one(job_id: str) -> tuple[str, str] | None:
        try:
            return job_id, str(store.get_json(failed_key(batch_id, job_id)).get("reason", ""))
        except MissingObject:  # retried since it was listed
            return None

    with ThreadPoolExecutor(8) as pool:
        return dict(found for found in pool.map(one, job_ids) if found is not None)
