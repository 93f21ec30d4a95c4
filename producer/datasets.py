"""Dataset runs: a spec and a date become a batch (same spec + date = same batch: never twice)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery

from sdfarm.datasets import LoadedSpec, load_spec, plan_run
from sdfarm.models import Registry
from sdfarm.progress import ProgressBoard
from sdfarm.settings import Settings
from sdfarm.store import Store

from .submit import SubmitResult, submit_plan


@dataclass(frozen=True)
class RunResult:
    date: dt.date
    batch_id: str
    submitted: SubmitResult


def hooks_of(loaded: LoadedSpec, date: dt.date) -> dict[str, Any]:
    """What to do when the run's batch finishes: recorded in batch.json, read by the control worker."""
    spec = loaded.spec
    prefix = "/".join(p for p in (spec.output_prefix.strip("/"), date.isoformat()) if p)
    return {
        "dataset": spec.name,
        "date": date.isoformat(),
        "export": [{"format": fmt, "dest_prefix": f"{prefix}/{fmt}"} for fmt in spec.export],
        "webhook": spec.webhook.model_dump() if spec.webhook else None,
    }


def run_dataset(spec_path: Path, date: dt.date, settings: Settings, store: Store, board: ProgressBoard,
                app: Celery) -> RunResult:
    loaded = load_spec(spec_path)
    plan = plan_run(loaded, date, Registry.from_settings(settings), settings.max_jobs_per_batch)
    plan.spec["hooks"] = hooks_of(loaded, date)
    result = submit_plan(plan, store, app, board, settings.chunk_size)
    board.datasets().record_run(loaded.spec.name, date.isoformat(), plan.batch_id)
    return RunResult(date, plan.batch_id, result)


def dataset_rows(folder: Path, board: ProgressBoard, now: dt.datetime | None = None) -> list[dict[str, str]]:
    """Each spec in folder: its schedule, next run, last run with its batch id and counts."""
    now = now or dt.datetime.now(dt.timezone.utc)
    rows = []
    for path in sorted(folder.glob("*.y*ml")):
        loaded = load_spec(path)
        spec = loaded.spec
        last = board.datasets().last_run(spec.name)
        progress = board.read(last["last_batch"]) if last.get("last_batch") else None
        rows.append({
            "name": spec.name,
            "spec": path.name,
            "schedule": f"{spec.schedule.cron} {spec.schedule.timezone}" if spec.schedule else "-",
            "next_run": spec.schedule.next_after(now).isoformat() if spec.schedule else "-",
            "last_run": last.get("last_date", "-"),
            "last_batch": last.get("last_batch", "-"),
            "counts": (f"{progress.done}/{progress.total} done, {progress.failed} failed" if progress else "-"),
        })
    return rows
