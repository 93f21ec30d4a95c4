"""Progress of batches: a live bar for one (`watch`), a table of recent ones (`status`).

What a batch file or a worker wrote (batch names, host names, failure reasons) is printed through
`cell`: escaped (no terminal escape sequence gets through) and never read as rich markup."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from sdfarm.errors import InvalidInput, UnknownBatch, is_transient, printable
from sdfarm.layout import batch_key
from sdfarm.progress import ACTIVE, CANCELLED, ProgressBoard
from sdfarm.progress import Progress as BatchProgress
from sdfarm.store import MissingObject, Store
from sdfarm.workers import WorkerBeat, uptime_s


def cell(text: str) -> Text:
    """Someone else's text as a table cell: control characters escaped, no markup."""
    return Text(printable(text))


@dataclass
class Rate:
    """images/s over a sliding window, and the ETA it implies."""

    window_s: float = 30.0

    def __post_init__(self) -> None:
        self.samples: list[tuple[float, int]] = []

    def add(self, t: float, done: int) -> None:
        self.samples.append((t, done))
        while len(self.samples) > 2 and t - self.samples[0][0] > self.window_s:
            self.samples.pop(0)

    def per_s(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def eta(self, remaining: int) -> str:
        rate = self.per_s()
        if remaining <= 0:
            return "0s"
        if rate <= 0:
            return "?"
        s = int(remaining / rate)
        return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def read_progress(board: ProgressBoard, store: Store, batch_id: str) -> BatchProgress:
    progress = board.read(batch_id)
    if progress is not None:
        return progress
    try:
        store.get_json(batch_key(batch_id))
    except MissingObject as e:
        raise UnknownBatch(f"unknown batch {batch_id!r}: no s3://{store.bucket}/{batch_key(batch_id)}") from e
    raise InvalidInput(f"batch {batch_id} has no live progress in Redis (expired or lost): resubmit it to"
                       " re-register; finished jobs are skipped")


def watch(board: ProgressBoard, store: Store, batch_id: str, console: Console, interval_s: float = 0.5,
          timeout_s: float | None = None, stall_s: float | None = None,
          on_stall: Callable[[], None] | None = None, clock: Callable[[], float] = time.monotonic) -> BatchProgress:
    """Show a live bar until every job is done or failed, or the batch is cancelled.

    When nothing has moved for stall_s seconds, on_stall() runs (the CLI passes a reconcile that only
    acts when no message of the batch is queued or in flight). While Redis (or S3) is unreachable, a
    restart or a Sentinel failover, the bar says so and the watch goes on: it reconnects by itself.
    Returns the final progress."""
    rate = Rate()
    start = last_change = clock()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[stats]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task: TaskID | None = None
        last: BatchProgress | None = None
        seen = 0
        while True:
            try:
                p = read_progress(board, store, batch_id)
            except Exception as e:
                timed_out = timeout_s is not None and clock() - start > timeout_s
                if not is_transient(e) or (timed_out and last is None):
                    raise
                if timed_out and last is not None:
                    return last
                if task is not None:
                    bar.update(task, stats=f"unreachable, retrying: {escape(printable(type(e).__name__))}")
                time.sleep(interval_s)
                continue
            if task is None:
                task = bar.add_task(escape(printable(p.name or batch_id)), total=p.total, stats="")
                seen = p.done + p.failed
                if not console.is_terminal:  # no live bar: a first line for the log
                    console.print(f"watching batch {batch_id}: {p.total} jobs")
            last = p
            now = clock()
            rate.add(now, p.done + p.failed)
            if p.done + p.failed != seen:
                seen, last_change = p.done + p.failed, now
            state = "" if p.state == ACTIVE else f"  [{p.state}]"
            stats = (f"done {p.done}  failed {p.failed}  queued {p.queued}  "
                     f"{rate.per_s():.2f} img/s  ETA {rate.eta(p.queued)}{state}")
            bar.update(task, completed=p.done + p.failed, total=p.total, stats=stats)
            if p.finished or p.state == CANCELLED:
                return p
            if timeout_s is not None and now - start > timeout_s:
                return p
            if stall_s is not None and on_stall is not None and now - last_change > stall_s and p.state == ACTIVE:
                last_change = now
                _unless_unreachable(on_stall)
            time.sleep(interval_s)


def _unless_unreachable(action: Callable[[], None]) -> None:
    """action(), but an unreachable Redis or S3 only skips it (the next stall tries again)."""
    try:
        action()
    except Exception as e:
        if not is_transient(e):
            raise


def status_table(batches: list[BatchProgress]) -> Table:
    table = Table(title="recent batches")
    for col in ("batch", "name", "submitted", "total", "done", "failed", "queued", "state"):
        table.add_column(col, justify="right" if col in ("total", "done", "failed", "queued") else "left",
                         no_wrap=col in ("batch", "submitted"))
    for p in batches:
        state = (p.state if p.state != ACTIVE else
                 "failed" if p.finished and p.failed else "done" if p.finished else "running")
        submitted = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.submitted_at))
        table.add_row(cell(p.batch_id), cell(p.name), submitted, str(p.total), str(p.done), str(p.failed),
                      str(p.queued), cell(state))
    return table


def workers_table(beats: list[WorkerBeat]) -> Table:
    table = Table(title="workers")
    for col in ("hostname", "model", "device", "heartbeat", "images", "images/s", "failed", "last failure", "state"):
        table.add_column(col, no_wrap=col == "hostname", overflow="fold")
    now = time.time()
    for b in beats:
        state = f"BLOCKED: {b.blocked}" if b.blocked else (f"busy ({b.current_chunk})" if b.current_chunk else "idle")
        images = int(b.counters.get("images", 0))
        table.add_row(cell(b.hostname), cell(f"{b.model} ({b.model_hash})"), cell(f"{b.device} {b.device_name}"),
                      f"{now - b.heartbeat_at:.0f}s ago", str(images), f"{images / uptime_s(b, now):.2f}",
                      str(int(b.counters.get("failed", 0))), cell(b.last_failure), cell(state))
    return table
