"""The ledger of scheduled dataset runs: every due time is accounted for once, fired or missed, and the
next one is written down where the exporter reads it (sdfarm_dataset_runs_total,
sdfarm_dataset_next_run_timestamp_seconds).

A due time is a time the spec's cron names, in its time zone, once a scheduler has seen the spec
with that schedule. Each one ends up claimed once in Redis (DatasetBoard.claim, a SET NX):

- fired: a tick claimed it and submitted its batch (producer/scheduler.py).
- missed: it will never fire. A tick fires only a spec's latest due time, so a due time that a later
  one superseded before any tick fired it (every scheduler down, or the control worker busy, across
  two due times) is missed: the first tick after claims and counts it. So is a due time whose fire
  raised (claimed, then the submit failed: no tick tries it again). `sdfarm dataset run SPEC --date D`
  backfills either.

A run due and not yet fired is neither: each tick writes the spec's next due time, so when no tick
runs (the scheduler is down or stuck) or the spec no longer loads, that time falls into the past and
stays there; the alert compares it with the clock (infra/monitoring/alerts.yml).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sdfarm.datasets import DatasetSpec, Schedule, load_spec
from sdfarm.errors import SdfarmError
from sdfarm.progress import DatasetBoard

log = logging.getLogger("sdfarm.scheduler")

MISSED_PER_TICK: Final = 1000  # due times claimed as missed per spec and tick (a minutely cron down a week: 10k)


@dataclass(frozen=True)
class Scheduled:
    """A spec with a schedule, as a tick found it."""

    path: Path
    spec: DatasetSpec

    @property
    def schedule(self) -> Schedule:
        assert self.spec.schedule is not None
        return self.spec.schedule


def scheduled_specs(folder: Path) -> tuple[list[Scheduled], bool]:
    """The specs in folder that have a schedule, and whether every spec file loaded (one that does
    not is logged and skipped: its name is unknown, so nothing about it may be forgotten)."""
    found, complete = [], True
    for path in sorted(folder.glob("*.y*ml")):
        try:
            spec = load_spec(path).spec
        except SdfarmError as e:
            log.error("skipping %s: %s", path, e)
            complete = False
            continue
        if spec.schedule is not None:
            found.append(Scheduled(path, spec))
    return found, complete


def account(board: DatasetBoard, specs: list[Scheduled], complete: bool, now: dt.datetime) -> int:
    """After a tick fired what was due: claim and count each spec's due times since its last account
    that will never fire (all but the latest), and write down its next due time. Datasets no longer
    scheduled lose their next due time, when every spec loaded (`complete`). Returns how many due
    times this call counted missed."""
    missed = 0
    for s in specs:
        name, schedule = s.spec.name, s.schedule
        since, checked = board.ledger(name, schedule.key, now.timestamp())
        latest = schedule.latest(now)
        after = dt.datetime.fromtimestamp(max(since, checked), dt.timezone.utc)
        superseded = schedule.due_between(after, latest, MISSED_PER_TICK)
        claimed = board.claim_missed(name, [due.isoformat() for due in superseded])
        if claimed:
            log.error("dataset %s: %d due times missed, %s to %s (no scheduler fired them); backfill with"
                      " `sdfarm dataset run %s --date DATE`", name, claimed, superseded[0].isoformat(),
                      superseded[-1].isoformat(), s.path)
        missed += claimed
        # the latest due time is the fire's: claimed by this tick (due_runs), or owed nothing (it came
        # before the spec was first seen); past the limit, the rest are the next tick's
        through = superseded[-1] if len(superseded) == MISSED_PER_TICK else latest
        board.checked(name, through.timestamp(), schedule.next_after(now).timestamp())
    if complete:
        for name in board.unscheduled({s.spec.name for s in specs}):
            log.info("dataset %s is no longer scheduled", name)
    return missed
