"""The native API under /v1: the command line's operations over HTTP, each through the farm
(producer/farm.py), each behind a token (`Caller`).

    POST /v1/batches                     a batch: a JSON body (the batch-file schema) or an uploaded file
    GET  /v1/batches, /v1/batches/{id}   recent batches (paged); one with images/s, ETA and failures
    POST /v1/batches/{id}/cancel|pause|resume|retry|reconcile
    GET  /v1/batches/{id}/images         finished images (paged) with presigned links
    GET  /v1/batches/{id}/events         server-sent events: progress, heartbeats, the end
    GET  /v1/workers, /v1/models         live workers; the registry

A batch id in a path is 16..64 lowercase hex digits, checked before Redis or S3 is asked (422
otherwise). Blocking routes are plain functions, run in the threadpool; the event stream is a
coroutine that borrows a thread for each look at Redis only.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.datastructures import UploadFile

from sdfarm.batchfile import FORMATS, cap_problem
from sdfarm.errors import BatchInvalid, InvalidInput, Problem, brief, is_transient, printable
from sdfarm.models import FAMILY_FREE
from sdfarm.progress import ACTIVE, CANCELLED, PAUSED, Progress
from sdfarm.queue import DEFAULT_PRIORITY

from ..farm import Farm
from ..fetch import MAX_LINK_S
from . import schemas
from .app import Caller, farm_of

router = APIRouter(prefix="/v1", tags=["native"])

JSON_SOURCE = "request.json"  # a JSON body's name in problems (and the batch's name when it gives none)
UPLOAD_FIELD = "file"
MAX_EVENTS_S = 3600.0  # an event stream ends after this long at most (the client reconnects)
POLL_S = 0.5  # the event stream's look at the batch's progress
RETRY_MS = 2000  # what an event stream's client waits before it reconnects

BatchId = Annotated[str, PathParam(pattern=schemas.BATCH_ID_PATTERN, description="16..64 lowercase hex digits")]
_REFUSED: dict[int | str, dict[str, Any]] = {
    404: {"model": schemas.Detail, "description": "unknown batch"},
    422: {"description": "invalid input (a bad batch id, a batch the request cannot act on)"}}


# ---------------------------------------------------------------------------- submitting


@dataclass(frozen=True)
class BatchText:
    """A batch file's text as the request gave it: its format and the name problems give it."""

    text: str
    fmt: str
    source: str


async def batch_text(request: Request) -> BatchText:
    """The body: JSON (the batch-file schema), or a batch file uploaded as multipart field `file`."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return BatchText(_decoded(await request.body(), JSON_SOURCE), "json", JSON_SOURCE)
    if media == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=4)
        try:
            upload = form.get(UPLOAD_FIELD)
            if not isinstance(upload, UploadFile):
                raise InvalidInput(f"expected a batch file in the multipart field {UPLOAD_FIELD!r}")
            source = PurePosixPath((upload.filename or "").replace("\\", "/")).name[:200] or "upload"
            fmt = FORMATS.get(PurePosixPath(source).suffix.lower())
            if fmt is None:
                allowed = ", ".join(FORMATS)
                raise BatchInvalid([Problem(source, None, None, "", f"unknown file type"
                                            f" {brief(PurePosixPath(source).suffix)} (allowed: {allowed})")])
            return BatchText(_decoded(await upload.read(), source), fmt, source)
        finally:
            await form.close()
    raise HTTPException(415, "a batch is a JSON body (Content-Type: application/json) or a batch file in the"
                             f" multipart/form-data field {UPLOAD_FIELD!r}; got {brief(media or 'no Content-Type')}")


def _decoded(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BatchInvalid([Problem(source, None, None, "", f"not UTF-8 text: {e.reason} at byte {e.start}")]) from None


Body = Depends(batch_text)
_MULTIPART = {"type": "object", "required": [UPLOAD_FIELD], "properties": {UPLOAD_FIELD: {
    "type": "string", "format": "binary", "description": f"a batch file: {', '.join(FORMATS)} (format by suffix)"}}}


@router.post("/batches", dependencies=[Caller], response_model=schemas.Submitted | schemas.DryRun,
             responses={413: {"model": schemas.Detail, "description": "body over SDFARM_API_MAX_BODY_BYTES"},
                        415: {"model": schemas.Detail, "description": "neither JSON nor multipart"},
                        422: {"model": schemas.Problems, "description": "the batch's problems; nothing enqueued"}},
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": schemas.BatchDocument.model_json_schema()},
                 "multipart/form-data": {"schema": _MULTIPART}}}})
def submit(request: Request, body: BatchText = Body,
           dry_run: bool = Query(False, description="validate and return the plan; enqueue nothing"),
           priority: int = Query(DEFAULT_PRIORITY, ge=0, le=9, description="0 lowest .. 9 highest"),
           model: str | None = Query(None, description="the model of items that name none (a .txt file's)"),
           name: str | None = Query(None, description="the batch's name (default: the document's, else the"
                                                      " file's stem)")) -> schemas.Submitted | schemas.DryRun:
    """Validate a batch as `sdfarm submit` does (all or nothing) and enqueue its jobs not done yet."""
    farm = farm_of(request)
    limit = farm.settings.api_max_jobs
    try:
        stream = farm.plan_text(body.text, body.fmt, body.source, {"model": model} if model else None, name, limit)
        if dry_run:
            plan = farm.describe(stream)
            record = stream.record()
            return schemas.DryRun(batch_id=record.batch_id, name=record.name, jobs=record.job_count, plan=plan)
        result = farm.submit(stream, priority)
    except BatchInvalid as e:
        raise _api_cap(e, body.source, limit, farm) from None
    return schemas.Submitted(batch_id=result.batch_id, name=stream.record().name, jobs=result.jobs,
                             chunks_enqueued=result.chunks_enqueued, already_done=result.already_done,
                             priority=priority, state=farm.state(result.batch_id))


def _api_cap(e: BatchInvalid, source: str, limit: int, farm: Farm) -> BatchInvalid:
    """The planner's job-cap problem, told as the API's cap when that one is the lower."""
    if limit >= farm.settings.max_jobs_per_batch:
        return e
    planner_says = cap_problem(source, limit).message
    ours = Problem(source, None, None, "", f"the batch expands to more than {limit} jobs (allowed: at most {limit}"
                                          " through the API, SDFARM_API_MAX_JOBS; larger batches: `sdfarm submit`)")
    return BatchInvalid([ours if p.message == planner_says else p for p in e.problems], e.stopped)


# ---------------------------------------------------------------------------- watching


class Rates:
    """images/s of the batches this process looks at: per batch a sliding window of (time, jobs done or
    failed), as `sdfarm watch` keeps, sampled at most every MIN_GAP_S; the least recently seen dropped."""

    WINDOW_S = 30.0
    MIN_GAP_S = 0.5
    MIN_SPAN_S = 1.0
    KEPT = 4096

    def __init__(self) -> None:
        self._samples: OrderedDict[str, deque[tuple[float, int]]] = OrderedDict()
        self._lock = threading.Lock()

    def per_s(self, batch_id: str, moved: int, now: float) -> float | None:
        """The rate over the window, with this look counted; None until it spans MIN_SPAN_S."""
        with self._lock:
            samples = self._samples.pop(batch_id, None) or deque()
            self._samples[batch_id] = samples
            if len(self._samples) > self.KEPT:
                self._samples.popitem(last=False)
            if not samples or now - samples[-1][0] >= self.MIN_GAP_S:
                samples.append((now, moved))
            while len(samples) > 1 and now - samples[0][0] > self.WINDOW_S:
                samples.popleft()
            (t0, d0), (t1, d1) = samples[0], samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 - t0 >= self.MIN_SPAN_S else None


def rates_of(request: Request) -> Rates:
    rates: Rates | None = getattr(request.app.state, "native_rates", None)
    if rates is None:  # a race here loses a few samples at most
        rates = request.app.state.native_rates = Rates()
    return rates


def status_of(p: Progress) -> schemas.Status:
    if p.state == PAUSED:
        return "paused"
    if p.state == CANCELLED:
        return "cancelled"
    if p.finished:
        return "failed" if p.failed else "done"
    return "running"


def batch_view(p: Progress) -> schemas.BatchView:
    return schemas.BatchView(batch_id=p.batch_id, name=printable(p.name), state=p.state, status=status_of(p),
                             total=p.total, done=p.done, failed=p.failed, queued=p.queued, rendered=p.rendered,
                             submitted_at=p.submitted_at, finished=p.finished)


def progress_view(farm: Farm, rates: Rates, p: Progress) -> schemas.BatchProgress:
    """The batch with its rate and ETA (blocking: may ask Redis when its chunks were enqueued)."""
    view = batch_view(p)
    rate = 0.0
    eta = 0.0 if p.finished else None
    if view.status == "running":
        window = rates.per_s(p.batch_id, p.done + p.failed, time.monotonic())
        if window is None:  # the mean since submit (a retry or reconcile since does not skew it)
            elapsed = time.time() - p.submitted_at
            window = (p.done + p.failed) / elapsed if elapsed > 0 else 0.0
        rate = max(window, 0.0)  # done + failed drops for a moment when a retry re-enqueues failed jobs
        eta = round(p.queued / rate, 1) if rate > 0 else None
    return schemas.BatchProgress(**view.model_dump(), images_per_s=round(rate, 3), eta_s=eta)


@router.get("/batches", dependencies=[Caller], response_model=schemas.BatchPage)
def list_batches(request: Request, limit: int = Query(20, ge=1, le=100),
                 offset: int = Query(0, ge=0, le=10_000)) -> schemas.BatchPage:
    """The most recent batches first (those Redis still holds)."""
    farm = farm_of(request)
    batches = [batch_view(p) for p in farm.recent(limit, offset)]
    more = farm.board.batch_count() > offset + limit  # a page may come back short: expired batches are left out
    return schemas.BatchPage(batches=batches, limit=limit, offset=offset, next_offset=offset + limit if more else None)


@router.get("/batches/{batch_id}", dependencies=[Caller], response_model=schemas.BatchDetail, responses=_REFUSED)
def get_batch(request: Request, batch_id: BatchId,
              failures: int = Query(20, ge=0, le=100, description="failed jobs to list with their reasons")
              ) -> schemas.BatchDetail:
    """Counts, state, images/s, ETA, and failed jobs with the reasons their workers recorded."""
    farm = farm_of(request)
    p = farm.progress(batch_id)
    found = farm.failures(batch_id, failures) if p.failed and failures else []
    return schemas.BatchDetail(**progress_view(farm, rates_of(request), p).model_dump(), failures=found)


def known_batch(request: Request, batch_id: BatchId) -> Progress:
    """The batch's progress: 404 for an unknown batch, before an event stream starts."""
    return farm_of(request).progress(batch_id)


KnownBatch = Depends(known_batch)


@router.get("/batches/{batch_id}/events", dependencies=[Caller], response_class=EventSourceResponse,
            responses=_REFUSED)
async def events(request: Request, batch_id: BatchId, first: Progress = KnownBatch,
                 timeout_s: float = Query(600.0, ge=1, le=MAX_EVENTS_S, description="end the stream after this"),
                 heartbeat_s: float = Query(15.0, ge=1, le=60, description="a heartbeat after this long unchanged")
                 ) -> AsyncIterator[ServerSentEvent]:
    """Server-sent events: `progress` (a BatchProgress) first and at each change, `heartbeat` while
    nothing changes, then one `end` (reason finished, cancelled or timeout, with the batch) and the
    stream closes; an `error` (the batch gone from Redis) ends it too. A client that goes away ends
    it at once."""
    farm, rates = farm_of(request), rates_of(request)
    deadline = time.monotonic() + timeout_s
    p = first
    view = await run_in_threadpool(progress_view, farm, rates, p)
    yield ServerSentEvent(event="progress", data=view, retry=RETRY_MS)
    seen, beat = _moves(p), time.monotonic()
    while True:
        ended = ("cancelled" if p.state == CANCELLED else "finished" if p.finished
                 else "timeout" if time.monotonic() >= deadline else None)
        if ended is not None:
            yield ServerSentEvent(event="end", data=schemas.End(reason=ended, batch=view))
            return
        await anyio.sleep(POLL_S)
        try:
            p, view = await run_in_threadpool(_look, farm, rates, batch_id)
        except Exception as e:
            if not is_transient(e):
                yield ServerSentEvent(event="error", data=schemas.Detail(detail=printable(str(e))))
                return
            continue  # Redis blinked: look again
        now = time.monotonic()
        if _moves(p) != seen:
            seen, beat = _moves(p), now
            yield ServerSentEvent(event="progress", data=view)
        elif now - beat >= heartbeat_s:
            beat = now
            yield ServerSentEvent(event="heartbeat", data=schemas.Heartbeat(at=time.time()))


def _look(farm: Farm, rates: Rates, batch_id: str) -> tuple[Progress, schemas.BatchProgress]:
    p = farm.progress(batch_id)
    return p, progress_view(farm, rates, p)


def _moves(p: Progress) -> tuple[int, int, int, str]:
    return p.total, p.done, p.failed, p.state


# ---------------------------------------------------------------------------- controlling


@router.post("/batches/{batch_id}/cancel", dependencies=[Caller], response_model=schemas.StateChange,
             responses=_REFUSED)
def cancel(request: Request, batch_id: BatchId) -> schemas.StateChange:
    """Once this answers, no new render of the batch starts."""
    farm_of(request).cancel(batch_id)
    return schemas.StateChange(batch_id=batch_id, state=CANCELLED)


@router.post("/batches/{batch_id}/pause", dependencies=[Caller], response_model=schemas.StateChange,
             responses=_REFUSED)
def pause(request: Request, batch_id: BatchId) -> schemas.StateChange:
    """Workers drop the batch's chunks unrendered until it is resumed."""
    farm_of(request).pause(batch_id)
    return schemas.StateChange(batch_id=batch_id, state=PAUSED)


@router.post("/batches/{batch_id}/resume", dependencies=[Caller], response_model=schemas.Reconciled,
             responses=_REFUSED)
def resume(request: Request, batch_id: BatchId) -> schemas.Reconciled:
    """Clear a pause or a cancel and enqueue every job without an image."""
    result = farm_of(request).resume(batch_id)
    return schemas.Reconciled(batch_id=batch_id, state=ACTIVE, **asdict(result))


@router.post("/batches/{batch_id}/retry", dependencies=[Caller], response_model=schemas.Retried, responses=_REFUSED)
def retry(request: Request, batch_id: BatchId) -> schemas.Retried:
    """Enqueue the batch's failed jobs again (their attempt counts start over)."""
    return schemas.Retried(batch_id=batch_id, retried=farm_of(request).retry(batch_id))


@router.post("/batches/{batch_id}/reconcile", dependencies=[Caller], response_model=schemas.Reconciled,
             responses=_REFUSED)
def reconcile(request: Request, batch_id: BatchId) -> schemas.Reconciled:
    """Enqueue every job with no image that has not failed (safe any time); repairs Redis from S3."""
    result = farm_of(request).reconcile(batch_id)
    return schemas.Reconciled(batch_id=batch_id, state=ACTIVE, **asdict(result))


# ---------------------------------------------------------------------------- results and the farm


@router.get("/batches/{batch_id}/images", dependencies=[Caller], response_model=schemas.ImagePage,
            responses=_REFUSED)
def images(request: Request, batch_id: BatchId, limit: int = Query(50, ge=1, le=100), offset: int = Query(0, ge=0),
           expires_s: int = Query(3600, ge=60, le=MAX_LINK_S, description="how long the links stay valid")
           ) -> schemas.ImagePage:
    """Finished images in batch order: job, seed, prompt, infotext, size, and presigned GET links to the
    PNG, its sidecar and its thumbnail (null when the worker wrote none)."""
    farm = farm_of(request)
    farm.progress(batch_id)  # 404 for an unknown batch; 422 for one Redis no longer holds
    page = farm.images(batch_id, offset, limit, expires_s)
    return schemas.ImagePage(batch_id=batch_id, total=page.total, limit=limit, offset=offset,
                             next_offset=offset + limit if offset + limit < page.total else None, images=page.images)


@router.get("/workers", dependencies=[Caller], response_model=schemas.Workers)
def workers(request: Request) -> schemas.Workers:
    """Live workers, from their heartbeats: model, device, counters, health, the chunk in hand."""
    return schemas.Workers(workers=farm_of(request).workers())


@router.get("/models", dependencies=[Caller], response_model=schemas.Models)
def models(request: Request) -> schemas.Models:
    """The registry, as `sdfarm models` lists it: models and assets with their sources and identities."""
    farm = farm_of(request)
    registry, bucket = farm.registry, farm.settings.s3_bucket
    found = [_registered("model", entry.name, entry.family, lambda e=entry: registry.identity(e.name),
                         str(entry.path or entry.file or (f"s3://{bucket}/{entry.s3_key}" if entry.s3
                                                          else f"hub:{entry.hub}@{entry.revision}")))
             for entry in registry]
    assets = [_registered(kind, name, None if kind in FAMILY_FREE else asset.family,
                          lambda k=kind, n=name: registry.asset_identity(k, n),
                          str(asset.file or asset.path or f"s3://{bucket}/{asset.s3_key}"))
              for (kind, name), asset in sorted(registry.assets.items())]
    return schemas.Models(models=found, assets=assets)


def _registered(kind: str, name: str, family: str | None, identity: Any, source: str) -> schemas.Registered:
    try:
        return schemas.Registered(kind=kind, name=name, family=family, sha256=identity(), source=source)
    except InvalidInput as e:
        return schemas.Registered(kind=kind, name=name, family=family, sha256=None, source=source,
                                  problem=printable(str(e)))
