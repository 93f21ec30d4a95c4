"""Batches planned as they are consumed (BatchStream) or whole (BatchPlan), from a file, its text
or parsed items: the entry points of the package."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..a1111 import looks_like_infotexts, read_images, read_infotexts
from ..errors import MAX_PROBLEMS, BatchInvalid, InvalidInput, Problem, brief
from ..inputs import Inputs, open_regular
from ..jobs import MAX_SEED, RenderJob, SeedSweep
from ..models import Registry
from .formats import (
    _LINE_READERS,
    FORMATS,
    MAX_FILE_BYTES,
    Lines,
    _file_lines,
    _file_problem,
    _read_document,
    _scan,
    _text_lines,
    read_batch,
)
from .items import ITEM_KEYS, MAX_NAME_CHARS, RawItem, _item_size, cap_problem, control_character
from .planner import _Planner

INFOTEXT_PEEK_BYTES = 64 * 1024  # a .txt whose first 64 KiB hold an infotext's `Steps: ...` line is infotexts


@dataclass(frozen=True)
class BatchPlan:
    """A validated batch: its jobs in order, and the normalised spec recorded in S3."""

    batch_id: str
    name: str
    seed: int
    jobs: tuple[RenderJob, ...]
    spec: dict[str, Any]
    uploads: dict[str, bytes] = field(default_factory=dict)  # local input images: key -> bytes

    @property
    def record(self) -> BatchRecord:
        return BatchRecord(batch_id=self.batch_id, name=self.name, seed=self.seed, job_count=len(self.jobs),
                           spec=self.spec, uploads=self.uploads)


@dataclass(frozen=True)
class BatchRecord:
    """A validated batch less its jobs: the normalised spec recorded in S3 as batch.json, and the
    local input images to upload."""

    batch_id: str
    name: str
    seed: int
    job_count: int
    spec: dict[str, Any]
    uploads: dict[str, bytes]


class _BatchIdHash:
    """The batch id, sha256 of `json.dumps([name, job_ids])` (so the same file gives the same batch),
    fed one job id at a time: the ids of a million jobs are never held together."""

    def __init__(self, name: str) -> None:
        self._hash = hashlib.sha256(("[" + json.dumps(name) + ", [").encode())
        self._pending: list[str] = []
        self._first = True

    def add(self, job_id: str) -> None:
        self._pending.append(job_id)
        if len(self._pending) >= 4096:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            text = ('"' if self._first else ', "') + '", "'.join(self._pending) + '"'
            self._hash.update(text.encode())
            self._pending.clear()
            self._first = False

    def hexdigest(self) -> str:
        self._flush()
        self._hash.update(b"]]")
        return self._hash.hexdigest()[:20]


class BatchStream:
    """A batch planned while it is consumed, so that its jobs never sit in memory all at once:
    iterate it once for its valid jobs in batch order (the index of a job is its position), then
    take `record()`. Validation stays all or nothing: the iteration ends by raising BatchInvalid,
    listing every problem, when there is any, so a consumer writes nothing before it ends.

    `items` is a list (a parsed document, a dataset run), whose jobs are counted against the cap
    before any is validated, or the entries a line file gives as it is read (`counted`: its scan
    counted them), problems with single lines among them; either way validation, and the reading,
    stop after MAX_PROBLEMS problems."""

    def __init__(
        self,
        header: dict[str, Any],
        items: Iterable[RawItem | Problem],
        source: str,
        fmt: str,
        registry: Registry,
        max_jobs: int,
        overrides: Mapping[str, Any] | None = None,
        name: str | None = None,
        inputs: Inputs | None = None,
        counted: bool = False,
    ) -> None:
        planner = _Planner(source, registry, max_jobs, inputs)
        defaults: dict[str, Any] = {**header.get("defaults", {}), **(overrides or {})}
        for key in defaults:
            if key not in ITEM_KEYS or key == "matrix":
                planner.problem(None, f"defaults.{key}", f"unknown field (allowed: {', '.join(ITEM_KEYS[:-1])})")
        batch_seed = header.get("seed", 0)
        if isinstance(batch_seed, bool) or not isinstance(batch_seed, int) or not 0 <= batch_seed <= MAX_SEED:
            planner.problem(None, "seed", f"{brief(batch_seed)} is not allowed (allowed: an integer 0..{MAX_SEED})")
            batch_seed = 0
        batch_name = name or header.get("name") or Path(source).stem
        if not isinstance(batch_name, str) or len(batch_name) > MAX_NAME_CHARS or control_character(batch_name):
            planner.problem(None, "name", f"expected a string of at most {MAX_NAME_CHARS} characters, without"
                                          f" control characters, got {brief(batch_name)}")
            batch_name = Path(source).stem
        top_matrix = planner.check_matrix(None, header["matrix"], "matrix") if "matrix" in header else {}
        self.name: str = batch_name
        self.seed: int = batch_seed
        self._planner, self._items, self._source, self._fmt = planner, items, source, fmt
        self._defaults, self._matrix, self._counted = defaults, top_matrix, counted
        self._raw: list[dict[str, Any]] = []  # each item's data as given: the record keeps it
        self._unread = 0  # lines of a line file that gave a problem, not an item
        self._started = False
        self._record: BatchRecord | None = None

    def __iter__(self) -> Iterator[RenderJob]:
        if self._started:
            raise RuntimeError("a BatchStream is read once")
        self._started = True
        planner = self._planner
        if self._over_cap():  # counted before anything is validated: an explosion costs nothing
            planner.problem(None, "", cap_problem(self._source, planner.max_jobs).message)
            raise BatchInvalid(planner.problems)
        batch_id = _BatchIdHash(self.name)
        models: dict[str, str] = {}
        count = 0
        for job in self._valid_jobs():
            count += 1
            batch_id.add(job.id)
            models[job.model] = job.model_hash
            yield job
        if not self._raw and not self._unread and not planner.stopped:
            planner.problem(None, "", "the batch holds no items")
        if planner.problems:
            raise BatchInvalid(planner.problems[:MAX_PROBLEMS], stopped=planner.stopped)
        digest = batch_id.hexdigest()
        spec = {
            "schema_version": 1,
            "batch_id": digest,
            "name": self.name,
            "seed": self.seed,
            "source": Path(self._source).name,
            "format": self._fmt,
            "defaults": self._defaults,
            "matrix": self._matrix,
            "items": self._raw,
            "job_count": count,
            "models": models,
        }
        self._record = BatchRecord(batch_id=digest, name=self.name, seed=self.seed, job_count=count,
                                   spec=spec, uploads=dict(planner.inputs.uploads))

    def _over_cap(self) -> bool:
        max_jobs = self._planner.max_jobs
        if self._counted or not isinstance(self._items, list):
            return False
        if len(self._items) > max_jobs:
            return True
        plain = _item_size({}, self._defaults, self._matrix)  # an item that sets no count, seeds or matrix
        total = 0
        for raw in self._items:
            data = raw.data if isinstance(raw, RawItem) else {}
            total += _item_size(data, self._defaults, self._matrix) \
                if "count" in data or "seeds" in data or "matrix" in data else plain
            if total > max_jobs:
                return True
        return False

    def _valid_jobs(self) -> Iterator[RenderJob]:
        """Every job in batch order, validated; after the first problem none is given (the rest
        are only checked, until MAX_PROBLEMS)."""
        planner, max_jobs = self._planner, self._planner.max_jobs
        total = 0
        for raw in self._items:
            if isinstance(raw, Problem):
                self._unread += 1
                planner.problems.append(raw)
                if planner.stopped:
                    return
                continue
            self._raw.append(raw.data)
            for base, seeds in planner.expand(raw, self._defaults, self._matrix, self.seed):
                first: RenderJob | None = None  # the combination's first valid job: the others copy it
                sweep: SeedSweep | None = None
                for seed in seeds:
                    total += 1
                    if total > max_jobs:  # the count before said otherwise: a safety net
                        planner.problem(None, "", cap_problem(self._source, max_jobs).message)
                        return
                    if first is not None and isinstance(seed, int) and not isinstance(seed, bool) \
                            and 0 <= seed <= MAX_SEED:
                        sweep = sweep or SeedSweep(first)
                        job: RenderJob | None = sweep.job(seed)
                    else:
                        job = planner.job(raw, {**base, "seed": seed})
                        first = first or job
                    if job is not None and not planner.problems:
                        yield job
                    elif planner.stopped:
                        return
            if planner.stopped:
                return

    def record(self) -> BatchRecord:
        """The batch id, spec and uploads: known once every job has been read."""
        if self._record is None:
            raise RuntimeError("a batch's record is known once all its jobs have been read")
        return self._record

    def plan(self) -> BatchPlan:
        """Every job at once: for batches that fit in memory."""
        jobs = tuple(self)
        r = self.record()
        return BatchPlan(batch_id=r.batch_id, name=r.name, seed=r.seed, jobs=jobs, spec=r.spec, uploads=r.uploads)


def stream_batch(
    text: str,
    source: str,
    fmt: str,
    registry: Registry,
    max_jobs: int,
    overrides: Mapping[str, Any] | None = None,
    name: str | None = None,
    inputs: Inputs | None = None,
) -> BatchStream:
    """Parse one batch file's text; its jobs are expanded and validated as the stream is read.
    Raises BatchInvalid on syntax errors at once."""
    text = text.removeprefix("\ufeff")
    if fmt in _LINE_READERS:
        return _line_stream(_text_lines(text), source, fmt, registry, max_jobs, overrides, name, inputs)
    header, items = read_batch(text, source, fmt, max_jobs)
    return BatchStream(header, items, source, fmt, registry, max_jobs, overrides, name, inputs)


def _line_stream(lines: Lines, source: str, fmt: str, registry: Registry, max_jobs: int,
                 overrides: Mapping[str, Any] | None, name: str | None, inputs: Inputs | None) -> BatchStream:
    """A line format: scanned once (encoding, CSV syntax, the job cap), then read again as the
    stream is consumed, one item at a time."""
    _scan(fmt, lines, source, dict(overrides or {}), max_jobs)
    return BatchStream({}, _LINE_READERS[fmt](lines, source), source, fmt, registry, max_jobs, overrides, name,
                       inputs, counted=True)


def plan_batch(
    text: str,
    source: str,
    fmt: str,
    registry: Registry,
    max_jobs: int,
    overrides: Mapping[str, Any] | None = None,
    name: str | None = None,
    inputs: Inputs | None = None,
) -> BatchPlan:
    """Parse, expand and validate a whole batch. Raises BatchInvalid listing every problem."""
    return stream_batch(text, source, fmt, registry, max_jobs, overrides, name, inputs).plan()


def plan_items(
    header: dict[str, Any],
    items: list[RawItem],
    source: str,
    fmt: str,
    registry: Registry,
    max_jobs: int,
    overrides: Mapping[str, Any] | None = None,
    name: str | None = None,
    inputs: Inputs | None = None,
) -> BatchPlan:
    """Expand and validate parsed items (from a batch file, or generated from a dataset spec).
    `inputs` reads init images and masks (the bucket, SDFARM_INPUTS_DIR); without it they are refused."""
    return BatchStream(header, items, source, fmt, registry, max_jobs, overrides, name, inputs).plan()



def plan_file(
    path: Path,
    registry: Registry,
    max_jobs: int,
    overrides: Mapping[str, Any] | None = None,
    name: str | None = None,
    inputs: Inputs | None = None,
) -> BatchPlan:
    return stream_file(path, registry, max_jobs, overrides, name, inputs).plan()


def _head(path: Path) -> str:
    """The start of a text file (what tells a .txt of infotexts from one of prompts); "" when it
    cannot be read, which the format's own reader then reports."""
    try:
        with open_regular(path, MAX_FILE_BYTES) as f:
            return f.read(INFOTEXT_PEEK_BYTES).decode("utf-8", errors="replace")
    except InvalidInput:
        return ""


def stream_file(
    path: Path,
    registry: Registry,
    max_jobs: int,
    overrides: Mapping[str, Any] | None = None,
    name: str | None = None,
    inputs: Inputs | None = None,
    cpu_noise: bool = False,
) -> BatchStream:
    """Read a batch file (format from its suffix); its jobs are planned as the stream is read.
    Only a regular file is read (not a FIFO, not /dev/zero through a symlink), at most
    MAX_FILE_BYTES; .jsonl, .csv and .txt line by line, never whole. A .png, or a folder of them, is
    A1111 images in (sdfarm.a1111): one job per image, from its infotext; cpu_noise accepts images
    whose noise A1111 drew on the GPU."""
    source = str(path)
    if path.suffix.lower() == ".png" or (path.is_dir() and path.suffix.lower() not in FORMATS):
        items = [RawItem(data, i) for i, data in enumerate(read_images(path, registry, max_jobs, cpu_noise), 1)]
        return BatchStream({"name": path.stem}, items, source, "a1111", registry, max_jobs, overrides, name, inputs)
    if path.suffix.lower() == ".txt" and looks_like_infotexts(_head(path)):
        items = [RawItem(data, i) for i, data in enumerate(read_infotexts(path, registry, max_jobs, cpu_noise), 1)]
        return BatchStream({"name": path.stem}, items, source, "a1111", registry, max_jobs, overrides, name, inputs)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        allowed = ", ".join(FORMATS)
        raise BatchInvalid([_file_problem(source, f"unknown file type {brief(path.suffix)} (allowed: {allowed})")])
    if fmt in _LINE_READERS:
        try:  # refused now, as a document would be: not a regular file, too large
            open_regular(path, MAX_FILE_BYTES).close()
        except InvalidInput as e:
            message = str(e)
            raise BatchInvalid([_file_problem(source, ("file " if message.startswith("is ") else "cannot read: ")
                                              + message)]) from None
        return _line_stream(_file_lines(path, source), source, fmt, registry, max_jobs, overrides, name, inputs)
    header, items = read_batch(_read_document(path, source), source, fmt, max_jobs)
    return BatchStream(header, items, source, fmt, registry, max_jobs, overrides, name, inputs)
