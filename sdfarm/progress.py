"""Live batch progress in Redis. A view for `watch` and `status`; S3 stays the record.

Per batch: a hash of counters and two bitmaps indexed by the job's position in the batch, so a
redelivered job is never counted twice and a million-job batch costs 125 KB per bitmap; per job, its
deliveries (attempts); the batch's done-or-failed count as last seen by the reconcile sweep, and when
its chunks were last enqueued (where a worker's queue wait starts). Per task
message handed back, a count (sdfarm:handbacks:<digest>).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from .layout import BATCHES, DATASETS, dataset_fired_key, dataset_key, handbacks_key
from .layout import batch_state_key as _key
from .queue import in_flight, queue_depth
from .redis_target import RedisTarget
from .settings import Settings
from .workers import WorkerBoard

ACTIVE, PAUSED, CANCELLED = "active", "paused", "cancelled"
BATCH_STATES = (ACTIVE, PAUSED, CANCELLED)


@dataclass(frozen=True)
class Progress:
    batch_id: str
    name: str
    total: int
    done: int
    failed: int
    rendered: int  # images this batch actually rendered (not skipped as already done)
    submitted_at: float
    state: str = ACTIVE

    @property
    def queued(self) -> int:
        return max(self.total - self.done - self.failed, 0)

    @property
    def finished(self) -> bool:
        return self.total > 0 and self.done + self.failed >= self.total


class ProgressBoard:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.r = client
        self.ttl = ttl_s

    @classmethod
    def from_settings(cls, settings: Settings) -> ProgressBoard:
        """The board on the farm's Redis: one server, or the master its sentinels name now."""
        return cls(RedisTarget.from_settings(settings).client(), settings.progress_ttl)

    def register(self, batch_id: str, name: str, total: int) -> None:
        now = time.time()
        pipe = self.r.pipeline()
        pipe.hsetnx(_key(batch_id), "submitted_at", now)
        pipe.hset(_key(batch_id), mapping={"name": name, "total": total})
        pipe.zadd(BATCHES, {batch_id: now}, nx=True)
        for part in ("", "done", "failed", "attempts"):
            pipe.expire(_key(batch_id, part), self.ttl)
        pipe.execute()

    def enqueued(self, batch_id: str) -> None:
        """Chunks of the batch are being enqueued now (submit, reconcile, retry): a worker's queue wait
        for the batch's chunks counts from the latest such time (enqueued_at)."""
        pipe = self.r.pipeline()
        pipe.hset(_key(batch_id), "enqueued_at", time.time())
        pipe.expire(_key(batch_id), self.ttl)
        pipe.execute()

    def enqueued_at(self, batch_id: str) -> float | None:
        """When chunks of the batch were last enqueued (None: by a producer that did not say)."""
        raw = self.r.hget(_key(batch_id), "enqueued_at")
        return float(raw) if raw is not None else None

    def done_bits(self, batch_id: str) -> bytes:
        raw: Any = self.r.get(_key(batch_id, "done"))
        return bytes(raw) if raw else b""

    def mark_done(self, batch_id: str, index: int, rendered: bool) -> bool:
        """Record job `index` as done. True when this call was the first to do so."""
        pipe = self.r.pipeline()
        pipe.setbit(_key(batch_id, "done"), index, 1)
        pipe.setbit(_key(batch_id, "failed"), index, 0)
        pipe.expire(_key(batch_id, "done"), self.ttl)
        was_done, _was_failed, _ = pipe.execute()
        if not was_done and rendered:
            self.r.hincrby(_key(batch_id), "rendered", 1)
        return not was_done

    def mark_failed(self, batch_id: str, index: int) -> None:
        pipe = self.r.pipeline()
        pipe.setbit(_key(batch_id, "failed"), index, 1)
        pipe.expire(_key(batch_id, "failed"), self.ttl)
        pipe.execute()

    def read(self, batch_id: str) -> Progress | None:
        found = self.read_many([batch_id])
        return found[0] if found else None

    def read_many(self, batch_ids: list[str]) -> list[Progress]:
        """The batches' progress in one round trip (those Redis no longer holds are left out)."""
        pipe = self.r.pipeline()
        for batch_id in batch_ids:
            pipe.hgetall(_key(batch_id))
            pipe.bitcount(_key(batch_id, "done"))
            pipe.bitcount(_key(batch_id, "failed"))
        replies = pipe.execute()
        found = []
        for i, batch_id in enumerate(batch_ids):
            progress = self._progress(batch_id, *replies[3 * i:3 * i + 3])
            if progress is not None:
                found.append(progress)
        return found

    @staticmethod
    def _progress(batch_id: str, meta: dict[bytes, bytes], done: int, failed: int) -> Progress | None:
        if not meta:
            return None
        fields = {k.decode(): v.decode() for k, v in meta.items()}
        return Progress(
            batch_id=batch_id,
            name=fields.get("name", ""),
            total=int(fields.get("total", 0)),
            done=int(done),
            failed=int(failed),
            rendered=int(fields.get("rendered", 0)),
            submitted_at=float(fields.get("submitted_at", 0)),
            state=fields.get("state", ACTIVE),
        )

    def clear_failed(self, batch_id: str, indexes: list[int]) -> None:
        pipe = self.r.pipeline()
        for index in indexes:
            pipe.setbit(_key(batch_id, "failed"), index, 0)
        if indexes:
            pipe.hdel(_key(batch_id, "attempts"), *indexes)
        pipe.execute()

    def attempts(self, batch_id: str, indexes: list[int]) -> list[int]:
        """Count one more delivery of each job to a renderer (durable: Redis with AOF), in one
        transaction: all counted or none, so a step retried after Redis blinked counts once."""
        pipe = self.r.pipeline(transaction=True)
        for index in indexes:
            pipe.hincrby(_key(batch_id, "attempts"), str(index), 1)
        pipe.expire(_key(batch_id, "attempts"), self.ttl)
        return [int(count) for count in pipe.execute()[:-1]]

    def release_attempts(self, batch_id: str, indexes: list[int]) -> None:
        """Take back attempts that ended cleanly (an outage, a hand-back): only deaths count."""
        pipe = self.r.pipeline(transaction=True)
        for index in indexes:
            pipe.hincrby(_key(batch_id, "attempts"), str(index), -1)
        pipe.execute()

    def state(self, batch_id: str) -> str:
        raw = self.r.hget(_key(batch_id), "state")
        return raw.decode() if isinstance(raw, bytes) else ACTIVE

    def set_state(self, batch_id: str, state: str) -> None:
        if state not in BATCH_STATES:
            raise ValueError(f"unknown batch state {state!r} (allowed: {', '.join(BATCH_STATES)})")
        self.r.hset(_key(batch_id), "state", state)

    def claim_finish(self, batch_id: str) -> bool:
        """True exactly once per batch, for whoever first sees it finished (to announce it)."""
        return bool(self.r.set(_key(batch_id, "finished"), 1, nx=True, ex=self.ttl))

    def unclaim_finish(self, batch_id: str) -> None:
        """The announcement could not be sent: let the next one who sees the batch finished claim it."""
        self.r.delete(_key(batch_id, "finished"))

    def unmoved_since(self, batch_id: str, moved: int, now: float) -> float:
        """When the batch's count of jobs done or failed was first seen at `moved` (by the scheduler's
        reconcile sweep): `now` when it has moved since the last look."""
        seen, seen_at = self.r.hmget(_key(batch_id), "moved", "moved_at")
        if seen is None or seen_at is None or int(seen) != moved:
            self.moved(batch_id, moved, now)
            return now
        return float(seen_at)

    def moved(self, batch_id: str, moved: int, now: float) -> None:
        """Record the batch's count of jobs done or failed as seen at `now` (restarts its clock)."""
        self.r.hset(_key(batch_id), mapping={"moved": moved, "moved_at": now})

    def hand_back(self, message_digest: str) -> int:
        """Count one more hand-back of a task message (a hash of it: see worker.tasks), durably.
        Returns the count so far; kept as long as batch progress."""
        key = handbacks_key(message_digest)
        pipe = self.r.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, self.ttl)
        count, _ = pipe.execute()
        return int(count)

    def ping(self) -> None:
        """Raise unless Redis answers."""
        self.r.ping()

    def datasets(self) -> DatasetBoard:
        """The datasets' runs, on the same Redis."""
        return DatasetBoard(self.r)

    def workers(self) -> WorkerBoard:
        """The workers' heartbeats, on the same Redis."""
        return WorkerBoard(self.r)

    def queue_depth(self, model: str) -> int:
        """Chunks waiting in a model's queue (every priority list)."""
        return queue_depth(self.r, model)

    def in_flight(self, batch_id: str) -> bool | None:
        """Whether a worker holds a chunk of the batch unacknowledged (None: too many to look)."""
        return in_flight(self.r, batch_id)

    def unacked(self) -> int:
        """Chunks delivered to workers and not acknowledged yet."""
        return int(self.r.hlen("unacked"))

    def batch_count(self) -> int:
        """Batches ever registered (those whose progress expired included)."""
        return int(self.r.zcard(BATCHES))

    def recent(self, limit: int = 20) -> list[str]:
        ids: list[bytes] = self.r.zrevrange(BATCHES, 0, limit - 1)  # type: ignore[assignment]
        return [i.decode() for i in ids]

    def submitted_since(self, since: float) -> list[str]:
        """Batches first submitted at or after `since` (a time.time()), oldest first."""
        ids: list[bytes] = self.r.zrangebyscore(BATCHES, since, "+inf")  # type: ignore[assignment]
        return [i.decode() for i in ids]


@dataclass(frozen=True)
class DatasetStats:
    """What the exporter exports of a dataset: its counts (RUN_OUTCOMES, and WEBHOOK_OUTCOMES as
    webhook_<outcome>), the next due time the scheduler expects and when a run last fired."""

    name: str
    counts: dict[str, int]
    next_due_at: float | None
    last_fired_at: float | None


class DatasetBoard:
    """Scheduled datasets' state: the last run of each, when the scheduler first saw it, the claim
    that fires each due time once, the schedule's ledger (producer/ledger.py: due times accounted for,
    the next one) and counts for the exporter (sdfarm.layout's dataset keys)."""

    CLAIM_TTL_S = 400 * 24 * 3600  # a claim outlives any schedule's period
    RUN_OUTCOMES = ("fired", "missed")
    WEBHOOK_OUTCOMES = ("delivered", "failed", "unsent")
    COUNTS = (*RUN_OUTCOMES, *(f"webhook_{outcome}" for outcome in WEBHOOK_OUTCOMES))

    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    def record_run(self, name: str, date: str, batch_id: str) -> None:
        pipe = self.r.pipeline()
        pipe.hset(dataset_key(name), mapping={"last_date": date, "last_batch": batch_id, "last_fired_at": time.time()})
        pipe.hset(dataset_key(name, "runs"), date, batch_id)
        pipe.execute()

    def last_run(self, name: str) -> dict[str, str]:
        """last_date, last_batch, last_fired_at (absent before the first run)."""
        raw: dict[bytes, bytes] = self.r.hgetall(dataset_key(name))  # type: ignore[assignment]
        return {k.decode(): v.decode() for k, v in raw.items()}

    def first_seen(self, name: str, now: float) -> float:
        """When a scheduler first saw the dataset (`now` if this is the first time)."""
        self.r.hsetnx(dataset_key(name), "since", now)
        return float(self.r.hget(dataset_key(name), "since") or now)

    def claim(self, name: str, due_at: str) -> bool:
        """True for the one scheduler that fires this due time."""
        return bool(self.r.set(dataset_fired_key(name, due_at), time.time(), nx=True, ex=self.CLAIM_TTL_S))

    def claim_missed(self, name: str, due_ats: list[str]) -> int:
        """Claim these due times as missed, in one round trip: each one no scheduler fired or counted
        already. Counts them (the `missed` count) and returns how many this call claimed."""
        pipe = self.r.pipeline()
        for due_at in due_ats:
            pipe.set(dataset_fired_key(name, due_at), time.time(), nx=True, ex=self.CLAIM_TTL_S)
        claimed = sum(1 for ok in pipe.execute() if ok)
        if claimed:
            self.count(name, "missed", claimed)
        return claimed

    def count(self, name: str, field: str, n: int = 1) -> None:
        """Add to one of the dataset's counts: a RUN_OUTCOMES one, or webhook_<WEBHOOK_OUTCOMES>."""
        if field not in self.COUNTS:
            raise ValueError(f"unknown dataset count {field!r} (allowed: {', '.join(self.COUNTS)})")
        pipe = self.r.pipeline()
        pipe.hincrby(dataset_key(name), field, n)
        pipe.sadd(DATASETS, name)
        pipe.execute()

    def ledger(self, name: str, schedule: str, now: float) -> tuple[float, float]:
        """(since, checked) of the dataset's schedule (its cron and time zone as one string): when a
        scheduler first saw the dataset with this schedule, and the latest due time accounted for
        (fired or missed; 0: none yet). A new schedule starts a new ledger at `now`."""
        seen, since, checked = self.r.hmget(dataset_key(name), "schedule", "schedule_since", "checked_due")
        if seen != schedule.encode() or since is None:
            pipe = self.r.pipeline()
            pipe.hset(dataset_key(name), mapping={"schedule": schedule, "schedule_since": now})
            pipe.hdel(dataset_key(name), "checked_due")
            pipe.execute()
            return now, 0.0
        return float(since), float(checked or 0)

    def checked(self, name: str, due_at: float, next_due_at: float) -> None:
        """Every due time up to `due_at` is accounted for; the next is expected at `next_due_at`."""
        pipe = self.r.pipeline()
        pipe.hset(dataset_key(name), mapping={"checked_due": due_at, "next_due_at": next_due_at})
        pipe.sadd(DATASETS, name)
        pipe.execute()

    def unscheduled(self, scheduled: set[str]) -> list[str]:
        """Datasets with a next due time that are not in `scheduled` (spec gone, or its schedule): no
        run is expected of them any more. Their next due time is dropped (their counts stay); returns
        their names."""
        names = sorted(n.decode() for n in self.r.smembers(DATASETS))  # type: ignore[union-attr]
        pipe = self.r.pipeline()
        for name in names:
            pipe.hexists(dataset_key(name), "next_due_at")
        gone = [n for n, due in zip(names, pipe.execute(), strict=True) if due and n not in scheduled]
        for name in gone:
            pipe.hdel(dataset_key(name), "next_due_at")
        pipe.execute()
        return gone

    def stats(self) -> list[DatasetStats]:
        """Every watched dataset's counts and times, by name, in one round trip after the set's."""
        names = sorted(n.decode() for n in self.r.smembers(DATASETS))  # type: ignore[union-attr]
        pipe = self.r.pipeline()
        for name in names:
            pipe.hgetall(dataset_key(name))
        found = []
        for name, raw in zip(names, pipe.execute(), strict=True):
            fields = {k.decode(): v.decode() for k, v in raw.items()}
            counts = {k: int(v) for k, v in fields.items() if k in self.COUNTS}
            found.append(DatasetStats(name, counts, _float(fields.get("next_due_at")),
                                      _float(fields.get("last_fired_at"))))
        return found


def _float(raw: str | None) -> float | None:
    return float(raw) if raw is not None else None
