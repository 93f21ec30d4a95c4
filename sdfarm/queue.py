"""The Celery app both sides share: JSON only, late acks, one queue per model, tasks sent by name."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from typing import Any, Final

from celery import Celery
from celery.utils.saferepr import saferepr
from kombu.utils.uuid import uuid

from .jobs import Chunk, RenderJob, message_version
from .redis_target import RedisTarget
from .settings import Settings

RENDER_TASK: Final = "sdfarm.render_chunk"
# the control queue is served by `sdfarm scheduler` (no GPU): schedules, completion hooks
CONTROL_QUEUE: Final = "sdfarm.control"
BATCH_FINISHED_TASK: Final = "sdfarm.batch_finished"
DATASET_TICK_TASK: Final = "sdfarm.dataset_tick"
DRAIN_COMMAND: Final = "sdfarm_drain"  # the remote control command of `sdfarm drain` (worker/drain.py)
QUEUE_PREFIX: Final = "render."
PRIORITY_LEVELS: Final = 10  # user priority 0 (lowest) .. 9 (highest)
DEFAULT_PRIORITY: Final = 5
PUBLISH_BATCH: Final = 500  # chunk messages per Redis pipeline round trip when enqueueing
# the rest of a protocol-2 body after the args: kwargs, then the embedded callbacks (all empty)
_EMBED: Final = json.dumps({"callbacks": None, "errbacks": None, "chain": None, "chord": None})
_KWARGSREPR: Final = saferepr({})


def queue_name(model: str) -> str:
    return QUEUE_PREFIX + model


def broker_priority(user_priority: int) -> int:
    """Redis serves priority 0 first; users say 9 is most urgent."""
    if not 0 <= user_priority < PRIORITY_LEVELS:
        raise ValueError(f"priority {user_priority} is out of range (allowed: 0..{PRIORITY_LEVELS - 1})")
    return PRIORITY_LEVELS - 1 - user_priority


def queue_lists(model: str) -> list[str]:
    """The Redis lists of a model's queue: kombu keeps one per priority level, `render.<model>` for
    level 0 and `render.<model>:N` for the others (the transport's `sep`). Autoscalers watch these."""
    return [queue_name(model)] + [f"{queue_name(model)}:{p}" for p in range(1, PRIORITY_LEVELS)]


def queue_depth(client: Any, model: str) -> int:
    """Messages waiting in a model's queue, over every priority level (kombu keeps one list each)."""
    names = queue_lists(model)
    pipe = client.pipeline()
    for name in names:
        pipe.llen(name)
    return int(sum(pipe.execute()))


def in_flight(client: Any, batch_id: str, limit: int = 5000) -> bool | None:
    """Whether a delivered, unacknowledged message belongs to the batch (None: too many to look)."""
    if client.hlen("unacked") > limit:
        return None
    return any(batch_id.encode() in raw for raw in client.hvals("unacked"))


def run_worker_command(app: Celery, argv: list[str]) -> int:
    """`celery worker ...` (argv) in this process, and the exit code the worker gives: app.worker_main
    drops it (Celery runs its click command with standalone_mode off, which returns the code)."""
    import click
    from celery.bin.celery import celery

    celery.params[0].default = app  # the --app option's default, as app.start sets it
    try:
        code = celery.main(args=argv, standalone_mode=False)
    except click.exceptions.Exit as e:
        code = e.exit_code
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        celery.params[0].default = None
    return code if isinstance(code, int) else 0


def make_celery(settings: Settings) -> Celery:
    target = RedisTarget.from_settings(settings)
    transport: dict[str, Any] = {
        **target.transport_options(),
        "visibility_timeout": settings.visibility_timeout,
        "queue_order_strategy": "priority",
        "priority_steps": list(range(PRIORITY_LEVELS)),
        "sep": ":",
        "unacked_restore_interval": settings.unacked_restore_interval,
        "unacked_restore_throttle": 1,
    }
    app = Celery("sdfarm", broker=target.url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],  # pickle from Redis would be remote code execution
        result_accept_content=["json"],
        task_ignore_result=True,  # S3 is the record of completion
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        # issue 14 (reliability): a chunk in hand outlives a broker outage. Its pool child waits the
        # outage out in place (worker/tasks.py) and stores what it rendered; the parent then acks it
        # through a fresh connection. True would SIGTERM the child: its message would come back only
        # after the visibility timeout, to be rendered again, and the kill counted as an attempt.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_proc_alive_timeout=900,  # the pool child loads the pipeline before it reports up
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options=transport,
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout},
        visibility_timeout=settings.visibility_timeout,
        task_time_limit=settings.task_time_limit,
        task_soft_time_limit=max(settings.task_time_limit - 30, settings.task_time_limit // 2),
        task_default_priority=broker_priority(DEFAULT_PRIORITY),
        worker_hijack_root_logger=False,
        worker_send_task_events=settings.task_events,  # for Flower: received, started, succeeded ...
        task_send_sent_event=False,  # the producer publishes chunks itself (no task-sent events)
        worker_enable_remote_control=True,
    )
    return app


def entry_json(index: int, job: RenderJob) -> str:
    """One entry of a chunk message as the broker carries it: kombu's JSON (ASCII, ', ' and ': ')."""
    return f'{{"index": {index}, "job": {job.wire_json}}}'


def chunk_json(batch_id: str, entries: Sequence[str], version: int) -> str:
    """`Chunk.message()` as kombu's JSON, joined from its entries' text (entry_json): a chunk's
    message is serialised once, from jobs serialised once."""
    return f'{{"batch_id": {json.dumps(batch_id)}, "entries": [{", ".join(entries)}], "schema_version": {version}}}'


class ChunkSender:
    """Sends chunk messages as `app.send_task(RENDER_TASK, args=[message], queue=..., priority=...,
    ignore_result=True)` does, at a fraction of its cost, for batches of a million jobs:

    - the headers and properties come from Celery's own protocol-2 builder (`as_task_v2`), the
      envelope, base64 body and priority queue name (`render.<model>:<level>`) from kombu's
      producer and Redis channel, so workers receive what they always did;
    - the body is the chunk's JSON joined from text (chunk_json), `argsrepr` is computed once per
      shape of chunk (Celery's saferepr elides each entry), each queue is declared once;
    - the Redis writes go out in pipelines of `batch_size` (kombu's publish batch): one round
      trip per few hundred chunks instead of one per chunk.

    Use it as a context manager: leaving it flushes what is buffered; an error discards it."""

    def __init__(self, app: Celery, priority: int = DEFAULT_PRIORITY, batch_size: int = PUBLISH_BATCH) -> None:
        self.app = app
        self.level = broker_priority(priority)
        self.batch_size = batch_size
        self.sent = 0
        self._queues: dict[str, tuple[Any, Any]] = {}  # name -> (kombu Queue, delivery mode)
        self._reprs: dict[tuple[str, int, int], str] = {}
        self._stack = ExitStack()
        self._producer: Any = None
        # read once: each read of app.conf costs more than the rest of a message's headers
        self._repr_levels: int = app.conf.task_repr_maxlevels
        self._repr_size: int = app.amqp.argsrepr_maxsize
        self._reply_to = ""

    def __enter__(self) -> ChunkSender:
        with ExitStack() as stack:
            self._producer = stack.enter_context(self.app.producer_or_acquire())
            stack.enter_context(self._producer.batch(self.batch_size))
            self._stack = stack.pop_all()
        self._reply_to = self.app.thread_oid  # per thread, as send_task reads it
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)

    def send(self, model: str, batch_id: str, entries: Sequence[str], version: int) -> None:
        """Queue one chunk of `model` (its entries made by entry_json; `version`: message_version)."""
        name = queue_name(model)
        if name not in self._queues:  # send_task declares the queue before every message; kombu caches it
            queue = self.app.amqp.queues[name]
            self._producer.maybe_declare(queue)
            self._queues[name] = queue, queue.exchange.delivery_mode or self.app.conf.task_default_delivery_mode
        delivery_mode = self._queues[name][1]
        message = chunk_json(batch_id, entries, version)
        headers, properties, _, _ = self.app.amqp.as_task_v2(
            uuid(), RENDER_TASK, args=(), kwargs={}, reply_to=self._reply_to, ignore_result=True,
            argsrepr=self._argsrepr(batch_id, message, len(entries), version), kwargsrepr=_KWARGSREPR,
        )  # the body it would make from args is made from text instead:
        body = f"[[{message}], {{}}, {_EMBED}]"
        self._producer.publish(
            body, exchange="", routing_key=name, content_type="application/json", content_encoding="utf-8",
            priority=self.level, headers=headers, delivery_mode=delivery_mode, **properties,
        )
        self.sent += 1

    def _argsrepr(self, batch_id: str, message: str, n: int, version: int) -> str:
        """Celery's `saferepr(args)`. At its default depth each entry shows as {...}, so the repr
        depends only on the batch id, the number of entries and the version: made once for each."""
        if not 1 <= self._repr_levels <= 3:  # entries would show: the repr of the real message
            full: str = saferepr([json.loads(message)], self._repr_size, maxlevels=self._repr_levels)
            return full
        key = (batch_id, n, version)
        if key not in self._reprs:
            shape = [{"batch_id": batch_id, "entries": [{}] * n, "schema_version": version}]
            self._reprs[key] = saferepr(shape, self._repr_size, maxlevels=self._repr_levels)
        return self._reprs[key]


def enqueue_chunks(app: Celery, chunks: Iterable[Chunk], priority: int = DEFAULT_PRIORITY) -> int:
    """Send each chunk by task name to its model's queue. Returns how many were sent."""
    with ChunkSender(app, priority) as sender:
        for chunk in chunks:
            sender.send(chunk.model, chunk.batch_id, [entry_json(e.index, e.job) for e in chunk.entries],
                        message_version(e.job.wire for e in chunk.entries))
    return sender.sent
