"""Who may call the API: bearer tokens from SDFARM_API_TOKENS (NAME:TOKEN pairs), compared in constant
time; the gallery's session cookie (HttpOnly, SameSite=Strict), signed with a key this process draws
at start (a restarted service asks the browser to log in again); at most SDFARM_API_MAX_CONCURRENT
requests in flight per token. A token never reaches a response or a log line: the name does."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sdfarm.errors import ConfigError

SESSION_COOKIE = "sdfarm_session"
SESSION_TTL_S = 12 * 3600
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class TooManyRequests(Exception):
    """A token already has its SDFARM_API_MAX_CONCURRENT requests in flight."""


def parse_tokens(raw: str) -> dict[str, bytes]:
    """NAME:TOKEN pairs, comma separated -> {name: sha256(token)}. ConfigError naming the bad entry by
    position (never its text: it holds a secret)."""
    tokens: dict[str, bytes] = {}
    for n, entry in enumerate((e.strip() for e in raw.split(",")), 1):
        if not entry:
            continue
        name, sep, token = entry.partition(":")
        if not sep or not name or not set(name) <= _NAME_CHARS:
            raise ConfigError(f"SDFARM_API_TOKENS: entry {n} is not NAME:TOKEN (NAME: letters, digits, - _ .)")
        if len(token) < 16:
            raise ConfigError(f"SDFARM_API_TOKENS: the token of {name!r} is shorter than 16 characters")
        if name in tokens:
            raise ConfigError(f"SDFARM_API_TOKENS: {name!r} is named twice")
        tokens[name] = hashlib.sha256(token.encode()).digest()
    return tokens


@dataclass
class Auth:
    tokens: dict[str, bytes]  # name -> sha256 of the token
    max_concurrent: int
    session_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    _in_flight: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def bearer(self, authorization: str | None) -> str | None:
        """The token's name for an `Authorization: Bearer TOKEN` header; None if it names no token.
        Every configured token is compared, each in constant time, whatever matches first."""
        if not authorization:
            return None
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return None
        return self.token_name(presented.strip())

    def token_name(self, presented: str) -> str | None:
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for name, wanted in self.tokens.items():
            if hmac.compare_digest(digest, wanted):
                found = name
        return found

    def session(self, name: str, now: float | None = None) -> str:
        """A session cookie's value for a logged-in token name."""
        expires = int((now or time.time()) + SESSION_TTL_S)
        payload = f"{name}|{expires}"
        return f"{payload}|{self._sign(payload)}"

    def session_name(self, cookie: str | None, now: float | None = None) -> str | None:
        """The token name of a valid, unexpired session cookie; None otherwise."""
        if not cookie or cookie.count("|") != 2:
            return None
        name, expires, signature = cookie.split("|")
        if not hmac.compare_digest(signature.encode(), self._sign(f"{name}|{expires}").encode()):
            return None
        if not (expires.isascii() and expires.isdigit()) or int(expires) < (now or time.time()):
            return None
        if name not in self.tokens:
            return None
        return name

    def _sign(self, payload: str) -> str:
        return hmac.new(self.session_key, payload.encode(), hashlib.sha256).hexdigest()

    @contextmanager
    def slot(self, name: str) -> Iterator[None]:
        """One of the token's concurrent requests; TooManyRequests when all are taken."""
        with self._lock:
            if self._in_flight.get(name, 0) >= self.max_concurrent:
                raise TooManyRequests(name)
            self._in_flight[name] = self._in_flight.get(name, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight[name] -= 1
