"""`sdfarm scheduler`: the control process. A Celery worker on the control queue with beat embedded,
its schedule kept in Redis by celery-redbeat (a lock lets one beat run at a time, so two scheduler
processes never double-fire).

- every tick (SDFARM_SCHEDULER_TICK_S), for each spec in SDFARM_DATASETS_DIR with a schedule: if its
  latest due time (cron, in the spec's time zone) is new, claim it in Redis (SET NX) and run the
  dataset for that date. A run's batch id is a function of (spec, date): even a double fire renders
  nothing twice. Then the ledger (producer/ledger.py): due times that will never fire are counted
  missed, and each spec's next due time is written down for the exporter.
- when a batch finishes: its automatic exports, then its signed completion webhook (retried with backoff).
- every tick, the safety net for lost messages (SDFARM_RECONCILE_AFTER_S, 0: off): an active batch on
  which nothing has moved for that long, with none of its messages queued or in flight, is
  reconciled (control.reconcile_stalled), without anyone running `watch`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from celery import Celery, Task

from sdfarm.datasets import WEBHOOK_SECRET_PREFIX, webhook_secret_variable
from sdfarm.errors import SdfarmError, TransientError, printable
from sdfarm.layout import REDBEAT_PREFIX, batch_key
from sdfarm.logs import configure_logging
from sdfarm.progress import ProgressBoard
from sdfarm.queue import BATCH_FINISHED_TASK, CONTROL_QUEUE, DATASET_TICK_TASK, make_celery, run_worker_command
from sdfarm.redis_target import RedisTarget
from sdfarm.settings import Settings
from sdfarm.store import Store

from .control import reconcile_stalled
from .datasets import run_dataset
from .export import export
from .farm import Farm
from .ledger import Scheduled, account, scheduled_specs
from .webhook import deliver

log = logging.getLogger("sdfarm.scheduler")

RECONCILE_TICK_TASK = "sdfarm.reconcile_tick"  # sent by this process's beat to its own control worker


def due_runs(specs: list[Scheduled], board: ProgressBoard, now: dt.datetime) -> list[tuple[Scheduled, dt.datetime]]:
    """(spec, due time) for each scheduled spec whose latest due time is after it was first seen."""
    due = []
    for s in specs:
        since = board.datasets().first_seen(s.spec.name, now.timestamp())
        latest = s.schedule.latest(now)
        if latest.timestamp() >= since:
            due.append((s, latest))
    return due


def fire(s: Scheduled, due_at: dt.datetime, settings: Settings, store: Store, board: ProgressBoard, app: Celery
         ) -> None:
    """Run a claimed due time's dataset, counted fired; or, when that raises, missed (no tick fires a
    claimed due time again: a backfill by hand does)."""
    name, day = s.spec.name, s.schedule.run_date(due_at)
    try:
        result = run_dataset(s.path, day, settings, store, board, app)
    except Exception as e:
        counted("a missed run", partial(board.datasets().count, name, "missed"))
        log.error("dataset %s due %s: not fired, and missed: %s: %s; backfill with `sdfarm dataset run %s --date %s`",
                  name, due_at.isoformat(), type(e).__name__, e, s.path, day.isoformat(),
                  exc_info=not isinstance(e, SdfarmError))  # a refused spec says why; anything else, where
        return
    counted("a fired run", partial(board.datasets().count, name, "fired"))
    log.info("dataset fired: %s due %s -> batch %s (%d jobs, %d already done)", name, due_at.isoformat(),
             result.batch_id, result.submitted.jobs, result.submitted.already_done)


def count_webhook(board: ProgressBoard, hooks: dict[str, Any], outcome: str) -> None:
    """Count a webhook attempt under its dataset (every webhook is a dataset run's)."""
    dataset = hooks.get("dataset")
    if isinstance(dataset, str) and dataset:
        counted(f"a webhook {outcome}", partial(board.datasets().count, dataset, f"webhook_{outcome}"))


def counted(what: str, count: Callable[[], None]) -> None:
    """Record a count for the exporter: Redis failing here must not change what the task does."""
    try:
        count()
    except Exception as e:
        log.warning("could not count %s: %s", what, e)


def register_control_tasks(app: Celery, settings: Settings) -> None:
    def services() -> tuple[Store, ProgressBoard]:
        farm = Farm.from_settings(settings, app)
        return farm.store, farm.board

    @app.task(name=DATASET_TICK_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
    def dataset_tick() -> None:
        if settings.datasets_dir is None:
            return
        store, board = services()
        now = dt.datetime.now(dt.timezone.utc)
        specs, complete = scheduled_specs(settings.datasets_dir)
        for s, due_at in due_runs(specs, board, now):
            if board.datasets().claim(s.spec.name, due_at.isoformat()):  # else this due time was already run
                fire(s, due_at, settings, store, board, app)
        account(board.datasets(), specs, complete, now)  # due times missed; the next ones

    @app.task(name=RECONCILE_TICK_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
    def reconcile_tick() -> None:
        store, board = services()
        for batch_id, result in reconcile_stalled(store, board, app, settings.chunk_size, settings.reconcile_after_s,
                                                  time.time()):
            log.warning("batch %s: nothing moved for %gs and none of its messages is queued or in flight:"
                        " reconciled, %d of %d jobs re-enqueued (%d done, %d failed)", batch_id,
                        settings.reconcile_after_s, result.enqueued_jobs, result.total, result.done, result.failed)

    @app.task(name=BATCH_FINISHED_TASK, bind=True, max_retries=None, ignore_result=True)  # type: ignore[untyped-decorator]
    def batch_finished(self: Task, batch_id: str) -> None:
        store, board = services()
        spec = store.get_json(batch_key(batch_id))
        hooks: dict[str, Any] = spec.get("hooks") or {}
        for item in hooks.get("export", []):
            count, _ = export(store, batch_id, item["format"], f"s3://{store.bucket}/{item['dest_prefix']}")
            log.info("batch %s exported: %d images as %s to %s", batch_id, count, item["format"], item["dest_prefix"])
        hook = hooks.get("webhook")
        if not hook:
            return
        secret = webhook_secret(batch_id, hook["secret_env"])
        if secret is None:
            count_webhook(board, hooks, "unsent")
            return
        notice = finished_notice(store, board, batch_id, spec)
        try:
            status = deliver(hook["url"], secret, notice)
        except TransientError as e:
            count_webhook(board, hooks, "failed")
            delay = min(settings.retry_backoff_s * 2 ** self.request.retries, settings.retry_backoff_max_s)
            log.warning("batch %s: %s; retrying in %ss", batch_id, e, delay)
            raise self.retry(exc=e, countdown=delay) from e
        count_webhook(board, hooks, "delivered")
        log.info("batch %s: webhook delivered (%d)", batch_id, status)


def webhook_secret(batch_id: str, variable: str) -> bytes | None:
    """The HMAC key of a batch's webhook, from the variable its spec names (None: not sent).
    Checked again here: a batch.json changed in the bucket could name another secret."""
    if not webhook_secret_variable(variable):
        log.error("batch %s: webhook not sent: %s is not a webhook secret variable (allowed: %s*)", batch_id,
                  printable(variable), WEBHOOK_SECRET_PREFIX)
        return None
    secret = os.environ.get(variable, "")
    if not secret:
        log.error("batch %s: webhook not sent: %s is not set", batch_id, variable)
        return None
    return secret.encode()


def finished_notice(store: Store, board: ProgressBoard, batch_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The webhook's body: what finished, how it went, where its exports are."""
    hooks: dict[str, Any] = spec.get("hooks") or {}
    progress = board.read(batch_id)
    return {"event": "batch.failed" if progress and progress.failed else "batch.completed",
            "batch_id": batch_id, "name": spec.get("name"), "dataset": hooks.get("dataset"),
            "date": hooks.get("date"), "total": progress.total if progress else spec.get("job_count"),
            "done": progress.done if progress else None, "failed": progress.failed if progress else None,
            "exports": [f"s3://{store.bucket}/{e['dest_prefix']}" for e in hooks.get("export", [])]}


def run_scheduler(settings: Settings, loglevel: str = "INFO") -> int:
    configure_logging(settings, loglevel)
    from celery.schedules import schedule
    from redbeat import RedBeatSchedulerEntry

    app = make_celery(settings)
    app.conf.update(
        **RedisTarget.from_settings(settings).redbeat_conf(),
        redbeat_key_prefix=REDBEAT_PREFIX,
        redbeat_lock_timeout=max(int(settings.scheduler_tick_s * 5), 30),
        beat_max_loop_interval=max(int(settings.scheduler_tick_s), 1),
        beat_scheduler="producer.beat:ResilientRedBeat",
    )
    register_control_tasks(app, settings)
    tick = schedule(dt.timedelta(seconds=settings.scheduler_tick_s))
    RedBeatSchedulerEntry("dataset-tick", DATASET_TICK_TASK, tick, options={"queue": CONTROL_QUEUE}, app=app).save()
    if settings.reconcile_after_s > 0:  # a tick that waited past the next one is dropped, not run late
        RedBeatSchedulerEntry("reconcile-tick", RECONCILE_TICK_TASK, tick, app=app,
                              options={"queue": CONTROL_QUEUE, "expires": settings.scheduler_tick_s}).save()
    else:
        RedBeatSchedulerEntry("reconcile-tick", RECONCILE_TICK_TASK, tick, app=app).delete()
    quiet = ["--quiet"] if settings.log_format == "json" else []  # JSON logs: no banner (celery's own option)
    argv = [*quiet, "worker", "-B", f"--queues={CONTROL_QUEUE}", "--concurrency=1", f"--loglevel={loglevel}",
            "--without-gossip", "--without-mingle", f"--hostname=scheduler-{os.getpid()}@%h",
            f"--schedule={settings.cache_dir / 'beat-schedule'}"]
    return run_worker_command(app, argv)
