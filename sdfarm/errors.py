"""One error tree. Split by what the failure needs from whoever catches it.

- InvalidInput: the request is wrong; never retry, tell the user exactly what to fix.
- TransientError: the world blinked (S3, Redis, network); retry with backoff.
- WorkerFatal: this worker cannot serve (model missing, bad device); fail at start, loudly.
- AssetError: a file one job needs (LoRA, embedding) is missing or not what was planned; that
  job fails with the reason, the worker serves on.
"""

from __future__ import annotations

from dataclasses import dataclass


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
        parts = [self.source + (f":{self.line}" if self.line else "")]
        if self.item is not None:
            parts.append(f"item {self.item}")
        if self.field:
            parts.append(self.field)
        return ": ".join(parts) + ": " + self.message


class BatchInvalid(InvalidInput):
    """A batch file with one or more invalid items. Carries every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        count = len(problems)
        head = f"{count} problem{'s' if count != 1 else ''} in batch; nothing was enqueued"
        super().__init__(head + "\n" + "\n".join(f"  {p}" for p in problems))


class UnknownModel(InvalidInput):
    """A model name that the registry does not hold."""


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
