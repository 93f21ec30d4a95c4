"""Submit a validated batch: the record goes to S3 first, then chunks go to the queues.

A batch is streamed, so a million jobs never sit in memory at once: each job, as it is planned,
is spooled to two local temporary files (its jobs.jsonl line, and its message entry with the
chunk group it belongs to). When the last job is planned the batch id is known (it hashes every
job id) and validation is complete (all or nothing: nothing is written before). Then the record:
batch.json, then jobs.jsonl streamed from its spool in one PUT, then live progress. Only then are
the entries read back, the jobs already done skipped, the rest grouped into chunks as
`make_chunks` groups them and sent as each chunk fills, in Redis pipelines (ChunkSender).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from celery import Celery

from sdfarm.batchfile import BatchPlan, BatchRecord, BatchStream
from sdfarm.jobs import RenderJob, make_chunks, message_version
from sdfarm.layout import batch_key, jobs_key
from sdfarm.progress import ProgressBoard
from sdfarm.queue import DEFAULT_PRIORITY, ChunkSender, broker_priority, entry_json, queue_name
from sdfarm.store import Store

_SPOOL_LINES = 4096  # lines buffered before a write to a spool file


@dataclass(frozen=True)
class SubmitResult:
    batch_id: str
    jobs: int
    chunks_enqueued: int
    already_done: int


def jobs_jsonl_line(index: int, job: RenderJob) -> str:
    """A job's line in its batch's jobs.jsonl (what watch, retry and reconcile read back)."""
    return f'{{"index": {index}, "id": "{job.id}", "job": {job.record_json}}}'


def jobs_jsonl(plan: BatchPlan) -> bytes:
    return "".join(jobs_jsonl_line(i, j) + "\n" for i, j in enumerate(plan.jobs)).encode()


class JobSpool:
    """A batch's jobs in two seekable binary files (temporary files on local disk: see _submit):
    `jobs` gets jobs.jsonl as S3 will hold it; `entries` one line per job, "GROUP ENTRY", where
    GROUP numbers the job's compatibility key (jobs of one group can share a chunk) and ENTRY is
    its message entry's JSON (ASCII)."""

    def __init__(self, jobs: IO[bytes], entries: IO[bytes]) -> None:
        self.jobs = jobs
        self.entries = entries
        self.count = 0
        self._groups: dict[tuple[Any, ...], int] = {}
        self._models: list[str] = []  # by group
        self._versions: list[int] = []  # by group: the compatibility key holds what sets the version
        self._job_lines: list[str] = []
        self._entry_lines: list[str] = []

    def add(self, job: RenderJob) -> None:
        index = self.count
        key = job.compat_key()
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = len(self._groups)
            self._models.append(job.model)
            self._versions.append(message_version((job.wire,)))
        self._job_lines.append(jobs_jsonl_line(index, job))
        self._entry_lines.append(f"{group} {entry_json(index, job)}")
        self.count += 1
        if len(self._job_lines) >= _SPOOL_LINES:
            self._flush()

    def _flush(self) -> None:
        if self._job_lines:
            self.jobs.write(("\n".join(self._job_lines) + "\n").encode())
            self.entries.write(("\n".join(self._entry_lines) + "\n").encode())
            self._job_lines.clear()
            self._entry_lines.clear()

    def jobs_file(self) -> IO[bytes]:
        """jobs.jsonl, complete, positioned at its start."""
        self._flush()
        self.jobs.seek(0)
        return self.jobs

    def chunks(self, chunk_size: int, done: bytes = b"") -> Iterator[tuple[str, list[str], int]]:
        """(model, entries, version) of each chunk, made of the jobs not set in the `done` bitmap
        (bit i, most significant first, is job i), grouped as make_chunks groups them: in batch
        order within a group, a chunk as soon as a group has chunk_size jobs, then what is left of
        each group in the order the groups first appeared."""
        self._flush()
        self.entries.seek(0)
        pending: dict[bytes, list[bytes]] = {}
        for index, line in enumerate(self.entries):
            if done and index >> 3 < len(done) and done[index >> 3] & (0x80 >> (index & 7)):
                continue
            group, _, entry = line.partition(b" ")
            entries = pending.get(group)
            if entries is None:
                entries = pending[group] = []
            entries.append(entry)
            if len(entries) == chunk_size:
                yield self._chunk(group, entries)
                entries.clear()
        for group, entries in pending.items():
            if entries:
                yield self._chunk(group, entries)

    def _chunk(self, group: bytes, entries: list[bytes]) -> tuple[str, list[str], int]:
        number = int(group)
        return self._models[number], [e.rstrip(b"\n").decode() for e in entries], self._versions[number]


def describe_plan(plan: BatchPlan, chunk_size: int) -> str:
    """The --dry-run report: jobs per model and size, and the chunks they make."""
    chunks = sum(1 for _ in make_chunks(plan.batch_id, enumerate(plan.jobs), chunk_size))
    per_group = Counter((j.model, f"{j.width}x{j.height}") for j in plan.jobs)
    return _describe(plan.record, per_group, chunks, chunk_size)


def describe_stream(stream: BatchStream, chunk_size: int) -> str:
    """describe_plan for a streamed batch, with one job in memory at a time."""
    per_group: Counter[tuple[str, str]] = Counter()
    per_key: Counter[tuple[Any, ...]] = Counter()
    for job in stream:
        per_group[(job.model, f"{job.width}x{job.height}")] += 1
        per_key[job.compat_key()] += 1
    chunks = sum(-(-n // chunk_size) for n in per_key.values())
    return _describe(stream.record(), per_group, chunks, chunk_size)


def _describe(record: BatchRecord, per_group: Counter[tuple[str, str]], chunks: int, chunk_size: int) -> str:
    lines = [f"batch {record.batch_id} ({record.name}): {record.job_count} jobs, {chunks} chunks of up to"
             f" {chunk_size}"]
    for (model, size), n in sorted(per_group.items()):
        lines.append(f"  {model:<24} {size:>9}  {n:>7} jobs  -> queue {queue_name(model)}")
    return "\n".join(lines)


def write_record(record: BatchRecord, jobs: bytes | IO[bytes], store: Store, board: ProgressBoard) -> None:
    """Local input images, the durable record (S3: batch.json, then jobs.jsonl), then live progress
    (Redis). Nothing is enqueued yet."""
    store.ensure_bucket()
    for key, data in record.uploads.items():  # content-addressed: a second upload of the same file is a no-op
        store.put_if_absent(key, data, "application/octet-stream")
    store.put_json_if_absent(batch_key(record.batch_id), record.spec)
    store.put_if_absent(jobs_key(record.batch_id), jobs, "application/x-ndjson")
    board.register(record.batch_id, record.name, record.job_count)


def record_batch(plan: BatchPlan, store: Store, board: ProgressBoard) -> None:
    """write_record for a batch held in memory."""
    write_record(plan.record, jobs_jsonl(plan), store, board)


def submit_stream(stream: BatchStream, store: Store, app: Celery, board: ProgressBoard, chunk_size: int,
                  priority: int = DEFAULT_PRIORITY) -> SubmitResult:
    """Plan the batch into a spool, then the durable record (S3), live progress (Redis), and the
    chunks (queue). BatchInvalid, with nothing written, when any job is invalid.

    The batch id is derived from its content: submitting the same file again writes nothing new,
    and jobs already done (per the progress bitmap) are not enqueued; workers skip any others
    whose sidecar exists.
    """
    return _submit(stream.record, stream, store, app, board, chunk_size, priority)


def submit_plan(plan: BatchPlan, store: Store, app: Celery, board: ProgressBoard, chunk_size: int,
                priority: int = DEFAULT_PRIORITY) -> SubmitResult:
    """submit_stream for a batch held in memory."""
    return _submit(lambda: plan.record, plan.jobs, store, app, board, chunk_size, priority)


def _submit(record_of: Callable[[], BatchRecord], jobs: Iterable[RenderJob], store: Store, app: Celery,
            board: ProgressBoard, chunk_size: int, priority: int) -> SubmitResult:
    broker_priority(priority)  # validate before writing anything
    # on local disk, gone when closed or when the process dies: about 0.8 GB for a million jobs
    with tempfile.TemporaryFile(prefix="sdfarm-jobs-") as jobs_file, \
            tempfile.TemporaryFile(prefix="sdfarm-entries-") as entries_file:
        spool = JobSpool(jobs_file, entries_file)
        for job in jobs:
            spool.add(job)
        record = record_of()  # the batch is valid: nothing was written before here
        write_record(record, spool.jobs_file(), store, board)
        done = board.done_bits(record.batch_id)
        enqueued = 0
        board.enqueued(record.batch_id)  # where the chunks' queue wait starts (worker metrics)
        with ChunkSender(app, priority) as sender:
            for model, entries, version in spool.chunks(chunk_size, done):
                sender.send(model, record.batch_id, entries, version)
                enqueued += len(entries)
        return SubmitResult(record.batch_id, record.job_count, sender.sent, record.job_count - enqueued)
