"""Graceful drain: a worker asked to stop (SIGTERM, as Kubernetes sends it; or `sdfarm drain WORKER`)
stops taking chunks, finishes the chunk in hand, stores it, and exits 0: Celery's warm shutdown.

A drain may not take forever: a pod is killed at the end of its grace period, and its chunk would
wait out the broker's visibility timeout (an hour) before another worker saw it. So when the chunk in
hand is still rendering SDFARM_DRAIN_TIMEOUT seconds after the first SIGTERM (set it below the
grace period), or when a second SIGTERM comes, the chunk is handed back: the pool child stops the
render at its next model call (or gives up waiting out an S3 or Redis outage), takes back the
delivery's attempts (a drain is not a crash), and rejects the message with requeue, so it is in the
queue at once (at the back of its priority) for another worker; jobs it had stored already are
skipped there. The worker then exits 0 as well. What the signal cannot cut short: a file being
fetched for the chunk (a refiner checkpoint), and the last image's upload.

The parent (Celery's MainProcess) counts the SIGTERMs and keeps the timer; it tells the pool child
with SIGUSR2, which the child turns into HandBack while it renders (worker/tasks.py). Outside the
render the child finishes the chunk (storing takes seconds), unless it waits out an outage.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any

from celery import signals
from celery.worker.control import control_command

from sdfarm.queue import DRAIN_COMMAND

log = logging.getLogger("sdfarm.worker")

HAND_BACK_SIGNAL = signal.SIGUSR2  # parent -> pool child: give the chunk back (SIGUSR1: billiard's time limit)


class HandBack(BaseException):
    """Raised in the pool child's render when the drain's time is up: the chunk goes back to the queue.
    A BaseException, as KeyboardInterrupt: no `except Exception` on the way catches it."""


@control_command(name=DRAIN_COMMAND)
def drain_command(state: Any, **_: Any) -> dict[str, str]:
    """`sdfarm drain`: the same as a SIGTERM to this worker (runs in its MainProcess)."""
    os.kill(os.getpid(), signal.SIGTERM)
    return {"ok": "draining: the chunk in hand is finished, then the worker exits"}


class Drain:
    """The parent's side: on the first SIGTERM a timer of `timeout_s`; at its end, or on a second
    SIGTERM, the pool children are told to hand their chunk back."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.asked = 0
        self.pool: Any = None

    def install(self) -> None:
        signals.worker_ready.connect(self._on_ready, weak=False)
        signals.worker_shutting_down.connect(self._on_shutting_down, weak=False)

    def _on_ready(self, sender: Any = None, **_: Any) -> None:
        self.pool = getattr(sender, "pool", None)  # the consumer's: its processes' pids, read when needed

    def _on_shutting_down(self, how: str = "", **_: Any) -> None:
        if how != "Warm":
            return
        self.asked += 1
        if self.asked == 1:
            log.warning("draining: the chunk in hand is finished and stored, then this worker exits (handed back"
                        " if it still renders in %.0f s)", self.timeout_s)
            timer = threading.Timer(self.timeout_s, self.hand_back, args=("the drain timeout passed",))
            timer.daemon = True
            timer.start()
        else:
            self.hand_back("a second SIGTERM")

    def hand_back(self, why: str) -> None:
        """Tell the pool processes (the pool's own list of pids: nothing here waits on them, billiard
        does) to hand a chunk they still render back."""
        pids = [pid for pid in (self.pool.info.get("processes", []) if self.pool is not None else []) if pid]
        log.warning("draining: %s; a chunk still in hand is handed back (%d pool process%s told)", why, len(pids),
                    "" if len(pids) == 1 else "es")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # gone already
                os.kill(pid, HAND_BACK_SIGNAL)


class ChildDrain:
    """The pool child's side: SIGUSR2 raises HandBack while a render runs (nothing outside memory to
    undo there); otherwise the chunk is finished, as it is nearly done."""

    def __init__(self) -> None:
        self.rendering = False
        self.requested = False

    def install(self) -> None:
        if signal.getsignal(HAND_BACK_SIGNAL) != self._on_signal:
            signal.signal(HAND_BACK_SIGNAL, self._on_signal)

    def _on_signal(self, _signum: int, _frame: Any) -> None:
        self.requested = True
        if self.rendering:
            self.rendering = False  # raised once
            raise HandBack("the worker is draining and its time is up")
