"""The gallery at /: server-rendered pages (templates/), a little plain JS (static/), no build step.

    /login, /logout                      the token form; the session cookie (pages.py)
    /                                    recent batches, live progress bars
    /batches/<id>                        counts, state, cancel/pause/resume, thumbnails (filter by
                                         prompt text or seed, paged), failures with reasons
    /images/<job id>                     the image, its infotext ("copy parameters"), its sidecar
    /thumbs/<job id>, /images/<job id>/image.png, /images/<job id>/sidecar.json   proxied from S3
    /gallery/...                         what the pages' script polls (JSON, the grid's HTML)

Every page but the login form needs a session (else a redirect to it); the data the pages load needs
one too (else 401). Ids in paths are checked (lowercase hex, their lengths) before S3 is asked.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from sdfarm.errors import InvalidInput, SdfarmError, UnknownBatch, printable
from sdfarm.layout import image_key, sidecar_key, thumbnail_key
from sdfarm.progress import CANCELLED, PAUSED, Progress
from sdfarm.store import MissingObject
from sdfarm.thumbnails import CONTENT_TYPE as THUMBNAIL_TYPE
from sdfarm.thumbnails import thumbnail_of_png

from .. import browse
from ..farm import Farm
from .app import farm_of
from .pages import (
    HERE,
    IMMUTABLE,
    NO_STORE,
    SECURITY_HEADERS,
    Data,
    Object,
    Page,
    auth_of,
    check_form,
    clear_session,
    fragment,
    local_path,
    render,
    same_origin,
    session_name,
    set_session,
)

log = logging.getLogger("sdfarm.api.gallery")
router = APIRouter(include_in_schema=False)

BATCH_ID = re.compile(r"[0-9a-f]{16,64}")  # sdfarm.jobs.Chunk.batch_id
JOB_ID = re.compile(r"[0-9a-f]{32}")  # sdfarm.jobs: a job's id
BATCHES_PER_PAGE = 20
ACTIONS = ("cancel", "pause", "resume")
STATIC = {"gallery.css": "text/css", "gallery.js": "text/javascript"}
MAX_FILTER_CHARS = 200
MAX_FAILURES_SHOWN = 50
# what the image page lists of a job (the sidecar, below them, has everything)
SHOWN_PARAMS = (("prompt", "Prompt"), ("negative_prompt", "Negative prompt"), ("seed", "Seed"), ("model", "Model"),
                ("width", "Width"), ("height", "Height"), ("steps", "Steps"), ("sampler", "Sampler"),
                ("guidance_scale", "CFG scale"))


def checked(pattern: re.Pattern[str], value: str, what: str) -> str:
    """An id from a path, or 404 (nothing else reaches S3 or Redis)."""
    if not pattern.fullmatch(value):
        raise HTTPException(404, f"no such {what}")
    return value


def progress_json(p: Progress) -> dict[str, Any]:
    return {"batch_id": p.batch_id, "name": p.name, "state": shown_state(p), "total": p.total, "done": p.done,
            "failed": p.failed, "queued": p.queued, "finished": p.finished}


def shown_state(p: Progress) -> str:
    """finished once every job is done or failed; else active, paused or cancelled."""
    return "finished" if p.finished else p.state


def job_lists(request: Request) -> browse.JobLists:
    """The farm's cache of batches' job lists (shared with the API's image pages)."""
    return farm_of(request).job_lists


def not_found(request: Request, what: str) -> Response:
    return render(request, "error.html", status_code=404, title="Not found", message=f"No such {what}.")


# ---------------------------------------------------------------------------------------------- session


@router.get("/login")
def login_form(request: Request, then: str = Query("/", alias="next")) -> Response:
    if session_name(request) is not None:
        return RedirectResponse(local_path(then), status_code=303)
    return render(request, "login.html", title="Log in", next=local_path(then), error=None)


@router.post("/login")
def login(request: Request, token: str = Form("", max_length=4096), then: str = Form("/", alias="next")
          ) -> Response:
    same_origin(request)
    name = auth_of(request).token_name(token) if token else None
    if name is None:
        log.warning("gallery: a login with a token that names no caller was refused")
        return render(request, "login.html", status_code=401, title="Log in", next=local_path(then),
                      error="That token is not valid.")
    log.info("gallery: %s logged in", name)
    response = RedirectResponse(local_path(then), status_code=303, headers=NO_STORE)
    set_session(response, request, name)
    return response


@router.post("/logout")
def logout(request: Request, csrf: str = Form("")) -> Response:
    if session_name(request) is not None:
        check_form(request, csrf)
    response = RedirectResponse("/login", status_code=303, headers=NO_STORE)
    clear_session(response, request)
    return response


@router.get("/gallery/static/{name}")
def static(name: str) -> Response:
    if name not in STATIC:
        raise HTTPException(404, "no such file")
    return FileResponse(HERE / "static" / name, media_type=STATIC[name],
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


# ---------------------------------------------------------------------------------------------- batches


@router.get("/")
def batches(request: Request, page: int = Query(1, ge=1, le=10_000), _: str = Page) -> Response:
    farm = farm_of(request)
    found = farm.recent(BATCHES_PER_PAGE + 1, (page - 1) * BATCHES_PER_PAGE)
    return render(request, "batches.html", title="Batches", batches=found[:BATCHES_PER_PAGE], page=page,
                  more=len(found) > BATCHES_PER_PAGE, shown_state=shown_state)


@router.get("/gallery/batches.json")
def batches_json(request: Request, page: int = Query(1, ge=1, le=10_000), _: str = Data) -> Response:
    found = farm_of(request).recent(BATCHES_PER_PAGE, (page - 1) * BATCHES_PER_PAGE)
    return JSONResponse({"batches": [progress_json(p) for p in found]}, headers=NO_STORE)


@router.get("/batches/{batch_id}")
def batch(request: Request, batch_id: str, q: str = Query("", max_length=MAX_FILTER_CHARS),
          seed: str = Query("", max_length=20), page: int = Query(1, ge=1), _: str = Page) -> Response:
    checked(BATCH_ID, batch_id, "batch")
    farm = farm_of(request)
    try:
        rows, grid = _grid(request, batch_id, q, seed, page)
    except UnknownBatch:
        return not_found(request, "batch")
    progress = farm.board.read(batch_id)
    failures = farm.failures(batch_id, MAX_FAILURES_SHOWN)
    failed_count = max(progress.failed if progress else 0, len(failures))
    return render(request, "batch.html", title=f"Batch {progress.name if progress and progress.name else batch_id}",
                  batch_id=batch_id, progress=progress, total=len(rows), shown_state=shown_state, grid=grid,
                  q=q, seed=seed, failures=failures, failed_count=failed_count, actions=actions(progress))


def _grid(request: Request, batch_id: str, q: str, seed: str, page: int) -> tuple[list[browse.JobRow], browse.Page]:
    """The batch's jobs, and the page of those that pass the filter (a seed that is no number matches none)."""
    farm = farm_of(request)
    rows = job_lists(request).rows(batch_id)
    wanted = seed.strip()
    if wanted and not (wanted.isascii() and wanted.isdigit()):
        chosen: list[browse.JobRow] = []
    else:
        chosen = browse.matching(rows, q.strip(), int(wanted) if wanted else None)
    return rows, browse.page_of(farm.store, farm.board, batch_id, chosen, page)


def actions(p: Progress | None) -> list[str]:
    """The buttons a batch's state calls for."""
    if p is None or p.finished:
        return []
    if p.state == CANCELLED:
        return ["resume"]
    if p.state == PAUSED:
        return ["resume", "cancel"]
    return ["pause", "cancel"]


@router.get("/gallery/batches/{batch_id}/progress")
def batch_progress(request: Request, batch_id: str, _: str = Data) -> Response:
    checked(BATCH_ID, batch_id, "batch")
    p = farm_of(request).board.read(batch_id)
    if p is None:
        raise HTTPException(404, "no live progress for this batch")
    return JSONResponse(progress_json(p), headers=NO_STORE)


@router.get("/gallery/batches/{batch_id}/tiles")
def batch_tiles(request: Request, batch_id: str, q: str = Query("", max_length=MAX_FILTER_CHARS),
                seed: str = Query("", max_length=20), page: int = Query(1, ge=1), _: str = Data) -> Response:
    """The grid of the batch page, for its script to refresh as jobs finish."""
    checked(BATCH_ID, batch_id, "batch")
    try:
        grid = _grid(request, batch_id, q, seed, page)[1]
    except UnknownBatch as e:
        raise HTTPException(404, "no such batch") from e
    return fragment("_tiles.html", grid=grid, batch_id=batch_id, q=q, seed=seed)


@router.post("/batches/{batch_id}/{action}")
def control(request: Request, batch_id: str, action: str, csrf: str = Form(""), _: str = Page) -> Response:
    checked(BATCH_ID, batch_id, "batch")
    if action not in ACTIONS:
        raise HTTPException(404, "no such action")
    check_form(request, csrf)
    farm = farm_of(request)
    try:
        _act(farm, action, batch_id)
    except UnknownBatch:
        return not_found(request, "batch")
    except InvalidInput as e:
        return render(request, "error.html", status_code=409, title="Not done", message=printable(str(e)))
    log.info("gallery: %s: %s batch %s", session_name(request), action, batch_id)
    return RedirectResponse(f"/batches/{batch_id}", status_code=303, headers=NO_STORE)


def _act(farm: Farm, action: str, batch_id: str) -> None:
    if action == "cancel":
        farm.cancel(batch_id)
    elif action == "pause":
        farm.pause(batch_id)
    else:
        farm.resume(batch_id)


# ---------------------------------------------------------------------------------------------- images


@router.get("/images/{job_id}")
def image_page(request: Request, job_id: str, _: str = Page) -> Response:
    checked(JOB_ID, job_id, "image")
    try:
        meta = farm_of(request).store.get_json(sidecar_key(job_id))
    except MissingObject:
        return not_found(request, "image (not rendered, or not yet)")
    batch_id = str(meta.get("batch_id", ""))
    job, image = meta.get("job") or {}, meta.get("image") or {}
    params = [(key, label, job[key]) for key, label in SHOWN_PARAMS if job.get(key) not in (None, "")]
    size = (image["width"], image["height"]) if image.get("width") and image.get("height") else None
    return render(request, "image.html", title=f"Image {job_id}", job_id=job_id, prompt=job.get("prompt", ""),
                  params=params, size=size, infotext=meta.get("infotext", ""),
                  batch_id=batch_id if BATCH_ID.fullmatch(batch_id) else None,
                  sidecar=json.dumps(meta, indent=1, ensure_ascii=False))


@router.get("/images/{job_id}/image.png")
def image_png(request: Request, job_id: str, _: str = Object) -> Response:
    return _object(request, image_key(checked(JOB_ID, job_id, "image")), "image/png")


@router.get("/images/{job_id}/sidecar.json")
def image_sidecar(request: Request, job_id: str, _: str = Object) -> Response:
    return _object(request, sidecar_key(checked(JOB_ID, job_id, "image")), "application/json")


def _object(request: Request, key: str, media_type: str) -> Response:
    try:
        data = farm_of(request).store.get(key)
    except MissingObject as e:
        raise HTTPException(404, "not rendered (yet)") from e
    return Response(data, media_type=media_type, headers={**IMMUTABLE, **SECURITY_HEADERS})


@router.get("/thumbs/{job_id}")
def thumb(request: Request, job_id: str, _: str = Object) -> Response:
    """The job's thumbnail. An image stored before workers wrote thumbnails gets one now, from its
    PNG, stored put-if-absent like the worker's."""
    store = farm_of(request).store
    key = thumbnail_key(checked(JOB_ID, job_id, "image"))
    try:
        data = store.get(key)
    except MissingObject:
        try:
            data = thumbnail_of_png(store.get(image_key(job_id)))
        except MissingObject as e:
            raise HTTPException(404, "not rendered (yet)") from e
        except (OSError, ValueError) as e:  # a stored PNG Pillow cannot read
            raise HTTPException(404, f"the image cannot be read: {type(e).__name__}") from e
        try:
            store.put_if_absent(key, data, THUMBNAIL_TYPE)
        except SdfarmError as e:  # read-only credentials, say: serve it all the same
            log.warning("gallery: could not store the thumbnail of %s: %s", job_id, e)
    return Response(data, media_type=THUMBNAIL_TYPE, headers={**IMMUTABLE, **SECURITY_HEADERS})
