"""Start a worker: one Celery prefork worker, concurrency 1, serving one model's queue.

The parent checks everything it can without CUDA (registry, files, Redis, S3) and fails loudly.
The pool child loads the pipeline in worker_process_init (CUDA cannot survive a fork), publishes
heartbeats, and renders. If the child cannot load, the whole worker exits non-zero.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from celery import Celery, signals

from sdfarm.errors import SdfarmError, TransientError, WorkerFatal
from sdfarm.logs import configure_logging
from sdfarm.models import Registry
from sdfarm.progress import ProgressBoard
from sdfarm.queue import make_celery, queue_name, run_worker_command
from sdfarm.settings import Settings
from sdfarm.store import Store
from sdfarm.workers import WorkerBeat

from .assets import AssetFiles
from .compile import SharedCache
from .drain import Drain
from .encode import versions
from .masks import MaskModels
from .metrics import WorkerMetrics
from .pipeline import check_device, load_model
from .tasks import WorkerState, get_state, maybe_block, register_tasks, set_state

log = logging.getLogger("sdfarm.worker")

EXIT_FATAL = 3


def _heartbeat_loop(state: WorkerState, stop: threading.Event, app: Celery) -> None:
    """Publish this worker's heartbeat; and while it is failing, look again whether a peer succeeds
    (a peer's success shows in its heartbeat only after this worker's last failure, and no further
    message may come to check it then)."""
    workers = state.board.workers()
    started = time.time()
    while not stop.is_set():
        try:
            workers.beat(WorkerBeat(
                hostname=state.hostname, model=state.loaded.entry.name, model_hash=state.loaded.short_hash,
                device=str(state.loaded.device), device_name=state.loaded.device_name, pid=os.getpid(),
                host=socket.gethostname(), started_at=started, heartbeat_at=time.time(), counters=state.counters,
                **state.health.beat(),
            ), int(state.settings.heartbeat_interval * 3) + 1)
            state.metrics.beat(bool(state.health.blocked), state.loaded.device)
        except Exception as e:  # Redis blinking must not kill the renderer
            log.warning("heartbeat failed: %s", e)
        if state.health.streak and not state.health.blocked:
            try:
                maybe_block(app, state)
            except Exception as e:
                log.warning("health check failed: %s", e)
        stop.wait(state.settings.heartbeat_interval)


def _init_child(settings: Settings, model: str, device: str, hostname: str, fail_file: Path, app: Celery) -> None:
    try:
        if settings.cpu_threads is not None:
            import torch

            torch.set_num_threads(settings.cpu_threads)
        registry = Registry.from_settings(settings)
        store = Store.from_settings(settings)
        assets = AssetFiles(registry, store, settings.cache_dir)
        secret = settings.compile_cache_secret
        loaded = load_model(registry, model, device, assets, compile=settings.compile,
                            static_batch=settings.chunk_size, compile_mode=settings.compile_mode,
                            cache_root=settings.cache_dir,
                            shared_cache=SharedCache(store, secret.get_secret_value().encode()) if secret else None)
        loaded.upscalers.tile = settings.upscale_tile
        state = WorkerState(
            settings=settings,
            hostname=hostname,
            loaded=loaded,
            store=store,
            board=ProgressBoard.from_settings(settings),
            versions=versions(),
            pool=ThreadPoolExecutor(settings.upload_threads, thread_name_prefix="upload"),
            assets=assets,
            masks=MaskModels(loaded.device),
            metrics=WorkerMetrics(model, hostname),
        )
        state.metrics.loaded(loaded.load_s, loaded.compiled, loaded.compile_s)
        loaded.count_swaps(state.metrics.swapped)
        if settings.metrics_port is not None:  # a port in use fails the start, loudly
            state.metrics.serve(settings.metrics_port, settings.metrics_addr)
    except Exception as e:
        reason = str(e) if isinstance(e, SdfarmError) else f"{type(e).__name__}: {e}"
        log.error("worker cannot start: %s", reason)
        fail_file.write_text(reason)
        os.kill(os.getppid(), signal.SIGTERM)
        os._exit(EXIT_FATAL)
    set_state(state)
    state.drain.install()  # before any task: a hand-back signal must never kill the child
    with contextlib.suppress(Exception):  # before any task can mark this child busy
        state.board.workers().clear_busy(hostname)  # a killed predecessor's chunk
    threading.Thread(target=_heartbeat_loop, args=(state, threading.Event(), app), daemon=True,
                     name="heartbeat").start()


def fetch_checkpoint(registry: Registry, store: Store, settings: Settings, model: str, attempts: int = 5) -> None:
    """A checkpoint that lives in the bucket is fetched and verified here, in the parent, before any
    pool process starts: a large download is not cut off by the child's start-up timeout, and an S3
    blip is retried. The children then find it in the cache."""
    entry = registry.get(model)
    if entry.s3 is None:
        return
    files = AssetFiles(registry, store, settings.cache_dir)
    for attempt in range(1, attempts + 1):
        try:
            log.info("fetching the checkpoint of %s from the bucket (%s)", model, entry.s3_key)
            files.checkpoint(entry)
            return
        except TransientError as e:
            if attempt == attempts:
                raise WorkerFatal(f"cannot fetch the checkpoint of {model!r}: {e}") from e
            log.warning("fetching the checkpoint of %s failed (%s); retrying", model, e)
            time.sleep(2 ** attempt)
        except SdfarmError as e:
            raise WorkerFatal(f"cannot serve model {model!r}: {e}") from e


def preflight(settings: Settings, model: str, device: str) -> None:
    """What the parent can check before taking any work. Raises WorkerFatal."""
    check_device(device)
    try:
        registry = Registry.from_settings(settings)
        registry.renderable(model)
        registry.identity(model)
    except SdfarmError as e:
        raise WorkerFatal(f"cannot serve model {model!r}: {e}") from e
    try:
        store = Store.from_settings(settings)
        store.exists("healthcheck")
    except Exception as e:
        raise WorkerFatal(f"S3 is not reachable ({settings.s3_endpoint_url or 'AWS'}): {e}") from e
    fetch_checkpoint(registry, store, settings, model)
    try:
        ProgressBoard.from_settings(settings).ping()
    except Exception as e:
        raise WorkerFatal(f"Redis is not reachable: {e}") from e


def run_worker(settings: Settings, model: str, device: str = "auto", hostname: str | None = None,
               loglevel: str = "INFO") -> int:
    configure_logging(settings, loglevel)
    hostname = hostname or f"{model}-{os.getpid()}@{socket.gethostname()}"
    try:
        preflight(settings, model, device)
    except WorkerFatal as e:
        log.error("worker cannot start: %s", e)
        return EXIT_FATAL
    app = make_celery(settings)
    register_tasks(app)
    Drain(settings.drain_timeout).install()  # and its remote control command, `sdfarm drain`
    fail_file = Path(tempfile.mkdtemp(prefix="sdfarm-worker-")) / "fatal"

    @signals.worker_process_init.connect(weak=False)
    def _on_child(**_: Any) -> None:
        _init_child(settings, model, device, hostname, fail_file, app)

    @signals.worker_process_shutdown.connect(weak=False)
    def _on_child_exit(**_: Any) -> None:
        with contextlib.suppress(Exception):
            get_state().board.workers().remove(hostname)

    quiet = ["--quiet"] if settings.log_format == "json" else []  # JSON logs: no banner (celery's own option)
    argv = [*quiet, "worker", f"--queues={queue_name(model)}", "--concurrency=1", "--pool=prefork",
            f"--hostname={hostname}", f"--loglevel={loglevel}", "--without-gossip", "--without-mingle",
            "--prefetch-multiplier=1"]
    code = run_worker_command(app, argv)
    if fail_file.exists():
        log.error("worker stopped: the pipeline could not load: %s", fail_file.read_text())
        return EXIT_FATAL
    return code
