"""A1111's API under /sdapi/v1, for the tools that speak it (webuiapi scripts, bots, editor plugins),
pointed at the farm instead of one GPU. Every route needs a caller (`Caller`).

    POST /sdapi/v1/txt2img, /img2img   one batch of batch_size x n_iter jobs, waited for; A1111's answer
    GET  /sdapi/v1/sd-models, samplers, schedulers, loras, upscalers, latent-upscale-modes, sd-vae,
         scripts, options               what the farm offers, in A1111's shapes
    GET  /sdapi/v1/progress            the caller's calls in flight; POST /sdapi/v1/interrupt cancels them

A call's fields become batch items (a1111_request.py), submitted through the farm; the call then
waits without holding a thread (the batches of all waiting calls are looked at together, every
POLL_S) for at most SDFARM_API_SYNC_TIMEOUT_S (then 504, naming the batch, which goes on: poll
/v1/batches/{id}). The images come back from the bucket with their infotext. The service holds no
GPU and no model: many callers are served by as many workers as the farm has.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import secrets
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from PIL import Image

from sdfarm import __version__
from sdfarm.a1111 import Registered
from sdfarm.batchfile import BatchPlan
from sdfarm.errors import BatchInvalid, InvalidInput, is_transient
from sdfarm.infotext import parse_infotext
from sdfarm.inputs import Inputs
from sdfarm.jobs import HIRES_UPSCALERS, IMAGE_UPSCALERS, LATENT_UPSCALERS
from sdfarm.layout import image_key
from sdfarm.models import REFINER
from sdfarm.progress import CANCELLED, Progress
from sdfarm.samplers import (
    AUTOMATIC,
    DISCARD_PENULTIMATE,
    KARRAS,
    POLYEXPONENTIAL,
    SAMPLERS,
    SCHEDULE_TYPES,
    SECOND_ORDER,
)
from sdfarm.store import MissingObject

from ..farm import Farm
from .a1111_request import (
    FARM_OPTIONS,
    MAX_IMAGES,
    OVERRIDES,
    SCHEDULER_NAMES,
    Img2ImgRequest,
    Plan,
    Refused,
    Txt2ImgRequest,
    plan_request,
    request_problems,
)
from .app import Caller, Identified, farm_of

router = APIRouter(prefix="/sdapi/v1", tags=["A1111-compatible"])
counted = APIRouter(dependencies=[Caller])  # each call holds one of its token's request slots
# /progress and /interrupt get through while the token's slots are all taken by its own waiting calls
light = APIRouter(dependencies=[Identified])

POLL_S: Final = 0.05  # how often the waiting calls' batches are looked at (one Redis round trip for all)
READ_THREADS: Final = 8  # a call's images read from the bucket at once
# the infotext keys A1111 writes itself; the others are its extra_generation_params
_CORE_KEYS: Final = frozenset({"Prompt", "Negative prompt", "Steps", "Sampler", "CFG scale", "Seed", "Size-1",
                               "Size-2", "Model hash", "Model", "VAE hash", "VAE", "Variation seed",
                               "Variation seed strength", "Seed resize from-1", "Seed resize from-2",
                               "Denoising strength", "Clip skip", "RNG", "Version"})


@dataclass(frozen=True)
class Call:
    """One txt2img or img2img call in flight."""

    batch_id: str
    started_at: float


@dataclass
class Calls:
    """Each caller's calls in flight in this process (what /progress reports and /interrupt cancels),
    by the caller's name."""

    _by_caller: dict[str, dict[str, Call]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, caller: str, call: Call) -> None:
        with self._lock:
            self._by_caller.setdefault(caller, {})[call.batch_id] = call

    def remove(self, caller: str, batch_id: str) -> None:
        with self._lock:
            self._by_caller.get(caller, {}).pop(batch_id, None)

    def of(self, caller: str) -> list[Call]:
        with self._lock:
            return list(self._by_caller.get(caller, {}).values())


class Waiter:
    """The waiting calls' batches, all looked at together: one Redis round trip every POLL_S whatever
    the number of calls, from a task that runs while any call waits. Redis blinking meanwhile is
    ridden out. Touched from the event loop only."""

    def __init__(self) -> None:
        self._waiting: dict[str, list[asyncio.Future[Progress]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def finished(self, farm: Farm, batch_id: str, timeout_s: float) -> Progress | None:
        """The batch's progress once it is finished or cancelled; None past the timeout."""
        future: asyncio.Future[Progress] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(batch_id, []).append(future)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._look(farm))
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            return None
        finally:
            futures = self._waiting.get(batch_id, [])
            if future in futures:
                futures.remove(future)
            if not futures:
                self._waiting.pop(batch_id, None)

    async def _look(self, farm: Farm) -> None:
        while self._waiting:
            try:
                found = await run_in_threadpool(farm.board.read_many, list(self._waiting))
            except Exception as e:
                found = []
                if not is_transient(e):
                    for future in (f for futures in self._waiting.values() for f in futures if not f.done()):
                        future.set_exception(e)
            for progress in found:
                if progress.finished or progress.state == CANCELLED:
                    for future in self._waiting.get(progress.batch_id, []):
                        if not future.done():
                            future.set_result(progress)
            await asyncio.sleep(POLL_S)


@dataclass
class Service:
    """This process's A1111 state: the calls in flight, their waiter, and the registry as A1111 images
    are read against it (built once: it hashes what it has not hashed yet)."""

    calls: Calls = field(default_factory=Calls)
    waiter: Waiter = field(default_factory=Waiter)
    _known: Registered | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def known(self, farm: Farm) -> Registered:
        with self._lock:
            if self._known is None:
                self._known = Registered(farm.registry)
            return self._known


_SERVICE_LOCK = threading.Lock()


def service(app: FastAPI) -> Service:
    with _SERVICE_LOCK:
        if not hasattr(app.state, "a1111"):
            app.state.a1111 = Service()
        found: Service = app.state.a1111
        return found


# ---------------------------------------------------------------------------- txt2img, img2img


@counted.post("/txt2img", summary="A1111's txt2img: render and wait")
async def txt2img(body: Txt2ImgRequest, request: Request, name: str = Caller) -> JSONResponse:
    return await _render(request, name, body, "txt2img")


@counted.post("/img2img", summary="A1111's img2img and inpainting: render and wait")
async def img2img(body: Img2ImgRequest, request: Request, name: str = Caller) -> JSONResponse:
    return await _render(request, name, body, "img2img")


@dataclass(frozen=True)
class Submitted:
    batch: BatchPlan
    plan: Plan
    started_at: float


async def _render(request: Request, caller: str, req: Txt2ImgRequest | Img2ImgRequest, kind: str) -> JSONResponse:
    farm, state = farm_of(request), service(request.app)
    try:
        submitted = await run_in_threadpool(_submit, farm, state, caller, req, kind)
    except Refused as e:
        return JSONResponse({"detail": [{"loc": ["body", *_path(fld)], "msg": why, "type": "value_error"}
                                        for fld, why in e.problems]}, status_code=e.status)
    batch_id = submitted.batch.batch_id
    state.calls.add(caller, Call(batch_id, submitted.started_at))
    try:
        progress = await state.waiter.finished(farm, batch_id, farm.settings.api_sync_timeout_s)
    finally:
        state.calls.remove(caller, batch_id)
    if progress is None:
        return JSONResponse({"detail": f"the render did not finish within {farm.settings.api_sync_timeout_s:g} s;"
                                       f" batch {batch_id} goes on: poll /v1/batches/{batch_id}",
                             "batch_id": batch_id}, status_code=504)
    if progress.failed and progress.state != CANCELLED:
        failures = await run_in_threadpool(farm.failures, batch_id)
        reasons = "; ".join(f"image {f.index + 1}: {f.reason}" for f in failures)
        return JSONResponse({"detail": f"{progress.failed} of {progress.total} images failed: {reasons}",
                             "batch_id": batch_id, "failures": [{"job_id": f.job_id, "reason": f.reason}
                                                                for f in failures]}, status_code=500)
    return await run_in_threadpool(_answer, farm, req, submitted)


def _path(fld: str) -> list[str | int]:
    return [int(part) if part.isdigit() else part for part in fld.split(".") if part]


def _submit(farm: Farm, state: Service, caller: str, req: Txt2ImgRequest | Img2ImgRequest, kind: str
            ) -> Submitted:
    """Plan the request (Refused, with nothing written, when the farm cannot honour it), then submit it."""
    started_at = time.time()
    settings = farm.settings
    inputs = Inputs(farm.store, None)  # the request's own images only: never the service's disk
    model = "" if (req.override_settings or {}).get("sd_model_checkpoint") else default_model(farm)
    plan = plan_request(req, state.known(farm), model, inputs, settings.api_max_image_bytes,
                        min(MAX_IMAGES, settings.api_max_jobs))
    name = f"{kind} {caller} {time.strftime('%Y%m%d-%H%M%S')} {secrets.token_hex(4)}"  # a new batch each call
    try:
        batch = farm.plan_items(plan.items, f"sdapi/v1/{kind}", name, inputs)
    except BatchInvalid as e:
        raise Refused(request_problems(e.problems)) from None
    farm.submit_plan(batch)
    return Submitted(batch, plan, started_at)


def default_model(farm: Farm) -> str:
    """A1111's loaded checkpoint, on the farm: the registered model most live workers serve (ties: by
    name); with none live, the first registered model that renders on its own."""
    registry = farm.registry
    served = Counter(b.model for b in farm.workers()
                     if b.model in registry.entries and registry.entries[b.model].family != REFINER)
    if served:
        return min(served, key=lambda m: (-served[m], m))
    return next((e.name for e in registry if e.family != REFINER), "")


def _answer(farm: Farm, req: Txt2ImgRequest | Img2ImgRequest, submitted: Submitted) -> JSONResponse:
    """A1111's response: the images rendered (all of them, or those done before an interrupt) with
    their infotexts, the request echoed, and `info` as A1111's Processed.js() writes it."""
    jobs = submitted.batch.jobs

    def read(job_id: str) -> bytes | None:
        try:
            return farm.store.get(image_key(job_id))
        except MissingObject:  # not rendered: the call was interrupted
            return None

    with ThreadPoolExecutor(min(READ_THREADS, len(jobs))) as pool:
        pngs = [png for png in pool.map(read, [j.id for j in jobs]) if png is not None]
    infotexts = [_infotext(png) for png in pngs]
    parameters = req.model_dump()
    if isinstance(req, Img2ImgRequest):
        parameters.pop("include_init_images")
        if not req.include_init_images:
            parameters.update(init_images=None, mask=None)
    body = {"images": [base64.b64encode(png).decode() for png in pngs] if req.send_images else [],
            "parameters": parameters, "info": json.dumps(_info(farm, req, submitted, infotexts))}
    return JSONResponse(body)


def _infotext(png: bytes) -> str:
    with Image.open(io.BytesIO(png)) as image:  # text chunks before the pixels: read without decoding them
        return str(image.info.get("parameters", ""))


def _info(farm: Farm, req: Txt2ImgRequest | Img2ImgRequest, submitted: Submitted, infotexts: list[str]
          ) -> dict[str, Any]:
    job, plan = submitted.batch.jobs[0], submitted.plan
    count = len(plan.seeds)
    params = parse_infotext(infotexts[0]) if infotexts else {}
    vae = farm.registry.asset("vae", job.vae.name).file_name if job.vae else None
    return {
        "prompt": req.prompt, "all_prompts": [req.prompt] * count,
        "negative_prompt": req.negative_prompt, "all_negative_prompts": [req.negative_prompt] * count,
        "seed": plan.seeds[0], "all_seeds": plan.seeds, "subseed": plan.subseeds[0], "all_subseeds": plan.subseeds,
        "subseed_strength": req.subseed_strength, "width": req.width, "height": req.height,
        "sampler_name": job.sampler, "cfg_scale": req.cfg_scale, "steps": req.steps, "batch_size": req.batch_size,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": farm.registry.get(job.model).infotext_name, "sd_model_hash": job.model_hash[:10],
        "sd_vae_name": vae, "sd_vae_hash": job.vae.sha256[:10] if job.vae else None,
        "seed_resize_from_w": req.seed_resize_from_w, "seed_resize_from_h": req.seed_resize_from_h,
        "denoising_strength": req.denoising_strength,
        "extra_generation_params": {k: v for k, v in params.items() if k not in _CORE_KEYS},
        "index_of_first_image": 0, "infotexts": infotexts, "styles": req.styles or [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(submitted.started_at)),
        "clip_skip": job.clip_skip, "is_using_inpainting_conditioning": False, "version": f"sdfarm {__version__}",
        "sdfarm_batch_id": submitted.batch.batch_id,
    }


# ---------------------------------------------------------------------------- the caller's work


@light.get("/progress", summary="The caller's calls in flight, as A1111's progress")
def progress(request: Request, name: str = Identified, skip_current_image: bool = False) -> dict[str, Any]:
    """Over the caller's txt2img and img2img calls in flight in this process: images done of all
    (`state.job_no` of `state.job_count`), and the seconds left at the rate so far."""
    calls = service(request.app).calls.of(name)
    found = farm_of(request).board.read_many([c.batch_id for c in calls]) if calls else []
    total = sum(p.total for p in found)
    done = sum(p.done + p.failed for p in found)
    share = done / total if total else 0.0
    started = min((c.started_at for c in calls), default=time.time())
    elapsed = time.time() - started
    return {"progress": share, "eta_relative": elapsed / share - elapsed if share else 0.0,
            "state": {"skipped": False, "interrupted": any(p.state == CANCELLED for p in found),
                      "stopping_generation": False, "job": ",".join(c.batch_id for c in calls),
                      "job_count": total, "job_no": done, "sampling_step": 0, "sampling_steps": 0,
                      "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)) if calls else "0"},
            "current_image": None, "textinfo": None}


@light.post("/interrupt", summary="Cancel the caller's calls in flight")
def interrupt(request: Request, name: str = Identified) -> dict[str, list[str]]:
    """Cancels the batch of each of the caller's calls in flight in this process (other callers' go
    on); each call answers with the images done before."""
    farm = farm_of(request)
    calls = service(request.app).calls.of(name)
    for call in calls:
        farm.cancel(call.batch_id)
    return {"interrupted": [c.batch_id for c in calls]}


# ---------------------------------------------------------------------------- what the farm offers


@counted.get("/sd-models", summary="Registered models, as A1111's checkpoints")
def sd_models(request: Request) -> list[dict[str, Any]]:
    """Every registered model; `title` is what override_settings.sd_model_checkpoint takes (so does
    `model_name`). A model whose files cannot be hashed here is listed without a hash."""
    registry = farm_of(request).registry
    models = []
    for entry in registry:
        try:
            sha256: str | None = registry.identity(entry.name)
        except InvalidInput:
            sha256 = None
        short = sha256[:10] if sha256 else None
        models.append({"title": f"{entry.name} [{short}]" if short else entry.name, "model_name": entry.name,
                       "hash": short, "sha256": sha256, "filename": entry.infotext_name, "config": None})
    return models


@counted.get("/sd-vae", summary="Registered VAEs")
def sd_vae(request: Request) -> list[dict[str, str]]:
    registry = farm_of(request).registry
    return [{"model_name": n, "filename": registry.asset("vae", n).file_name} for n in registry.asset_names("vae")]


@counted.get("/loras", summary="Registered LoRAs, for <lora:name:weight> tags")
def loras(request: Request) -> list[dict[str, Any]]:
    registry = farm_of(request).registry
    return [{"name": n, "alias": n, "path": registry.asset("lora", n).file_name, "metadata": {}}
            for n in registry.asset_names("lora")]


@counted.get("/samplers", summary="Samplers, as A1111 names them")
def samplers() -> list[dict[str, Any]]:
    return [{"name": s, "aliases": [], "options": {
        **({"scheduler": SCHEDULER_NAME[schedules[0]]} if schedules[0] != AUTOMATIC else {}),
        **({"second_order": True} if s in SECOND_ORDER else {}),
        **({"discard_next_to_last_sigma": True} if s in DISCARD_PENULTIMATE else {})}}
        for s, schedules in SAMPLERS.items()]


SCHEDULER_NAME: Final = {label: name for name, label in SCHEDULER_NAMES.items()}


@counted.get("/schedulers", summary="Schedule types, as A1111 names them")
def schedulers() -> list[dict[str, Any]]:
    rho = {KARRAS: 7.0, POLYEXPONENTIAL: 1.0}
    return [{"name": SCHEDULER_NAME[label], "label": label, "aliases": None, "default_rho": rho.get(label),
             "need_inner_model": None} for label in SCHEDULE_TYPES]


@counted.get("/upscalers", summary="Upscalers for hires fix: built in and registered models")
def upscalers(request: Request) -> list[dict[str, Any]]:
    registered = farm_of(request).registry.asset_names("upscaler")
    return [{"name": n, "model_name": n if n in registered else None, "model_path": None, "model_url": None,
             "scale": None} for n in (*IMAGE_UPSCALERS, *registered)]


@counted.get("/latent-upscale-modes", summary="Hires fix's latent upscalers")
def latent_upscale_modes() -> list[dict[str, str]]:
    return [{"name": n} for n in HIRES_UPSCALERS if n in LATENT_UPSCALERS]


@counted.get("/scripts", summary="Scripts: the farm runs none")
def scripts() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


@counted.get("/options", summary="A1111's options that mean something on the farm")
def options(request: Request) -> dict[str, Any]:
    """What the farm runs. The model, clip skip and VAE are chosen per request (override_settings);
    sd_model_checkpoint is the one a request without it gets."""
    farm = farm_of(request)
    model = default_model(farm)
    sha256 = farm.registry.identity(model) if model else ""
    return {**FARM_OPTIONS, "sd_model_checkpoint": f"{model} [{sha256[:10]}]" if model else None,
            "sd_checkpoint_hash": sha256 or None}


@counted.post("/options", summary="Options are the farm's: only what it runs already is taken")
def set_options(request: Request, body: dict[str, Any]) -> JSONResponse:
    current = options(request)
    refused = [{"loc": ["body", key], "type": "value_error",
                "msg": "chosen per request: give override_settings.sd_model_checkpoint (or CLIP_stop_at_last_layers,"
                       " sd_vae) in each txt2img or img2img call" if key in OVERRIDES else
                       f"the farm runs {current[key]!r}" if key in current else "not an option the farm takes"}
               for key, value in body.items() if key not in current or value != current[key]]
    return JSONResponse({"detail": refused} if refused else None, status_code=422 if refused else 200)


router.include_router(counted)
router.include_router(light)
