"""The API's callers: tokens parsed with errors that never show a token, compared in constant time,
signed sessions that expire and cannot be forged, a cap on requests in flight per token."""

from __future__ import annotations

import time

import pytest

from producer.api.auth import Auth, TooManyRequests, parse_tokens
from sdfarm.errors import ConfigError

TOKEN = "alice-token-" + "x" * 30


def auth(max_concurrent: int = 2) -> Auth:
    return Auth(parse_tokens(f"alice:{TOKEN}, bob:{'y' * 40}"), max_concurrent)


def test_tokens_are_name_token_pairs_and_a_bad_entry_is_named_by_position_only() -> None:
    assert set(parse_tokens(f"alice:{TOKEN},bob:{'y' * 16},")) == {"alice", "bob"}
    assert parse_tokens("") == {}
    for raw, message in ((f"alice{TOKEN}", "entry 1 is not NAME:TOKEN"),
                         (f"alice:{TOKEN},b b:{TOKEN}", "entry 2 is not NAME:TOKEN"),
                         ("alice:short-secret", "the token of 'alice' is shorter than 16 characters"),
                         (f"alice:{TOKEN},alice:{'z' * 20}", "'alice' is named twice")):
        with pytest.raises(ConfigError, match=message) as e:
            parse_tokens(raw)
        assert TOKEN not in str(e.value)
        assert "short-secret" not in str(e.value)


def test_a_bearer_header_names_its_token_and_nothing_else_does() -> None:
    a = auth()
    assert a.bearer(f"Bearer {TOKEN}") == "alice"
    assert a.bearer(f"bearer {'y' * 40}") == "bob"
    for header in (None, "", TOKEN, f"Basic {TOKEN}", "Bearer ", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}"):
        assert a.bearer(header) is None


def test_comparing_a_token_takes_as_long_whatever_it_shares_with_a_real_one() -> None:
    """The presented token is hashed, then compared with every configured token's hash with
    hmac.compare_digest: a guess sharing a long prefix with a token is no faster to refuse or accept
    than one sharing nothing (the fastest of many runs, to see through the machine's noise)."""
    a = auth()
    guesses = {"near": TOKEN[:-1] + "!", "far": "!" * len(TOKEN), "right": TOKEN}
    fastest = dict.fromkeys(guesses, float("inf"))
    for _ in range(300):  # round robin: a burst of load on the machine slows every guess alike
        for kind, presented in guesses.items():
            t0 = time.perf_counter_ns()
            for _ in range(30):
                a.token_name(presented)
            fastest[kind] = min(fastest[kind], time.perf_counter_ns() - t0)
    assert 0.6 < fastest["near"] / fastest["far"] < 1.67
    assert 0.6 < fastest["right"] / fastest["far"] < 1.67


def test_a_session_is_signed_expires_and_names_a_configured_token() -> None:
    a = auth()
    cookie = a.session("alice", now=1000.0)
    assert a.session_name(cookie, now=1001.0) == "alice"
    assert a.session_name(cookie, now=1000.0 + 13 * 3600) is None  # expired
    _name, expires, signature = cookie.split("|")
    assert a.session_name(f"bob|{expires}|{signature}", now=1001.0) is None  # another name, same signature
    assert a.session_name(f"alice|{int(expires) + 10**6}|{signature}", now=1001.0) is None  # extended
    assert Auth(a.tokens, 2).session_name(cookie, now=1001.0) is None  # another process's key
    assert a.session_name(a.session("mallory", now=1000.0), now=1001.0) is None  # no such token
    for junk in (None, "", "alice", "a|b", "a|b|c|d"):
        assert a.session_name(junk) is None


def test_a_token_has_at_most_its_requests_in_flight() -> None:
    a = auth(max_concurrent=2)
    with a.slot("alice"), a.slot("alice"):
        with pytest.raises(TooManyRequests):
            a.slot("alice").__enter__()
        with a.slot("bob"):  # another token's slots are its own
            pass
    with a.slot("alice"):  # released
        pass


def test_a_cookie_of_any_characters_is_refused_not_an_error() -> None:
    a = auth()
    for junk in ("a|1|\xe9", "\u00e9|\u00e9|\u00e9", "alice|99999999999|" + "\u0661" * 64):
        assert a.session_name(junk) is None
