"""The farm as producers see it: one object holding the store, the progress board, the Celery app and
the registry, built once from the settings, with every producer operation as a method. The `sdfarm`
command line, the scheduler and the HTTP API all go through it; they only present.

    farm = Farm.from_settings(load_settings())
    result = farm.submit(farm.plan_file(Path("batch.yaml")))
    farm.progress(result.batch_id)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from celery import Celery
from rich.console import Console

from sdfarm.batchfile import BatchPlan, BatchStream, RawItem, plan_items, stream_batch, stream_file
from sdfarm.errors import InvalidInput, brief
from sdfarm.inputs import Inputs
from sdfarm.models import Registry
from sdfarm.progress import Progress, ProgressBoard
from sdfarm.queue import DEFAULT_PRIORITY, DRAIN_COMMAND, make_celery
from sdfarm.settings import Settings
from sdfarm.store import Store
from sdfarm.workers import WorkerBeat

from . import control
from .batch_pages import Failure, ImagePage, failures, image_page
from .browse import JobLists
from .datasets import RunResult, dataset_rows, run_dataset
from .export import export
from .fetch import FetchResult, fetch, links
from .submit import SubmitResult, describe_stream, submit_plan, submit_stream
from .watch import read_progress, watch

# `watch` re-enqueues a stalled batch's missing jobs after this long without progress (the CLI's default)
RECONCILE_AFTER_S = 60.0


@dataclass
class Farm:
    settings: Settings
    store: Store
    board: ProgressBoard
    celery: Celery | None = None  # the Celery app to send with (None: the farm's own, made when first needed)

    @classmethod
    def from_settings(cls, settings: Settings, celery: Celery | None = None) -> Farm:
        return cls(settings, Store.from_settings(settings), ProgressBoard.from_settings(settings), celery)

    @cached_property
    def registry(self) -> Registry:
        return Registry.from_settings(self.settings)

    @property
    def app(self) -> Celery:
        if self.celery is None:
            self.celery = make_celery(self.settings)
        return self.celery

    # ------------------------------------------------------------------ submitting

    def plan_file(self, path: Path, overrides: Mapping[str, Any] | None = None, name: str | None = None,
                  cpu_noise: bool = False) -> BatchStream:
        """A batch file (yaml, json, jsonl, csv, txt; A1111 PNGs), planned as it is submitted."""
        return stream_file(path, self.registry, self.settings.max_jobs_per_batch, overrides, name,
                           self._inputs(), cpu_noise)

    def plan_text(self, text: str, fmt: str, source: str, overrides: Mapping[str, Any] | None = None,
                  name: str | None = None, max_jobs: int | None = None) -> BatchStream:
        """A batch file's text in one of the four formats (yaml, json, jsonl, csv, txt), as the API receives
        it: at most `max_jobs` jobs, and its inputs from the bucket, never this host's SDFARM_INPUTS_DIR."""
        cap = min(max_jobs or self.settings.max_jobs_per_batch, self.settings.max_jobs_per_batch)
        return stream_batch(text, source, fmt, self.registry, cap, overrides, name, self.remote_inputs())

    def _inputs(self) -> Inputs:
        return Inputs(self.store, self.settings.inputs_dir)

    def remote_inputs(self) -> Inputs:
        """Inputs of a batch that came over the network: the bucket's, and what it sends itself."""
        return Inputs(self.store, None, remote=True)

    def describe(self, stream: BatchStream) -> str:
        """The plan of a dry run: validated whole, nothing written."""
        return describe_stream(stream, self.settings.chunk_size)

    def submit(self, stream: BatchStream, priority: int = DEFAULT_PRIORITY) -> SubmitResult:
        """Record the batch in S3, register it, enqueue its jobs not yet done. All or nothing."""
        return submit_stream(stream, self.store, self.app, self.board, self.settings.chunk_size, priority)

    def run_dataset(self, spec: Path, date: dt.date) -> RunResult:
        return run_dataset(spec, date, self.settings, self.store, self.board, self.app)

    def datasets(self, folder: Path) -> list[dict[str, str]]:
        return dataset_rows(folder, self.board)

    # ------------------------------------------------------------------ watching

    def progress(self, batch_id: str) -> Progress:
        """The batch's live progress; InvalidInput for a batch unknown or no longer in Redis."""
        return read_progress(self.board, self.store, batch_id)

    def state(self, batch_id: str) -> str:
        return self.board.state(batch_id)

    def recent(self, limit: int = 20, offset: int = 0) -> list[Progress]:
        """The most recent batches first, those Redis still holds."""
        return self.board.read_many(self.board.recent(limit + offset)[offset:])

    def watch(self, batch_id: str, console: Console, timeout_s: float | None = None,
              reconcile_after_s: float | None = RECONCILE_AFTER_S, notices: Console | None = None) -> Progress:
        """A live bar on `console` until the batch finishes or is cancelled; after reconcile_after_s
        without progress, and with none of its messages queued or in flight, its missing jobs are
        enqueued again (said on `notices`)."""
        return watch(self.board, self.store, batch_id, console, timeout_s=timeout_s, stall_s=reconcile_after_s,
                     on_stall=lambda: self._reconcile_stalled(batch_id, notices or console))

    def _reconcile_stalled(self, batch_id: str, notices: Console) -> None:
        self.reconcile_if_idle(batch_id, notices)

    def reconcile_if_idle(self, batch_id: str, notices: Console | None = None) -> control.ReconcileResult | None:
        """Reconcile the batch when none of its messages is queued or in flight (the policy of a
        stalled watch); None when something is still on its way."""
        if not control.nothing_queued_or_in_flight(self.store, self.board, batch_id):
            return None
        result = self.reconcile(batch_id)
        if result.enqueued_jobs and notices is not None:
            notices.print(f"queue empty but {result.enqueued_jobs} jobs missing: re-enqueued them (reconcile)")
        return result

    def workers(self) -> list[WorkerBeat]:
        return self.board.workers().live()

    # ------------------------------------------------------------------ controlling

    def cancel(self, batch_id: str) -> None:
        control.cancel(self.store, self.board, batch_id)

    def pause(self, batch_id: str) -> None:
        control.pause(self.store, self.board, batch_id)

    def resume(self, batch_id: str) -> control.ReconcileResult:
        return control.resume(self.store, self.board, self.app, batch_id, self.settings.chunk_size)

    def retry(self, batch_id: str) -> int:
        return control.retry_failed(self.store, self.board, self.app, batch_id)

    def reconcile(self, batch_id: str) -> control.ReconcileResult:
        return control.reconcile(self.store, self.board, self.app, batch_id, self.settings.chunk_size)

    def drain(self, worker: str) -> None:
        """Ask WORKER to drain (worker/drain.py); InvalidInput when no such worker answers."""
        replies = self.app.control.broadcast(DRAIN_COMMAND, destination=[worker], reply=True, timeout=5.0)
        if not replies:
            live = ", ".join(b.hostname for b in self.workers()) or "none"
            raise InvalidInput(f"no worker named {brief(worker)} answered (live workers: {live})")
        answer: Any = next(iter(replies[0].values()), {}) if isinstance(replies[0], dict) else {}
        if "ok" not in answer:  # an older worker, or a process that is no render worker
            raise InvalidInput(f"{brief(worker)} cannot drain: it answered {brief(answer)}")

    # ------------------------------------------------------------------ results

    def fetch(self, batch_id: str, dest: Path) -> FetchResult:
        return fetch(self.store, batch_id, dest)

    def links(self, batch_id: str, expires_s: int = 3600) -> list[dict[str, Any]]:
        return links(self.store, batch_id, expires_s)

    def export(self, batch_id: str, fmt: str, dest: str, shard_size: int = 1000) -> tuple[int, list[str]]:
        return export(self.store, batch_id, fmt, dest, shard_size)

    # ------------------------------------------------------------------ for the HTTP API

    @cached_property
    def job_lists(self) -> JobLists:
        """Batches' job lists (index, id, prompt, seed), read once and kept for a few batches."""
        return JobLists(self.store)

    def images(self, batch_id: str, offset: int = 0, limit: int = 50, expires_s: int = 3600) -> ImagePage:
        """A page of the batch's finished images, in batch order, with presigned GET links."""
        return image_page(self.store, self.board, self.job_lists, batch_id, offset, limit, expires_s)

    def failures(self, batch_id: str, limit: int = 20) -> list[Failure]:
        """Up to `limit` of the batch's failed jobs with their reasons."""
        return failures(self.store, batch_id, limit)

    def plan_items(self, items: list[dict[str, Any]], source: str, name: str, inputs: Inputs | None = None,
                   max_jobs: int | None = None) -> BatchPlan:
        """Batch items already parsed (the A1111 API's requests), planned whole and validated as a batch
        file's items are; `inputs` resolves their init images and masks (default: the bucket's)."""
        raw = [RawItem(data, n) for n, data in enumerate(items, 1)]
        cap = min(max_jobs or self.settings.max_jobs_per_batch, self.settings.max_jobs_per_batch)
        return plan_items({}, raw, source, "api", self.registry, cap, name=name,
                          inputs=inputs or self.remote_inputs())

    def submit_plan(self, plan: BatchPlan, priority: int = DEFAULT_PRIORITY) -> SubmitResult:
        """submit, for a batch planned whole (plan_items)."""
        return submit_plan(plan, self.store, self.app, self.board, self.settings.chunk_size, priority)
