"""Where the farm's Redis is: one server (redis://, rediss://, unix://) or a group watched by Redis
Sentinel (sentinel://), and the clients that follow it.

A Sentinel URL is Celery's: every sentinel of the group, separated by `;`, the first one carrying
the master's password and database:

    sentinel://:PASSWORD@sentinel-1:26379/0;sentinel://sentinel-2:26379;sentinel://sentinel-3:26379

SDFARM_REDIS_SENTINEL_MASTER names the master the sentinels monitor, and SDFARM_REDIS_SENTINEL_PASSWORD
is the sentinels' own password when they require one. Every client here (the progress and worker
boards, Celery's broker transport, the scheduler's RedBeat) asks the sentinels for the master on each
new connection, and a connection to a master that was demoted fails: after a failover they reach
the promoted replica by themselves, through the outage handling every Redis client already has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

from .settings import Settings

SENTINEL_SCHEME: Final = "sentinel"
DEFAULT_SENTINEL_PORT: Final = 26379
SOCKET_TIMEOUT_S: Final = 30
CONNECT_TIMEOUT_S: Final = 5
URL_FORMS: Final = ("redis://[:PASSWORD@]HOST[:PORT][/DB], rediss://... (TLS), unix:///PATH, or"
                    " sentinel://[:PASSWORD@]HOST[:PORT][/DB];sentinel://HOST[:PORT];... (Redis Sentinel);"
                    " percent-encode / : @ # in the password")


@dataclass(frozen=True)
class RedisTarget:
    url: str  # as given (a secret: it holds the password)
    sentinels: tuple[tuple[str, int], ...] = ()  # empty: one server at `url`
    master: str = ""
    password: str | None = None  # the master's (sentinel URLs)
    username: str | None = None
    db: int = 0
    sentinel_password: str | None = None

    @property
    def is_sentinel(self) -> bool:
        return bool(self.sentinels)

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisTarget:
        secret = settings.redis_sentinel_password
        return cls.parse(settings.redis_url.get_secret_value(), settings.redis_sentinel_master,
                         secret.get_secret_value() if secret else None)

    @classmethod
    def parse(cls, url: str, master: str = "", sentinel_password: str | None = None) -> RedisTarget:
        """The target of SDFARM_REDIS_URL; ValueError saying what is wrong, never quoting the URL."""
        if not url.startswith(SENTINEL_SCHEME + "://"):
            try:
                redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
            except ValueError as e:
                reason = ("it must start with redis://, rediss://, unix:// or sentinel://" if "scheme" in str(e)
                          else "it does not parse")
                raise ValueError(f"SDFARM_REDIS_URL is not a Redis URL: {reason} (allowed: {URL_FORMS})") from None
            return cls(url=url)
        if not master:
            raise ValueError("SDFARM_REDIS_SENTINEL_MASTER is empty: a sentinel:// URL needs the name of the"
                             " master the sentinels monitor")
        sentinels: list[tuple[str, int]] = []
        first = None
        for n, part in enumerate(url.split(";"), 1):
            try:
                parts = urlsplit(part)
                port = parts.port or DEFAULT_SENTINEL_PORT
            except ValueError:
                raise ValueError(f"SDFARM_REDIS_URL: sentinel {n} does not parse (allowed: {URL_FORMS})") from None
            if parts.scheme != SENTINEL_SCHEME or not parts.hostname:
                raise ValueError(f"SDFARM_REDIS_URL: sentinel {n} is not sentinel://HOST[:PORT] (allowed: {URL_FORMS})")
            sentinels.append((parts.hostname, port))
            first = first or parts
        assert first is not None
        path = first.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"SDFARM_REDIS_URL: the database must be a number (allowed: {URL_FORMS})")
        return cls(url=url, sentinels=tuple(sentinels), master=master,
                   password=unquote(first.password) if first.password else None,
                   username=unquote(first.username) if first.username else None,
                   db=int(path or 0), sentinel_password=sentinel_password)

    def _sentinel_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"socket_timeout": CONNECT_TIMEOUT_S, "socket_connect_timeout": CONNECT_TIMEOUT_S}
        if self.sentinel_password:
            kwargs["password"] = self.sentinel_password
        return kwargs

    def client(self) -> redis.Redis:
        """A client of the master: the server itself, or whichever node the sentinels name now."""
        if not self.is_sentinel:
            return redis.Redis.from_url(self.url, socket_timeout=SOCKET_TIMEOUT_S,
                                        socket_connect_timeout=CONNECT_TIMEOUT_S)
        sentinel = Sentinel(list(self.sentinels), sentinel_kwargs=self._sentinel_kwargs(),  # type: ignore[no-untyped-call]
                            socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=CONNECT_TIMEOUT_S)
        client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            self.master, redis_class=redis.Redis, password=self.password, username=self.username, db=self.db)
        return client

    def transport_options(self) -> dict[str, Any]:
        """What Celery's broker transport needs beyond the URL (kombu's sentinel transport takes the
        URL as it is, the sentinels' list from it and the master's password and database from its
        first part)."""
        if not self.is_sentinel:
            return {}
        return {"master_name": self.master, "sentinel_kwargs": self._sentinel_kwargs()}

    def redbeat_conf(self) -> dict[str, Any]:
        """The scheduler's RedBeat settings: its own client, through the sentinels when there are."""
        if not self.is_sentinel:  # no options (RedBeat would fall back to the broker's transport options)
            return {"redbeat_redis_url": self.url, "redbeat_redis_options": {}}
        options: dict[str, Any] = {"sentinels": list(self.sentinels), "service_name": self.master,
                                   "password": self.password, "db": self.db, "socket_timeout": SOCKET_TIMEOUT_S,
                                   "sentinel_kwargs": self._sentinel_kwargs()}
        if self.username:
            options["username"] = self.username
        return {"redbeat_redis_url": "redis-sentinel://", "redbeat_redis_options": options}
