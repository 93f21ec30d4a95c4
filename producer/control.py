"""Batch control: cancel, pause, resume, retry failed jobs, reconcile. S3 holds the durable flag
(batches/<id>/control.json); Redis holds the copy workers check before rendering and uploading.

reconcile_stalled is the safety net the scheduler runs on its own, without anyone watching: an
active batch on which nothing has moved for a while, with none of its messages queued or in flight,
is reconciled."""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from celery import Celery

from sdfarm.errors import InvalidInput, UnknownBatch
from sdfarm.jobs import RECORDED, RenderJob, make_chunks
from sdfarm.layout import batch_key, control_key, failed_key, failed_prefix, jobs_key, sidecar_key
from sdfarm.progress import ACTIVE, CANCELLED, PAUSED, ProgressBoard
from sdfarm.queue import DEFAULT_PRIORITY, enqueue_chunks
from sdfarm.store import MissingObject, Store

log = logging.getLogger("sdfarm.control")


def batch_rows(store: Store, batch_id: str) -> Iterator[dict[str, Any]]:
    """The rows of the batch's durable record (jobs.jsonl: index, id, job), streamed in batch order."""
    lines = store.lines(jobs_key(batch_id))
    try:
        first = next(lines, None)
    except MissingObject as e:
        raise UnknownBatch(f"unknown batch {batch_id!r}: no s3://{store.bucket}/{jobs_key(batch_id)}") from e
    if first is not None:
        yield from (json.loads(line) for line in itertools.chain([first], lines) if line.strip())


def read_batch_jobs(store: Store, batch_id: str) -> list[tuple[int, RenderJob]]:
    """The batch's jobs from its durable record, in batch order, read as recorded (RECORDED: a bound
    added at submit since does not refuse a job accepted before it)."""
    return [(row["index"], RenderJob.model_validate(row["job"], context=RECORDED))
            for row in batch_rows(store, batch_id)]


def durable_state(store: Store, batch_id: str) -> str:
    try:
        state: str = store.get_json(control_key(batch_id))["state"]
        return state
    except MissingObject:
        return ACTIVE


def set_batch_state(store: Store, board: ProgressBoard, batch_id: str, state: str) -> None:
    """S3 first (durable), then Redis (what workers read). When this returns, no new render starts."""
    if not store.exists(batch_key(batch_id)):
        raise UnknownBatch(f"unknown batch {batch_id!r}: no s3://{store.bucket}/{batch_key(batch_id)}")
    store.put_json(control_key(batch_id), {"state": state, "at": time.time()})
    board.set_state(batch_id, state)


def cancel(store: Store, board: ProgressBoard, batch_id: str) -> None:
    set_batch_state(store, board, batch_id, CANCELLED)


def pause(store: Store, board: ProgressBoard, batch_id: str) -> None:
    set_batch_state(store, board, batch_id, PAUSED)


@dataclass(frozen=True)
class ReconcileResult:
    total: int
    done: int
    failed: int
    enqueued_jobs: int
    chunks: int


def reconcile(store: Store, board: ProgressBoard, app: Celery, batch_id: str, chunk_size: int,
              priority: int = DEFAULT_PRIORITY) -> ReconcileResult:
    """Re-enqueue every job with no output that has not failed. Safe any time, any number of times:
    outputs are written once, so a job that is still queued and enqueued again renders at most once
    more and is stored once. Also repairs Redis progress from S3."""
    state = durable_state(store, batch_id)
    if state != ACTIVE:
        raise InvalidInput(f"batch {batch_id} is {state}: `sdfarm resume {batch_id}` first")
    jobs = read_batch_jobs(store, batch_id)
    spec = store.get_json(batch_key(batch_id))
    board.register(batch_id, spec.get("name", ""), len(jobs))
    board.set_state(batch_id, ACTIVE)
    failed_ids = {k.rsplit("/", 1)[1].removesuffix(".json") for k in store.keys(failed_prefix(batch_id))}
    with ThreadPoolExecutor(16) as pool:
        has_output = list(pool.map(lambda ij: store.exists(sidecar_key(ij[1].id)), jobs))
    pending: list[tuple[int, RenderJob]] = []
    done = failed = 0
    for (index, job), output in zip(jobs, has_output, strict=True):
        if output:
            board.mark_done(batch_id, index, rendered=False)
            done += 1
        elif job.id in failed_ids:
            board.mark_failed(batch_id, index)
            failed += 1
        else:
            pending.append((index, job))
    chunks = list(make_chunks(batch_id, pending, chunk_size))
    if chunks:
        board.enqueued(batch_id)
        enqueue_chunks(app, chunks, priority)
    return ReconcileResult(len(jobs), done, failed, len(pending), len(chunks))


def resume(store: Store, board: ProgressBoard, app: Celery, batch_id: str, chunk_size: int) -> ReconcileResult:
    """Clear a pause or a cancel and enqueue what is missing."""
    set_batch_state(store, board, batch_id, ACTIVE)
    return reconcile(store, board, app, batch_id, chunk_size)


def retry_failed(store: Store, board: ProgressBoard, app: Celery, batch_id: str) -> int:
    """Forget the failures of a batch (records, bits, attempt counts) and enqueue those jobs again,
    one per chunk: a job that fails again (NaN, a poison job) fails alone, never its chunk-mates."""
    jobs = dict((job.id, (index, job)) for index, job in read_batch_jobs(store, batch_id))
    failed = [jobs[k.rsplit("/", 1)[1].removesuffix(".json")] for k in store.keys(failed_prefix(batch_id))]
    failed = [(i, j) for i, j in failed if not store.exists(sidecar_key(j.id))]
    board.clear_failed(batch_id, [i for i, _ in failed])
    for _, job in failed:
        store.delete(failed_key(batch_id, job.id))
    chunks = list(make_chunks(batch_id, sorted(failed, key=lambda ij: ij[0]), 1))
    if chunks:
        board.enqueued(batch_id)
        enqueue_chunks(app, chunks)
    return len(failed)


RESTORE_GAP_S = 0.5  # between the two looks of nothing_queued_or_in_flight


def nothing_queued_or_in_flight(store: Store, board: ProgressBoard, batch_id: str,
                                confirm_s: float = RESTORE_GAP_S) -> bool:
    """No message of the batch waits in its models' queues or is held by a worker (unacknowledged),
    on two looks confirm_s apart. kombu restores an unacknowledged message in two steps (out of
    the unacked hash, then onto the queue), and one look can fall between them: a soak run
    reconciled a chunk that was being restored, and rendered it twice."""
    models = store.get_json(batch_key(batch_id)).get("models", {})

    def idle() -> bool:
        return not any(board.queue_depth(m) for m in models) and board.in_flight(batch_id) is False

    if not idle():
        return False
    time.sleep(confirm_s)  # the second look: a restore in progress has landed on the queue by now
    return idle()


def reconcile_stalled(store: Store, board: ProgressBoard, app: Celery, chunk_size: int, stall_s: float,
                      now: float) -> list[tuple[str, ReconcileResult]]:
    """Reconcile each active, unfinished batch (with live progress) on which no job has been done or
    failed for stall_s seconds and none of whose messages is queued or in flight: messages lost
    (Redis lost data, a chunk dropped by a bug) are sent again. Returns what was reconciled. Each
    look records the batch's count (ProgressBoard.unmoved_since), so the clock survives restarts;
    a reconcile restarts it. A batch that cannot be reconciled is logged and skipped."""
    reconciled = []
    for batch_id in board.submitted_since(now - board.ttl):
        progress = board.read(batch_id)
        if progress is None or progress.total == 0 or progress.finished or progress.state != ACTIVE:
            continue
        moved = progress.done + progress.failed
        if now - board.unmoved_since(batch_id, moved, now) < stall_s:
            continue
        try:
            if not nothing_queued_or_in_flight(store, board, batch_id):
                continue
            result = reconcile(store, board, app, batch_id, chunk_size)
        except Exception as e:  # one batch's record (gone, unreadable) must not stop the sweep
            log.error("batch %s: could not reconcile it: %s: %s", batch_id, type(e).__name__, e)
            continue
        board.moved(batch_id, moved, now)
        reconciled.append((batch_id, result))
    return reconciled
