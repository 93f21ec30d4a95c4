"""Submit a validated batch: the record goes to S3 first, then chunks go to the queues."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from celery import Celery

from sdfarm.batchfile import BatchPlan
from sdfarm.jobs import Chunk, make_chunks
from sdfarm.layout import batch_key, jobs_key
from sdfarm.progress import ProgressBoard
from sdfarm.queue import DEFAULT_PRIORITY, broker_priority, enqueue_chunks, queue_name
from sdfarm.store import Store


@dataclass(frozen=True)
class SubmitResult:
    batch_id: str
    jobs: int
    chunks_enqueued: int
    already_done: int


def jobs_jsonl(plan: BatchPlan) -> bytes:
    lines = (json.dumps({"index": i, "id": j.id, "job": j.model_dump(mode="json")}, ensure_ascii=False)
             for i, j in enumerate(plan.jobs))
    return ("\n".join(lines) + "\n").encode()


def describe_plan(plan: BatchPlan, chunk_size: int) -> str:
    """The --dry-run report: jobs per model and size, and the chunks they make."""
    chunks = list(make_chunks(plan.batch_id, enumerate(plan.jobs), chunk_size))
    per_group = Counter((j.model, f"{j.width}x{j.height}") for j in plan.jobs)
    lines = [f"batch {plan.batch_id} ({plan.name}): {len(plan.jobs)} jobs, {len(chunks)} chunks of up to {chunk_size}"]
    for (model, size), n in sorted(per_group.items()):
        lines.append(f"  {model:<24} {size:>9}  {n:>7} jobs  -> queue {queue_name(model)}")
    return "\n".join(lines)


def record_batch(plan: BatchPlan, store: Store, board: ProgressBoard) -> None:
    """Local input images, the durable record (S3), then live progress (Redis). Nothing is enqueued yet."""
    store.ensure_bucket()
    for key, data in plan.uploads.items():  # content-addressed: a second upload of the same file is a no-op
        store.put_if_absent(key, data, "application/octet-stream")
    store.put_json_if_absent(batch_key(plan.batch_id), plan.spec)
    store.put_if_absent(jobs_key(plan.batch_id), jobs_jsonl(plan), "application/x-ndjson")
    board.register(plan.batch_id, plan.name, len(plan.jobs))


def submit_plan(plan: BatchPlan, store: Store, app: Celery, board: ProgressBoard, chunk_size: int,
                priority: int = DEFAULT_PRIORITY) -> SubmitResult:
    """Durable record first (S3), then live progress (Redis), then the chunks (queue).

    The batch id is derived from its content: submitting the same file again writes nothing new,
    and jobs already done (per the progress bitmap) are not enqueued; workers skip any others
    whose sidecar exists.
    """
    broker_priority(priority)  # validate before writing anything
    record_batch(plan, store, board)
    bits = board.done_bits(plan.batch_id)

    def done(index: int) -> bool:
        byte = index // 8
        return byte < len(bits) and bool(bits[byte] & (0x80 >> (index % 8)))

    pending = [(i, j) for i, j in enumerate(plan.jobs) if not done(i)]
    chunks: list[Chunk] = list(make_chunks(plan.batch_id, pending, chunk_size))
    sent = enqueue_chunks(app, chunks, priority) if chunks else 0
    return SubmitResult(plan.batch_id, len(plan.jobs), sent, len(plan.jobs) - len(pending))
