"""The farm's Celery app for Celery's own tools, built from the SDFARM_* settings at import:

    celery -A sdfarm.celery_app flower --basic_auth=USER:PASSWORD   # the dashboard (SDFARM_TASK_EVENTS=true)
    celery -A sdfarm.celery_app inspect active                      # what each worker renders now

It carries the broker options the workers use (Redis key separator, priorities): a bare broker URL
would name the workers' control queues otherwise, and its commands would reach none of them.
"""

from __future__ import annotations

from .queue import make_celery
from .settings import Settings

app = make_celery(Settings())
