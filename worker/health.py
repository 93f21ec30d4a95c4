"""A worker's own health: failures in a row, recent reasons, and the decision to stop taking work.

Like a render-farm manager blocking a bad node: when this worker keeps failing while another worker
of the same model succeeds, the fault is here, not in the jobs. The worker then cancels its own
consumer (it stays up, heartbeating, and says why in `sdfarm workers`).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class NodeHealth:
    streak: int = 0  # failures in a row
    streak_started_at: float = 0.0
    last_success_at: float = 0.0
    blocked: str = ""
    recent: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=10))

    def success(self) -> None:
        self.streak = 0
        self.last_success_at = time.time()

    def failure(self, reason: str) -> None:
        if self.streak == 0:
            self.streak_started_at = time.time()
        self.streak += 1
        self.recent.append((time.time(), reason))

    def beat(self) -> dict[str, Any]:
        """The health fields of the worker's heartbeat (sdfarm/workers.py, WorkerBeat)."""
        return {"last_success_at": self.last_success_at, "failure_streak": self.streak, "blocked": self.blocked,
                "recent_failures": [{"at": t, "reason": r} for t, r in self.recent]}
