"""How the long-running processes (worker, scheduler) log: one line per record on stderr, as text or,
with SDFARM_LOG_FORMAT=json, as one JSON object (python-json-logger) that log shippers read as is.

A record's `extra` fields become the object's keys: the worker's job lines carry job, batch, index,
outcome, seconds, worker and model. Messages hold no secret in either format (URLs are logged
without their credentials). Python's warnings, Celery's own loggers and billiard's pool processes log
through the same handler. Celery writes its shutdown notice ("worker: Warm shutdown (MainProcess)")
straight to the terminal, past logging: the one line that is not JSON.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Final

from celery import signals
from pythonjsonlogger.json import JsonFormatter

from .settings import Settings

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s %(message)s"
# a JSON object's own keys: the time, the level, the logger, the message; then the record's extras
_JSON_KEYS: Final = {"asctime": "time", "levelname": "level", "name": "logger"}


def configure_logging(settings: Settings, level: str | int) -> None:
    """The root logger's one handler, on stderr, in the settings' format (replacing any before it)."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter(TEXT_FORMAT, rename_fields=_JSON_KEYS, json_ensure_ascii=False))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # Python's warnings become records (py.warnings) in the same format
    # Celery gives two loggers text handlers of their own (not propagating): the task logger and
    # billiard's (pool processes that die); once it has, they get this handler instead
    _HANDLERS[:] = [handler]
    signals.after_setup_logger.connect(_reroute, weak=False)
    signals.after_setup_task_logger.connect(_reroute, weak=False)


_HANDLERS: list[logging.Handler] = []


def _reroute(logger: logging.Logger | None = None, **_: Any) -> None:
    import billiard.util

    for named in (logger, billiard.util.get_logger()):
        if named is not None and named is not logging.getLogger():
            named.handlers = list(_HANDLERS)
            named.propagate = False
