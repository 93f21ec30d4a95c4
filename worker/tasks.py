"""The render task. Reads like a pipeline's __call__: numbered steps, each a call.

1. load the chunk (validate the message again)   2. skip jobs already done, count the delivery
3. prepare: LoRAs, VAE, upscalers, inputs         4. render the rest as one batched call
5. encode PNG + sidecar                           6. store: PNG, then sidecar (If-None-Match: *)
7. report progress, one log line per job
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from pydantic import ValidationError

from sdfarm.errors import AssetError, NodeFault, RenderError, TransientError
from sdfarm.jobs import SCHEMA_VERSION, Chunk, ChunkEntry
from sdfarm.layout import failed_key, image_key, sidecar_key
from sdfarm.progress import ACTIVE, ProgressBoard, worker_key
from sdfarm.queue import BATCH_FINISHED_TASK, CONTROL_QUEUE, RENDER_TASK, queue_name
from sdfarm.settings import Settings
from sdfarm.store import Store

from .assets import AssetFiles
from .encode import Encoded, encode_png, sidecar
from .health import NodeHealth, succeeding_peer
from .masks import Inputs, MaskModels, job_inputs
from .pipeline import LoadedModel
from .render import render, render_split

log = logging.getLogger("sdfarm.worker")


@dataclass
class WorkerState:
    """Everything one pool process holds: created in the child, after fork."""

    settings: Settings
    hostname: str
    loaded: LoadedModel
    store: Store
    board: ProgressBoard
    versions: dict[str, str]
    pool: ThreadPoolExecutor
    assets: AssetFiles
    masks: MaskModels
    counters: dict[str, Any] = field(default_factory=lambda: {"chunks": 0, "images": 0, "failed": 0})
    health: NodeHealth = field(default_factory=NodeHealth)

    def worker_info(self) -> dict[str, Any]:
        return {"hostname": self.hostname, "device": str(self.loaded.device), "device_name": self.loaded.device_name,
                "compiled": self.loaded.compiled}


_state: WorkerState | None = None


def set_state(state: WorkerState | None) -> None:
    global _state
    _state = state


def get_state() -> WorkerState:
    if _state is None:
        raise RuntimeError("worker state is not initialised: the pipeline loads in worker_process_init")
    return _state


def _log_job(entry: ChunkEntry, batch_id: str, outcome: str, seconds: float, extra: str = "") -> None:
    log.info("job=%s batch=%s index=%d outcome=%s seconds=%.3f%s", entry.job.id, batch_id, entry.index, outcome,
             seconds, f" {extra}" if extra else "")


def fail_entries(state: WorkerState, batch_id: str, entries: list[ChunkEntry], reason: str) -> None:
    """Record the jobs as failed with their reason: under the batch in S3, and on the board."""
    for entry in entries:
        record = {"job_id": entry.job.id, "index": entry.index, "batch_id": batch_id, "reason": reason,
                  "worker": state.hostname, "at": time.time()}
        state.store.put_json(failed_key(batch_id, entry.job.id), record)
        state.board.mark_failed(batch_id, entry.index)
        state.counters["failed"] += 1
        _log_job(entry, batch_id, "failed", 0.0, f"reason={json.dumps(reason)}")


def _store_one(state: WorkerState, batch_id: str, entry: ChunkEntry, image: Any, timings: dict[str, float]) -> None:
    t0 = time.perf_counter()
    job = entry.job
    encoded = encode_png(image, job, state.loaded.short_hash, state.assets.lora_hashes)  # 5. encode
    t1 = time.perf_counter()
    png_written = state.store.put_if_absent(image_key(job.id), encoded.png, "image/png")  # 6. store
    if not png_written:  # an earlier attempt stored the PNG and died before its sidecar: describe that one
        existing = state.store.get(image_key(job.id))
        encoded = Encoded(existing, hashlib.sha256(existing).hexdigest(), encoded.infotext)
    meta = sidecar(job, batch_id, entry.index, encoded, image_key(job.id),
                   {**timings, "encode_s": t1 - t0, "upload_s": time.perf_counter() - t1},
                   state.worker_info(), state.versions)
    state.store.put_json_if_absent(sidecar_key(job.id), meta)
    state.board.mark_done(batch_id, entry.index, rendered=True)  # 7. report
    _log_job(entry, batch_id, "rendered" if png_written else "rendered-existing", timings["render_s_per_image"])


class _Stop(Exception):
    """A step ends the chunk early, with this outcome (halted batch, nothing to do, failed jobs)."""

    def __init__(self, outcome: dict[str, int]) -> None:
        super().__init__(outcome)
        self.outcome = outcome


def _load_chunk(state: WorkerState, payload: Any) -> Chunk:
    """The message is checked again, whoever sent it; the chunk must be this worker's model."""
    version = payload.get("schema_version") if isinstance(payload, dict) else None
    if isinstance(version, int) and version > SCHEMA_VERSION:  # a newer producer: its defaults may differ
        raise NodeFault(f"chunk schema version {version} is newer than this worker's {SCHEMA_VERSION}: upgrade it")
    try:
        chunk = Chunk.model_validate(payload)
    except ValidationError as e:
        log.error("rejected malformed chunk message: %s", e.errors(include_url=False)[:3])
        raise _Stop({"rejected": 1}) from e
    first = chunk.entries[0].job
    if first.model != state.loaded.entry.name or first.model_hash != state.loaded.identity:
        raise NodeFault(f"model mismatch: job wants {first.model} ({first.model_hash[:10]}), this worker serves"
                        f" {state.loaded.entry.name} ({state.loaded.short_hash}); registries differ")
    return chunk


def _check_active(state: WorkerState, batch_id: str, entries: list[ChunkEntry]) -> None:
    """The batch's durable control flag: a cancelled or paused batch renders and uploads nothing."""
    batch_state = state.board.state(batch_id)
    if batch_state == ACTIVE:
        return
    for entry in entries:
        _log_job(entry, batch_id, batch_state, 0.0)
    raise _Stop({batch_state: len(entries)})


def _skip_done(state: WorkerState, batch_id: str, entries: list[ChunkEntry]) -> list[ChunkEntry]:
    """Jobs whose sidecar (the commit marker) exists are done: count them, render the rest."""
    done = list(state.pool.map(lambda e: state.store.exists(sidecar_key(e.job.id)), entries))
    for entry, is_done in zip(entries, done, strict=True):
        if is_done:
            state.board.mark_done(batch_id, entry.index, rendered=False)
            _log_job(entry, batch_id, "skipped", 0.0)
    return [e for e, is_done in zip(entries, done, strict=True) if not is_done]


def _within_attempts(state: WorkerState, batch_id: str, entries: list[ChunkEntry]) -> list[ChunkEntry]:
    """Count this delivery; a job delivered more than max_attempts times killed its workers: fail it."""
    cap = state.settings.max_attempts
    keep: list[ChunkEntry] = []
    poison: list[ChunkEntry] = []
    for entry in entries:
        (keep if state.board.attempt(batch_id, entry.index) <= cap else poison).append(entry)
    if poison:
        fail_entries(state, batch_id, poison,
                     f"gave up after {cap} attempts: the worker rendering it died each time"
                     " (killed, out of memory or crashed)")
    return keep


def _to_render(state: WorkerState, chunk: Chunk) -> list[ChunkEntry]:
    """The chunk's jobs that are neither done nor poison, this delivery counted."""
    entries = list(chunk.entries)
    _check_active(state, chunk.batch_id, entries)
    todo = _within_attempts(state, chunk.batch_id, _skip_done(state, chunk.batch_id, entries))
    if not todo:
        raise _Stop({"skipped": len(entries)})
    return todo


@contextmanager
def _attempts_kept_on_transient(state: WorkerState, batch_id: str, todo: list[ChunkEntry]) -> Iterator[None]:
    """A transient failure (S3 or Redis blinked) is retried; it is not a death of the worker, so
    this delivery must not count against the jobs' attempts."""
    try:
        yield
    except TransientError:
        for entry in todo:
            state.board.release_attempt(batch_id, entry.index)
        raise


def _prepare(state: WorkerState, chunk: Chunk, todo: list[ChunkEntry]) -> Inputs:
    """LoRAs, embeddings, VAE and upscalers switched between chunks; input images and masks; all
    verified. A failure here is the jobs' files, not this node: the jobs fail, the worker serves on."""
    jobs = [e.job for e in todo]
    first = jobs[0]
    try:
        files = state.assets.for_jobs(jobs)
        state.loaded.adapters.activate(first.loras, tuple({e for j in jobs for e in j.embeddings}), files)
        state.loaded.use_vae(first.vae, files)
        state.loaded.upscalers.prepare(first, files)
        return job_inputs(state.assets, state.masks, jobs)
    except TransientError:
        raise  # S3 blinked: retried, not failed
    except Exception as e:
        reason = str(e) if isinstance(e, AssetError) else f"preparing the chunk: {type(e).__name__}: {e}"
        log.error("chunk %s: %s", chunk.id, reason)
        fail_entries(state, chunk.batch_id, todo, reason)
        raise _Stop({"failed": len(todo)}) from e


def _render(state: WorkerState, chunk: Chunk, todo: list[ChunkEntry], inputs: Inputs
            ) -> tuple[list[Any], dict[str, float]]:
    """One batched call, one generator per image (split in halves on OOM). A job that breaks the
    pipeline fails with its reason; the worker serves on."""
    started_at = time.time()
    _set_busy(state, chunk)
    t0 = time.perf_counter()
    try:
        images = render_split(state.loaded, [e.job for e in todo], partial(render, inputs=inputs))
    except Exception as e:
        log.exception("render failed for chunk %s", chunk.id)
        fail_entries(state, chunk.batch_id, todo, f"{type(e).__name__}: {e}")
        if not isinstance(e, RenderError):  # NaN comes from the job (weights, model), not this node
            state.health.failure(f"{type(e).__name__}: {e}")
        raise _Stop({"failed": len(todo)}) from e
    finally:
        _set_busy(state, None)
    render_s = time.perf_counter() - t0
    return images, {"render_started_at": started_at, "chunk_render_s": render_s,
                    "render_s_per_image": render_s / len(todo), "chunk_size": len(todo)}


def _store_all(state: WorkerState, batch_id: str, todo: list[ChunkEntry], images: list[Any],
               timings: dict[str, float]) -> None:
    """Encode, store and report each image, in the upload threads, side by side."""
    futures = [state.pool.submit(_store_one, state, batch_id, e, img, timings)
               for e, img in zip(todo, images, strict=True)]
    for f in futures:
        f.result()


def _set_busy(state: WorkerState, chunk: Chunk | None) -> None:
    """What this worker renders, for `sdfarm workers` and the fault tests. Best effort: Redis
    blinking here must not mask the chunk's own outcome."""
    key = worker_key(state.hostname)
    try:
        if chunk is None:
            state.board.r.hdel(key, "current_chunk", "current_batch")
        else:
            state.board.r.hset(key, mapping={"current_chunk": chunk.id, "current_batch": chunk.batch_id})
    except Exception as e:
        log.warning("could not mark this worker %s: %s", "idle" if chunk is None else "busy", e)


def process_chunk(state: WorkerState, payload: Any) -> dict[str, int]:
    try:
        chunk = _load_chunk(state, payload)  # 1. load the chunk, checked again
        todo = _to_render(state, chunk)  # 2. skip jobs done; count this delivery (poison jobs stop here)
        with _attempts_kept_on_transient(state, chunk.batch_id, todo):
            _check_active(state, chunk.batch_id, todo)  # checked again right before the GPU starts
            inputs = _prepare(state, chunk, todo)  # 3. switch LoRAs, VAE, upscalers; load inputs
            images, timings = _render(state, chunk, todo, inputs)  # 4. render as one batched call
            _check_active(state, chunk.batch_id, todo)  # and before anything is uploaded
            _store_all(state, chunk.batch_id, todo, images, timings)  # 5-7. encode, store, report
    except _Stop as stop:
        return stop.outcome
    state.counters["chunks"] += 1
    state.counters["images"] += len(todo)
    state.health.success()
    return {"rendered": len(todo), "skipped": len(chunk.entries) - len(todo)}


def register_tasks(app: Celery) -> None:
    # transient failures retry until the dependency returns: nothing accepted is dropped
    @app.task(name=RENDER_TASK, bind=True, max_retries=None)
    def render_chunk(self: Task, payload: Any) -> dict[str, int]:
        state = get_state()
        try:
            result = process_chunk(state, payload)
        except NodeFault as e:
            log.error("handing the chunk back: %s", e)
            state.health.failure(str(e))
            maybe_block(self.app, state)
            time.sleep(1)  # do not spin on a message this worker cannot serve
            raise Reject(str(e), requeue=True) from e
        except TransientError as e:
            settings = get_state().settings
            delay = min(settings.retry_backoff_s * 2 ** self.request.retries, settings.retry_backoff_max_s)
            log.warning("transient failure, retrying in %ss: %s", delay, e)
            raise self.retry(exc=e, countdown=delay) from e
        if state.health.streak:
            maybe_block(self.app, state)
        announce_if_finished(self.app, state, payload)
        return result


def announce_if_finished(app: Celery, state: WorkerState, payload: Any) -> None:
    """The worker that finishes a batch's last job hands it to the control queue (hooks, exports)."""
    batch_id = payload.get("batch_id") if isinstance(payload, dict) else None
    if not isinstance(batch_id, str):
        return
    progress = state.board.read(batch_id)
    if progress is not None and progress.finished and state.board.claim_finish(batch_id):
        app.send_task(BATCH_FINISHED_TASK, args=[batch_id], queue=CONTROL_QUEUE)


def maybe_block(app: Celery, state: WorkerState) -> None:
    """Stop consuming when this worker keeps failing while a peer on the same model succeeds."""
    health = state.health
    if health.blocked or health.streak < state.settings.block_after_failures:
        return
    model = state.loaded.entry.name
    peer = succeeding_peer(state.board.r, state.hostname, model, health.streak_started_at)
    if peer is None:
        return  # everyone fails: the jobs or a shared dependency are at fault, not this node
    health.blocked = (f"stopped taking work after {health.streak} failures in a row while {peer} succeeds on"
                      f" {model}; last: {health.recent[-1][1]}")
    log.error("%s", health.blocked)
    state.board.r.hset(worker_key(state.hostname), mapping=health.fields())  # type: ignore[arg-type]
    app.control.cancel_consumer(queue_name(model), destination=[state.hostname])
