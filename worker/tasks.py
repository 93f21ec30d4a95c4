"""The render task. Reads like a pipeline's __call__: numbered steps, each a call.

1. load the chunk (validate the message again)   2. skip jobs already done, count the delivery
3. prepare: LoRAs, VAE, upscalers, inputs         4. render the rest as one batched call
5. encode PNG, thumbnail + sidecar               6. store: PNG, thumbnail, then sidecar (If-None-Match: *)
7. report progress, one log line per job

Outages. A step that fails because Redis or S3 cannot be reached runs again in place, with backoff,
until the dependency returns: every step is idempotent (outputs are put-if-absent, progress is
bits, a delivery is counted in one transaction), so a rendered image is stored once and never
rendered again for it. The wait is bounded by the chunk's soft time limit; a chunk still failing
then is handed back unacknowledged (Reject with requeue; while the broker is down too, the message
stays in Redis's unacked set and kombu restores it after the visibility timeout). An infrastructure
failure is never acknowledged, so it never loses the chunk.

Messages no worker should run. A malformed one is dead-lettered (its reason and text in S3, under
dead-letters/) and acknowledged. One from a newer producer (a version this worker does not read,
and otherwise well-formed but for fields it does not know) is handed back for an upgraded worker,
at most max_handbacks times per message (counted in Redis), then dead-lettered; those hand-backs
are no fault of this node and never count toward blocking it. A chunk handed back because this
node cannot serve it (NodeFault) counts toward blocking the node, and fails its jobs with the
reason once it has been handed back max_handbacks times (no worker could serve it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from celery import Celery, Task
from celery.exceptions import Reject
from pydantic import ValidationError

from sdfarm.errors import AssetError, InvalidInput, NewerSchema, NodeFault, RenderError, is_transient
from sdfarm.jobs import RECORDED, SCHEMA_VERSION, Chunk, ChunkEntry
from sdfarm.layout import dead_letter_key, failed_key, image_key, sidecar_key, thumbnail_key
from sdfarm.progress import ACTIVE, ProgressBoard
from sdfarm.queue import BATCH_FINISHED_TASK, CONTROL_QUEUE, RENDER_TASK, queue_name
from sdfarm.settings import Settings
from sdfarm.store import Store
from sdfarm.thumbnails import CONTENT_TYPE as THUMBNAIL_TYPE
from sdfarm.thumbnails import thumbnail, thumbnail_of_png

from .assets import AssetFiles
from .drain import ChildDrain, HandBack
from .encode import Encoded, encode_png, sidecar
from .health import NodeHealth
from .masks import Inputs, MaskModels
from .metrics import WorkerMetrics
from .pipeline import LoadedModel
from .render import Rendered, prepare, render_each, render_split

log = logging.getLogger("sdfarm.worker")

T = TypeVar("T")
RETRY_SHARE = 0.9  # of the soft time limit, from the chunk's start: until then an outage is waited out in place
DEAD_LETTER_CHARS = 1 << 20  # of a dead-lettered message's text kept in its record
HAND_BACK_PAUSE_S = 1.0  # before a chunk is handed back: no spinning on a message this worker cannot run


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
    metrics: WorkerMetrics
    counters: dict[str, Any] = field(default_factory=lambda: {"chunks": 0, "images": 0, "failed": 0})
    health: NodeHealth = field(default_factory=NodeHealth)
    drain: ChildDrain = field(default_factory=ChildDrain)  # SIGUSR2 from the parent: hand the chunk back
    retry_until: float = math.inf  # time.monotonic() until which the chunk in hand waits out an outage
    delivered_at: float = 0.0  # time.monotonic() when the chunk in hand was delivered

    def worker_info(self) -> dict[str, Any]:
        return {"hostname": self.hostname, "device": str(self.loaded.device), "device_name": self.loaded.device_name,
                "compiled": self.loaded.compiled}


_state: WorkerState | None = None
_COUNTING = threading.Lock()  # the state's counters, from the chunk's thread and the upload threads


def set_state(state: WorkerState | None) -> None:
    global _state
    _state = state


def get_state() -> WorkerState:
    if _state is None:
        raise RuntimeError("worker state is not initialised: the pipeline loads in worker_process_init")
    return _state


def _log_job(entry: ChunkEntry, batch_id: str, outcome: str, seconds: float, reason: str | None = None) -> None:
    """Where every job's outcome goes: its log line (in JSON logs, sdfarm/logs.py, each field its own
    key too), this worker's counters (its heartbeat) and its metrics (worker/metrics.py)."""
    fields = {"job": entry.job.id, "batch": batch_id, "index": entry.index, "outcome": outcome,
              "seconds": round(seconds, 3), "model": entry.job.model, "worker": _state.hostname if _state else None}
    if reason is not None:
        fields["reason"] = reason
    log.info("job=%s batch=%s index=%d outcome=%s seconds=%.3f%s", entry.job.id, batch_id, entry.index, outcome,
             seconds, f" reason={json.dumps(reason)}" if reason is not None else "", extra=fields)
    if _state is not None:
        _state.metrics.outcome(outcome)
        with _COUNTING:  # upload threads log jobs too
            if outcome in ("rendered", "rendered-existing"):
                _state.counters["images"] += 1
            elif outcome == "failed":
                _state.counters["failed"] += 1


def until_back(state: WorkerState, what: str, step: Callable[[], T]) -> T:
    """Run an idempotent step; while it fails because Redis or S3 cannot be reached (is_transient),
    run it again after a backoff (retry_backoff_s, doubling to retry_backoff_max_s) until the
    chunk's deadline (state.retry_until), then raise what it raised. A draining worker out of time
    waits no longer: the chunk goes back to the queue (its attempts taken back)."""
    delay = state.settings.retry_backoff_s
    while True:
        try:
            return step()
        except Exception as e:
            if not is_transient(e) or time.monotonic() + delay > state.retry_until or state.drain.requested:
                raise
            log.warning("%s failed, trying again in %gs: %s", what, delay, e)
            time.sleep(delay)
            delay = min(delay * 2, state.settings.retry_backoff_max_s)


def _best_effort(what: str, step: Callable[[], object]) -> None:
    """A step whose failure must not change the chunk's outcome (health reports, blocking)."""
    try:
        step()
    except Exception as e:
        if not is_transient(e):
            raise
        log.warning("%s failed: %s", what, e)


def fail_entries(state: WorkerState, batch_id: str, entries: list[ChunkEntry], reason: str, kind: str) -> None:
    """Record the jobs as failed with their reason: under the batch in S3, and on the board; counted by
    class (worker/metrics.py FAILURE_KINDS), each once it is recorded."""
    for entry in entries:
        record = {"job_id": entry.job.id, "index": entry.index, "batch_id": batch_id, "reason": reason,
                  "worker": state.hostname, "at": time.time()}
        until_back(state, f"recording job {entry.job.id} failed", partial(_record_failure, state, batch_id, entry,
                                                                          record))
        _log_job(entry, batch_id, "failed", 0.0, reason)
        state.metrics.failed(kind)


def _record_failure(state: WorkerState, batch_id: str, entry: ChunkEntry, record: dict[str, Any]) -> None:
    state.store.put_json(failed_key(batch_id, entry.job.id), record)
    state.board.mark_failed(batch_id, entry.index)


def _store_one(state: WorkerState, batch_id: str, entry: ChunkEntry, image: Any, timings: dict[str, float]) -> None:
    t0 = time.perf_counter()
    job = entry.job
    registry = state.assets.registry
    encoded = encode_png(image, job, state.loaded.short_hash, state.assets.lora_hashes,  # 5. encode
                         model_name=state.loaded.entry.infotext_name,
                         vae_name=registry.asset("vae", job.vae.name).file_name if job.vae else None,
                         refiner_name=registry.get(job.refiner.name).infotext_name if job.refiner else None)
    thumb = thumbnail(image)  # the gallery's
    until_back(state, f"storing job {entry.job.id}", partial(_put_one, state, batch_id, entry, encoded, thumb,
                                                             {**timings, "encode_s": time.perf_counter() - t0}))


def _put_one(state: WorkerState, batch_id: str, entry: ChunkEntry, encoded: Encoded, thumb: bytes,
             timings: dict[str, float]) -> None:
    """PNG, then thumbnail, then sidecar (the commit marker: a job done has both), then progress: each
    write idempotent, so an outage in between is retried whole."""
    t1 = time.perf_counter()
    job = entry.job
    png_written = state.store.put_if_absent(image_key(job.id), encoded.png, "image/png")  # 6. store
    if not png_written:  # an earlier attempt stored the PNG and died before its sidecar: describe that one
        existing = state.store.get(image_key(job.id))
        encoded = Encoded(existing, hashlib.sha256(existing).hexdigest(), encoded.infotext)
        if not state.store.exists(thumbnail_key(job.id)):
            state.store.put_if_absent(thumbnail_key(job.id), thumbnail_of_png(existing), THUMBNAIL_TYPE)
    else:
        state.store.put_if_absent(thumbnail_key(job.id), thumb, THUMBNAIL_TYPE)
    meta = sidecar(job, batch_id, entry.index, encoded, image_key(job.id),
                   {**timings, "upload_s": time.perf_counter() - t1}, state.worker_info(), state.versions)
    state.store.put_json_if_absent(sidecar_key(job.id), meta)
    state.board.mark_done(batch_id, entry.index, rendered=True)  # 7. report
    state.metrics.stored(timings["encode_s"], time.perf_counter() - t1)
    _log_job(entry, batch_id, "rendered" if png_written else "rendered-existing", timings["render_s_per_image"])


def message_digest(message_id: str, payload: Any) -> str:
    """Names one task message (its id, and its body as received): its hand-back count, its dead letter."""
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(f"{message_id}\n{body}".encode()).hexdigest()


def dead_letter(state: WorkerState, payload: Any, digest: str, reason: str) -> dict[str, int]:
    """Set a message aside with its reason (S3, dead-letters/); the task then acknowledges it."""
    text = json.dumps(payload, sort_keys=True, default=repr)
    record = {"reason": reason, "worker": state.hostname, "at": time.time(), "message_chars": len(text),
              "message": text[:DEAD_LETTER_CHARS]}
    until_back(state, "dead-lettering a message", partial(state.store.put_json, dead_letter_key(digest), record))
    log.error("dead-lettered a task message as %s: %s", dead_letter_key(digest), reason)
    return {"dead-lettered": 1}


class _Stop(Exception):
    """A step ends the chunk early, with this outcome (halted batch, nothing to do, failed jobs)."""

    def __init__(self, outcome: dict[str, int]) -> None:
        super().__init__(outcome)
        self.outcome = outcome


def _load_chunk(state: WorkerState, payload: Any, digest: str) -> Chunk:
    """The message is checked again, whoever sent it; the chunk must be this worker's model.
    Jobs are read as recorded (RECORDED): a bound added at submit since they were queued does not
    refuse them here."""
    try:
        chunk = Chunk.model_validate(payload, context=RECORDED)
    except ValidationError as e:
        problems = e.errors(include_url=False)
        if _newer(payload) and _valid_without_unknown_fields(payload, problems):
            raise NewerSchema(_newer_reason(payload)) from e  # well-formed, but for fields a newer producer added
        raise _Stop(dead_letter(state, payload, digest, "malformed chunk message: " + _problems(problems))) from e
    if _newer(payload):  # a newer producer: its defaults may differ
        raise NewerSchema(_newer_reason(payload))
    first = chunk.entries[0].job
    if first.model != state.loaded.entry.name or first.model_hash != state.loaded.identity:
        raise NodeFault(f"model mismatch: job wants {first.model} ({first.model_hash[:10]}), this worker serves"
                        f" {state.loaded.entry.name} ({state.loaded.short_hash}); registries differ")
    return chunk


def _queue_wait(state: WorkerState, batch_id: str) -> None:
    """The chunk's queue wait, for the metrics: from its batch's latest enqueue (the message carries
    no time of its own; ProgressBoard.enqueued) to now, when this worker took it. A redelivered chunk
    (handed back, or its worker died) counts again, from the same enqueue."""
    enqueued_at = state.board.enqueued_at(batch_id)
    if enqueued_at is not None:
        state.metrics.waited(time.time() - enqueued_at)


def _newer(payload: Any) -> bool:
    version = payload.get("schema_version") if isinstance(payload, dict) else None
    return isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION


def _valid_without_unknown_fields(payload: Any, problems: list[Any]) -> bool:
    """Whether the message validates once the fields this worker does not know are taken out."""
    unknown = [p["loc"] for p in problems if p["type"] == "extra_forbidden"]
    if not unknown:
        return False
    known = json.loads(json.dumps(payload))
    try:
        for loc in unknown:
            parent = known
            for part in loc[:-1]:
                parent = parent[part]
            del parent[loc[-1]]
        Chunk.model_validate(known, context=RECORDED)
    except (ValidationError, LookupError, TypeError):
        return False
    return True


def _newer_reason(payload: Any) -> str:
    return (f"chunk schema version {payload['schema_version']} is newer than this worker's {SCHEMA_VERSION}:"
            " upgrade it")


def _problems(problems: list[Any], shown: int = 3) -> str:
    text = "; ".join(f"{'.'.join(str(x) for x in p['loc']) or 'message'}: {p['msg']}" for p in problems[:shown])
    return text[:2000] + (f"; and {len(problems) - shown} more" if len(problems) > shown else "")


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
    counts = until_back(state, "counting the delivery",
                        partial(state.board.attempts, batch_id, [e.index for e in entries]))
    keep = [e for e, count in zip(entries, counts, strict=True) if count <= cap]
    poison = [e for e, count in zip(entries, counts, strict=True) if count > cap]
    if poison:
        fail_entries(state, batch_id, poison, f"gave up after {cap} attempts: the worker rendering it died each"
                     " time (killed, out of memory or crashed)", "poison")
    return keep


def _to_render(state: WorkerState, chunk: Chunk) -> list[ChunkEntry]:
    """The chunk's jobs that are neither done nor poison, this delivery counted."""
    entries = list(chunk.entries)
    _still_active(state, chunk.batch_id, entries)
    todo = until_back(state, "looking for jobs already done", partial(_skip_done, state, chunk.batch_id, entries))
    todo = _within_attempts(state, chunk.batch_id, todo)
    if not todo:
        raise _Stop({"skipped": len(entries)})
    return todo


def _still_active(state: WorkerState, batch_id: str, entries: list[ChunkEntry]) -> None:
    until_back(state, "reading the batch's state", partial(_check_active, state, batch_id, entries))


@contextmanager
def _attempts_kept_on_transient(state: WorkerState, batch_id: str, todo: list[ChunkEntry]) -> Iterator[None]:
    """An outage the chunk could not wait out, or a drain out of time, is handed back; it is not a
    death of the worker, so this delivery must not count against the jobs' attempts (best effort:
    Redis may be down still)."""
    try:
        yield
    except (Exception, HandBack) as e:
        if isinstance(e, HandBack) or is_transient(e):
            _best_effort("taking back the delivery's attempts",
                         partial(state.board.release_attempts, batch_id, [entry.index for entry in todo]))
        raise


def _prepare(state: WorkerState, chunk: Chunk, todo: list[ChunkEntry]) -> Inputs:
    """LoRAs, embeddings, VAE and upscalers switched between chunks; input images and masks; all
    verified. A failure here is the jobs' files, not this node: the jobs fail, the worker serves on."""
    try:
        return prepare(state.loaded, state.assets, state.masks, [e.job for e in todo])
    except Exception as e:
        if is_transient(e):
            raise  # S3 blinked: retried, not failed
        reason = str(e) if isinstance(e, AssetError | InvalidInput) else f"preparing the chunk: {type(e).__name__}: {e}"
        log.error("chunk %s: %s", chunk.id, reason)
        fail_entries(state, chunk.batch_id, todo, reason, "asset")
        raise _Stop({"failed": len(todo)}) from e


def _render(state: WorkerState, chunk: Chunk, todo: list[ChunkEntry], inputs: Inputs
            ) -> tuple[list[Rendered], dict[str, float]]:
    """One batched call, one generator per image (split in halves on OOM). An image that comes out
    NaN is a RenderError in its place (its job fails alone, in _store_all); a job that breaks the
    pipeline fails the chunk with its reason; the worker serves on."""
    started_at = time.time()
    _set_busy(state, chunk)
    t0 = time.perf_counter()
    try:
        state.drain.rendering = True  # first, then the check: a request in between is not lost
        try:
            if state.drain.requested:  # the drain's time ran out while the chunk was prepared
                raise HandBack("the worker is draining and its time is up")
            images = render_split(state.loaded, [e.job for e in todo], partial(render_each, inputs=inputs))
        finally:
            state.drain.rendering = False  # the failure handling below is never interrupted
    except Exception as e:
        log.exception("render failed for chunk %s", chunk.id)
        fail_entries(state, chunk.batch_id, todo, f"{type(e).__name__}: {e}", "render")
        if not isinstance(e, RenderError):  # NaN comes from the job (weights, model), not this node
            state.health.failure(f"{type(e).__name__}: {e}")
        raise _Stop({"failed": len(todo)}) from e
    finally:
        _set_busy(state, None)
    render_s = time.perf_counter() - t0
    state.metrics.rendered(render_s, len(todo), todo[0].job.width, todo[0].job.height)
    if warning := visibility_warning(time.monotonic() - state.delivered_at, state.settings.visibility_timeout):
        log.warning("chunk %s: %s", chunk.id, warning)
    return images, {"render_started_at": started_at, "chunk_render_s": render_s,
                    "render_s_per_image": render_s / len(todo), "chunk_size": len(todo)}


def visibility_warning(held_s: float, visibility_timeout: int) -> str | None:
    """Why a chunk held this long is at risk: past the visibility timeout, Redis hands the unacked
    message to another worker, which renders the chunk again (storage keeps one copy, but the GPU
    time is spent twice)."""
    if held_s <= 0.8 * visibility_timeout:
        return None
    verdict = "past" if held_s > visibility_timeout else "close to"
    return (f"held {held_s:.0f}s before its upload, {verdict} SDFARM_VISIBILITY_TIMEOUT ({visibility_timeout}s):"
            " Redis may deliver it to another worker too; raise the timeout or lower SDFARM_CHUNK_SIZE")


def _store_all(state: WorkerState, batch_id: str, todo: list[ChunkEntry], images: list[Rendered],
               timings: dict[str, float]) -> int:
    """Encode, store and report each image, in the upload threads, side by side; a job whose image
    is a RenderError (NaN) fails with its reason. Returns how many jobs failed."""
    bad = [(e, img) for e, img in zip(todo, images, strict=True) if isinstance(img, RenderError)]
    futures = [state.pool.submit(_store_one, state, batch_id, e, img, timings)
               for e, img in zip(todo, images, strict=True) if not isinstance(img, RenderError)]
    for entry, error in bad:
        fail_entries(state, batch_id, [entry], str(error), "render")
    wait(futures)  # all of them, before the first error is raised: no upload outlives its chunk
    for f in futures:
        f.result()
    return len(bad)


def _set_busy(state: WorkerState, chunk: Chunk | None) -> None:
    """What this worker renders, for `sdfarm workers` and the fault tests. Best effort: Redis
    blinking here must not mask the chunk's own outcome."""
    workers = state.board.workers()
    try:
        if chunk is None:
            workers.clear_busy(state.hostname)
        else:
            workers.set_busy(state.hostname, chunk.id, chunk.batch_id)
    except Exception as e:
        log.warning("could not mark this worker %s: %s", "idle" if chunk is None else "busy", e)


def process_chunk(state: WorkerState, payload: Any, digest: str = "") -> dict[str, int]:
    try:
        chunk = _load_chunk(state, payload, digest)  # 1. load the chunk, checked again
        _best_effort("reading the batch's enqueue time", partial(_queue_wait, state, chunk.batch_id))
        todo = _to_render(state, chunk)  # 2. skip jobs done; count this delivery (poison jobs stop here)
        with _attempts_kept_on_transient(state, chunk.batch_id, todo):
            _still_active(state, chunk.batch_id, todo)  # checked again right before the GPU starts
            inputs = until_back(state, "preparing the chunk", partial(_prepare, state, chunk, todo))  # 3. LoRAs...
            images, timings = _render(state, chunk, todo, inputs)  # 4. render as one batched call
            _still_active(state, chunk.batch_id, todo)  # and before anything is uploaded
            failed = _store_all(state, chunk.batch_id, todo, images, timings)  # 5-7. encode, store, report
    except _Stop as stop:
        return stop.outcome
    state.counters["chunks"] += 1
    state.health.success()
    outcome = {"rendered": len(todo) - failed, "skipped": len(chunk.entries) - len(todo)}
    return {**outcome, "failed": failed} if failed else outcome


def register_tasks(app: Celery) -> None:
    @app.task(name=RENDER_TASK, bind=True)
    def render_chunk(self: Task, payload: Any) -> dict[str, int]:
        state = get_state()
        state.drain.install()  # here, in the task: billiard resets the child's signals after its initializer
        soft_limit = self.app.conf.task_soft_time_limit or state.settings.task_time_limit
        state.delivered_at = time.monotonic()
        state.retry_until = state.delivered_at + RETRY_SHARE * soft_limit
        try:
            return run_chunk(self.app, state, payload, message_digest(self.request.id or "", payload))
        except HandBack as e:  # a drain out of time: back in the queue at once, for another worker
            log.warning("handing the chunk back unacknowledged: %s", e)
            raise Reject(str(e), requeue=True) from e
        except Exception as e:  # an outage outlasted the wait in place: never acknowledged
            if not is_transient(e):
                raise
            log.error("handing the chunk back unacknowledged: a dependency is still unreachable: %s", e)
            raise Reject(str(e), requeue=True) from e


def run_chunk(app: Celery, state: WorkerState, payload: Any, digest: str) -> dict[str, int]:
    """The chunk, or its hand-back; then this worker's health, and the batch's end announced."""
    try:
        result = process_chunk(state, payload, digest)
    except (NewerSchema, NodeFault) as e:
        result = hand_back(app, state, payload, digest, e)  # or, past the cap, its outcome
    if state.health.streak:
        _best_effort("checking this worker's health", partial(maybe_block, app, state))
    until_back(state, "announcing a finished batch", partial(announce_if_finished, app, state, payload))
    return result


def hand_back(app: Celery, state: WorkerState, payload: Any, digest: str, fault: NewerSchema | NodeFault
              ) -> dict[str, int]:
    """Give the message back for another worker (Reject, requeue), at most max_handbacks times, then
    set it aside: a newer-schema message is dead-lettered, a chunk no worker could serve fails its
    jobs with the reason. Only a NodeFault counts toward blocking this worker."""
    count = until_back(state, "counting a hand-back", partial(state.board.hand_back, digest))
    if isinstance(fault, NodeFault):
        state.health.failure(str(fault))
    cap = state.settings.max_handbacks
    if count > cap:
        reason = f"handed back {cap} times, no worker took it: {fault}"
        if isinstance(fault, NewerSchema):
            return dead_letter(state, payload, digest, reason)
        chunk = Chunk.model_validate(payload, context=RECORDED)
        todo = until_back(state, "looking for jobs already done",
                          partial(_skip_done, state, chunk.batch_id, list(chunk.entries)))
        fail_entries(state, chunk.batch_id, todo, reason, "handback")
        return {"failed": len(todo), "skipped": len(chunk.entries) - len(todo)}
    log.error("handing the chunk back (%d of %d times): %s", count, cap, fault)
    time.sleep(HAND_BACK_PAUSE_S)  # by then a peer's success before this failure is in its heartbeat
    if isinstance(fault, NodeFault):
        _best_effort("checking this worker's health", partial(maybe_block, app, state))
    raise Reject(str(fault), requeue=True) from fault


def announce_if_finished(app: Celery, state: WorkerState, payload: Any) -> None:
    """The worker that finishes a batch's last job hands it to the control queue (hooks, exports).
    A send that fails gives the claim back, so the step can run again."""
    batch_id = payload.get("batch_id") if isinstance(payload, dict) else None
    if not isinstance(batch_id, str):
        return
    progress = state.board.read(batch_id)
    if progress is None or not progress.finished or not state.board.claim_finish(batch_id):
        return
    try:
        app.send_task(BATCH_FINISHED_TASK, args=[batch_id], queue=CONTROL_QUEUE)
    except Exception:
        _best_effort("giving the finish claim back", partial(state.board.unclaim_finish, batch_id))
        raise


def maybe_block(app: Celery, state: WorkerState) -> None:
    """Stop consuming when this worker keeps failing while a peer on the same model succeeds."""
    health = state.health
    if health.blocked or health.streak < state.settings.block_after_failures:
        return
    model = state.loaded.entry.name
    peer = state.board.workers().succeeding_peer(state.hostname, model, health.streak_started_at)
    if peer is None:
        return  # everyone fails: the jobs or a shared dependency are at fault, not this node
    health.blocked = (f"stopped taking work after {health.streak} failures in a row while {peer} succeeds on"
                      f" {model}; last: {health.recent[-1][1]}")
    log.error("%s", health.blocked)
    state.board.workers().set_health(state.hostname, health.beat())
    app.control.cancel_consumer(queue_name(model), destination=[state.hostname])
