"""The Celery app both sides share: JSON only, late acks, one queue per model, tasks sent by name."""

from __future__ import annotations

from typing import Any, Final

from celery import Celery

from .jobs import Chunk
from .settings import Settings

RENDER_TASK: Final = "sdfarm.render_chunk"
# the control queue is served by `sdfarm scheduler` (no GPU): schedules, completion hooks
CONTROL_QUEUE: Final = "sdfarm.control"
BATCH_FINISHED_TASK: Final = "sdfarm.batch_finished"
DATASET_TICK_TASK: Final = "sdfarm.dataset_tick"
QUEUE_PREFIX: Final = "render."
PRIORITY_LEVELS: Final = 10  # user priority 0 (lowest) .. 9 (highest)
DEFAULT_PRIORITY: Final = 5


def queue_name(model: str) -> str:
    return QUEUE_PREFIX + model


def broker_priority(user_priority: int) -> int:
    """Redis serves priority 0 first; users say 9 is most urgent."""
    if not 0 <= user_priority < PRIORITY_LEVELS:
        raise ValueError(f"priority {user_priority} is out of range (allowed: 0..{PRIORITY_LEVELS - 1})")
    return PRIORITY_LEVELS - 1 - user_priority


def queue_depth(client: Any, model: str) -> int:
    """Messages waiting in a model's queue, over every priority level (kombu keeps one list each)."""
    names = [queue_name(model)] + [f"{queue_name(model)}:{p}" for p in range(1, PRIORITY_LEVELS)]
    pipe = client.pipeline()
    for name in names:
        pipe.llen(name)
    return int(sum(pipe.execute()))


def in_flight(client: Any, batch_id: str, limit: int = 5000) -> bool | None:
    """Whether a delivered, unacknowledged message belongs to the batch (None: too many to look)."""
    if client.hlen("unacked") > limit:
        return None
    return any(batch_id.encode() in raw for raw in client.hvals("unacked"))


def make_celery(settings: Settings) -> Celery:
    url = settings.redis_url.get_secret_value()
    transport: dict[str, Any] = {
        "visibility_timeout": settings.visibility_timeout,
        "queue_order_strategy": "priority",
        "priority_steps": list(range(PRIORITY_LEVELS)),
        "sep": ":",
        "unacked_restore_interval": settings.unacked_restore_interval,
        "unacked_restore_throttle": 1,
    }
    app = Celery("sdfarm", broker=url, set_as_current=False)
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
        worker_cancel_long_running_tasks_on_connection_loss=True,
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
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_enable_remote_control=True,
    )
    return app


def enqueue_chunks(app: Celery, chunks: list[Chunk], priority: int = DEFAULT_PRIORITY) -> int:
    """Send each chunk by task name to its model's queue. Returns how many were sent."""
    level = broker_priority(priority)
    with app.producer_or_acquire() as producer:
        for chunk in chunks:
            app.send_task(
                RENDER_TASK,
                args=[chunk.message()],
                queue=queue_name(chunk.model),
                priority=level,
                producer=producer,
                ignore_result=True,
            )
    return len(chunks)
