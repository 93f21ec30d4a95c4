"""One error tree. Split by what the failure needs from whoever catches it.

- InvalidInput: the request is wrong; never retry, tell the user exactly what to fix.
- TransientError: the world blinked (S3, Redis, network); retry with backoff. `is_transient` also
  recognises what the Redis, S3 and socket clients raise themselves.
- WorkerFatal: this worker cannot serve (model missing, bad device); fail at start, loudly.
- NewerSchema: a message from a newer producer; hand it back for an upgraded worker.
- ConfigError: a setting or credential is wrong; never retried, tell the operator which one.

A user's value enters a message only through `brief` (a bounded repr), and every message is
`printable` before it reaches a terminal.
- AssetError: a file one job needs (LoRA, embedding) is missing or not what was planned; that
  job fails with the reason, the worker serves on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

import redis.exceptions
from botocore.exceptions import BotoCoreError
from kombu.exceptions import OperationalError

MAX_SHOWN_PROBLEMS: Final = 50  # problems printed for one batch; the rest are counted
MAX_PROBLEMS: Final = 1000  # validation of a batch stops after this many
_BRIEF_DEPTH: Final = 3
_BRIEF_INT_BITS: Final = 256  # larger integers are described by their length
# what must not reach a terminal as it is: C0 and C1 controls, DEL, and the format characters
# that reorder or hide text (bidi overrides and isolates, zero-width marks, the BOM)
_UNPRINTABLE: Final = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
_UNPRINTABLE_BUT_NEWLINE: Final = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e"
                                             "\u2060-\u2069\ufeff]")


def brief(value: object, limit: int = 80) -> str:
    """A repr of a user's value for a message, at most `limit` characters, built without ever
    expanding more than that: a YAML file's aliases share one list many times over, and a full
    repr() of it would not fit in memory. Strings are repr()ed, so control characters come out
    escaped; integers too long to print are described by their length."""
    parts: list[str] = []
    _brief(value, parts, [limit + 1], 0)
    text = "".join(parts)
    return text if len(text) <= limit else text[:max(limit - 3, 0)] + "..."


def _brief(value: object, out: list[str], budget: list[int], depth: int) -> None:
    if budget[0] <= 0:
        return
    if isinstance(value, str):
        piece = repr(value[:budget[0]]) if len(value) > budget[0] else repr(value)
    elif isinstance(value, bool) or value is None or isinstance(value, float):
        piece = repr(value)
    elif isinstance(value, int):
        bits = value.bit_length()
        piece = repr(value) if bits <= _BRIEF_INT_BITS else f"<an integer of about {int(bits * 0.30103) + 1} digits>"
    elif isinstance(value, bytes):
        piece = repr(value[:budget[0]])
    elif isinstance(value, (dict, list, tuple, set, frozenset)):
        _brief_collection(value, out, budget, depth)
        return
    else:
        piece = f"<{type(value).__name__}>" if depth else repr(value)[:budget[0]]
    out.append(piece)
    budget[0] -= len(piece)


def _brief_collection(value: dict[object, object] | list[object] | tuple[object, ...] | set[object]
                      | frozenset[object], out: list[str], budget: list[int], depth: int) -> None:
    opening, closing = ("{", "}") if isinstance(value, (dict, set, frozenset)) else \
        ("(", ")") if isinstance(value, tuple) else ("[", "]")
    if depth >= _BRIEF_DEPTH and value:
        out.append(opening + "..." + closing)
        budget[0] -= 5
        return
    out.append(opening)
    budget[0] -= 1
    pairs = value.items() if isinstance(value, dict) else ((None, item) for item in value)
    for n, (key, item) in enumerate(pairs):
        if budget[0] <= 0:
            break
        if n:
            out.append(", ")
            budget[0] -= 2
        if isinstance(value, dict):
            _brief(key, out, budget, depth + 1)
            out.append(": ")
            budget[0] -= 2
        _brief(item, out, budget, depth + 1)
    out.append(closing)
    budget[0] -= 1


def printable(text: str, newlines: bool = False) -> str:
    """Text safe to print on a terminal: control characters (escape sequences, carriage returns,
    NUL) and the characters that reorder or hide text come out as escapes (\\x1b, \\u202e);
    with newlines=True, line breaks are kept."""
    pattern = _UNPRINTABLE_BUT_NEWLINE if newlines else _UNPRINTABLE
    return pattern.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class SdfarmError(Exception):
    """Root of every error sdfarm raises on purpose."""


class InvalidInput(SdfarmError):
    """Bad input: a batch file, a job, a model reference. Never retried."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one item of a batch file: where it is, which field, what is allowed."""

    source: str  # file name, or "<flags>"
    line: int | None  # 1-based line in the file, when the format has lines
    item: int | None  # 1-based item number, when the problem belongs to one item
    field: str  # "" when the problem is not about one field
    message: str

    def __str__(self) -> str:
        """One line: what a file said is printed escaped (an unknown key, a path, a value)."""
        parts = [printable(self.source) + (f":{self.line}" if self.line else "")]
        if self.item is not None:
            parts.append(f"item {self.item}")
        if self.field:
            parts.append(printable(self.field[:200]))
        message = self.message if len(self.message) <= 2000 else self.message[:2000] + "..."
        return ": ".join(parts) + ": " + printable(message)


class BatchInvalid(InvalidInput):
    """A batch file with one or more invalid items. Carries the problems found: every one, unless
    validation stopped after MAX_PROBLEMS (`stopped`). Its text lists the first
    MAX_SHOWN_PROBLEMS and counts the others."""

    def __init__(self, problems: list[Problem], stopped: bool = False) -> None:
        self.problems = problems
        self.stopped = stopped
        count = len(problems)
        head = (f"{'at least ' if stopped else ''}{count} problem{'s' if count != 1 else ''} in batch"
                f"{' (validation stopped there)' if stopped else ''}; nothing was enqueued")
        lines = [head, *(f"  {p}" for p in problems[:MAX_SHOWN_PROBLEMS])]
        if count > MAX_SHOWN_PROBLEMS:
            lines.append(f"  ... and {count - MAX_SHOWN_PROBLEMS}{'+' if stopped else ''} more")
        super().__init__("\n".join(lines))


class UnknownModel(InvalidInput):
    """A model name that the registry does not hold."""


class UnknownBatch(InvalidInput):
    """A batch id that names no batch in the bucket."""


class TransientError(SdfarmError):
    """A dependency failed in a way that may pass: retry with backoff."""


class NodeFault(SdfarmError):
    """This worker, not the job, is wrong (other weights than the registry says): hand the job back."""


class WorkerFatal(SdfarmError):
    """The worker cannot serve at all: exit non-zero at start rather than fail jobs."""


class AssetError(SdfarmError):
    """A LoRA or embedding a job needs is missing, unreadable, or has another sha256 than planned."""


class RenderError(SdfarmError):
    """The pipeline ran but gave no usable image (NaN in the latents or the decoded pixels)."""


class ConfigError(SdfarmError):
    """A setting or credential is wrong (an SDFARM_* variable, a URL, a key S3 refuses): the
    operator must fix it; never retried. The message names the setting, never a secret."""


class NewerSchema(SdfarmError):
    """A message written by a newer producer than this worker reads: another (upgraded) worker may read
    it, so it is handed back; not this node's fault, so it never counts toward blocking it."""


def is_transient(e: BaseException) -> bool:
    """TransientError, or what the Redis, S3, broker and socket clients raise when their server is
    unreachable (connection refused or reset, timeouts, a Redis still loading its AOF or turned
    read-only, a message kombu could not publish)."""
    return isinstance(e, (TransientError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                          redis.exceptions.ReadOnlyError, BotoCoreError, OperationalError, ConnectionError,
                          TimeoutError))
