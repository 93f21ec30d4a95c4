"""The beat of `sdfarm scheduler`: celery-redbeat's scheduler, made to outlive a Redis outage.

RedBeat's tick extends its lock and reads the schedule from Redis. A connection error there ends the
beat process (sibson/redbeat#285), and Celery does not restart a worker's embedded beat: the
scheduler would live on without ticks, firing no dataset run and reconciling no stalled batch ever
again. Here a tick that cannot reach Redis logs and tries again after one interval. Once Redis is
back the lock is extended, or taken again if it expired meanwhile (while another scheduler holds
it, this one stands by). Firing twice around an outage is harmless: a dataset run is claimed in
Redis and its batch id is a function of (spec, date), and a reconcile renders nothing twice.
"""

from __future__ import annotations

import logging
from typing import Any

from redbeat.schedulers import LUA_EXTEND_TO_SCRIPT, RedBeatScheduler, get_redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("sdfarm.scheduler")

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, LockError)


class ResilientRedBeat(RedBeatScheduler):  # type: ignore[misc]
    lock: Any  # redis-py's Lock once taken, else None (redbeat sets it on beat_init)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        try:
            if self.lock_key and not self._holds_lock():
                return float(self.max_interval)  # another scheduler's beat fires
            return float(super().tick(*args, **kwargs))
        except REDIS_DOWN as e:
            log.warning("beat: Redis unreachable, trying again in %ss: %s", self.max_interval, e)
            return float(self.max_interval)

    def _holds_lock(self) -> bool:
        """Whether this beat holds the lock, taking it when it is free (at start, if Redis was down
        then, the lock is None; after an outage it may have expired)."""
        if self.lock is not None and self.lock.owned():
            return True
        client = get_redis(self.app)
        lock = client.lock(self.lock_key, timeout=self.lock_timeout, sleep=self.max_interval)
        lock.lua_extend = client.register_script(LUA_EXTEND_TO_SCRIPT)  # as redbeat's own acquire
        if not lock.acquire(blocking=False):
            return False
        log.info("beat: lock taken%s", " again" if self.lock is not None else "")
        self.lock = lock
        return True

    def close(self) -> None:
        try:
            super().close()
        except REDIS_DOWN as e:  # the lock expires by itself
            log.warning("beat: could not release the lock (Redis unreachable): %s", e)
