"""Workers' heartbeats in Redis: one typed record per worker (WorkerBeat) and the one place that reads
and writes them (WorkerBoard). A worker's pool process beats every SDFARM_HEARTBEAT_INTERVAL; the
hash expires after three missed beats, so `live()` is the workers that are up.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .layout import WORKERS_PATTERN, worker_key

log = logging.getLogger("sdfarm")


class WorkerBeat(BaseModel):
    """What a worker says of itself: what it serves, on what, since when, how it goes."""

    model_config = ConfigDict(frozen=True)

    hostname: str
    model: str
    model_hash: str = ""
    device: str = ""
    device_name: str = ""
    pid: int = 0
    host: str = ""
    started_at: float = 0.0
    heartbeat_at: float = 0.0
    counters: dict[str, float] = Field(default_factory=dict)  # chunks, images, failed
    # its health (worker/health.py): successes, failures in a row, why it stopped taking work
    last_success_at: float = 0.0
    failure_streak: int = 0
    blocked: str = ""
    recent_failures: list[dict[str, Any]] = Field(default_factory=list)  # [{at, reason}], newest last
    current_chunk: str = ""  # the chunk in hand, and its batch
    current_batch: str = ""

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> WorkerBeat:
        fields: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
        for name in ("counters", "recent_failures"):
            if name in fields:
                fields[name] = json.loads(fields[name])
        return cls.model_validate(fields)

    @property
    def last_failure(self) -> str:
        return str(self.recent_failures[-1].get("reason", "")) if self.recent_failures else ""


class WorkerBoard:
    """The workers' heartbeats: written by each worker's pool process, read by `sdfarm workers`, the
    exporter and the workers themselves (a failing worker looks for a succeeding peer)."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    def beat(self, beat: WorkerBeat, ttl_s: int) -> None:
        """Publish a beat (the chunk in hand is set_busy's, left as it is)."""
        fields = beat.model_dump(exclude={"current_chunk", "current_batch", "counters", "recent_failures"})
        fields |= {"counters": json.dumps(beat.counters), "recent_failures": json.dumps(beat.recent_failures)}
        key = worker_key(beat.hostname)
        pipe = self.r.pipeline()
        pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
        pipe.expire(key, ttl_s)
        pipe.execute()

    def set_health(self, hostname: str, health: dict[str, Any]) -> None:
        """The beat's health fields alone (last_success_at, failure_streak, blocked, recent_failures)."""
        fields = {**health, "recent_failures": json.dumps(health.get("recent_failures", []))}
        self.r.hset(worker_key(hostname), mapping=fields)  # type: ignore[arg-type]

    def set_busy(self, hostname: str, chunk_id: str, batch_id: str) -> None:
        self.r.hset(worker_key(hostname), mapping={"current_chunk": chunk_id, "current_batch": batch_id})

    def clear_busy(self, hostname: str) -> None:
        self.r.hdel(worker_key(hostname), "current_chunk", "current_batch")

    def remove(self, hostname: str) -> None:
        self.r.delete(worker_key(hostname))

    def live(self) -> list[WorkerBeat]:
        """Every worker whose heartbeat has not expired and which has loaded its model, by hostname. A
        beat that does not read (another version's, a hand-edited one) is skipped, with a warning: one
        such hash must not blind every reader."""
        keys = list(self.r.scan_iter(WORKERS_PATTERN, count=1000))
        pipe = self.r.pipeline()
        for key in keys:
            pipe.hgetall(key)
        beats = []
        for key, raw in zip(keys, pipe.execute(), strict=True):
            if b"heartbeat_at" not in raw or b"model" not in raw:
                continue
            try:
                beats.append(WorkerBeat.from_hash(raw))
            except (ValidationError, ValueError) as e:
                log.warning("worker heartbeat %s does not read: %s", key.decode(errors="replace"), e)
        return sorted(beats, key=lambda b: b.hostname)

    def succeeding_peer(self, hostname: str, model: str, since: float) -> str | None:
        """Another live worker of the same model with a success after `since`."""
        for beat in self.live():
            if beat.hostname != hostname and beat.model == model and beat.last_success_at > since:
                return beat.hostname
        return None


def uptime_s(beat: WorkerBeat, now: float | None = None) -> float:
    now = time.time() if now is None else now
    return max(now - (beat.started_at or now), 1e-9)
