"""`sdfarm exporter`: the farm's own Prometheus metrics, read from Redis at each scrape (nothing is
kept here, so any number of exporters may run, and a restart loses nothing; a scrape costs a few
pipelined Redis round trips and a scan of the worker keys):

    sdfarm_queue_depth{model}        chunks waiting in render.<model>, every priority list counted
                                     (the lists Celery's Redis transport keeps: the ones KEDA scales on)
    sdfarm_unacked_chunks            chunks delivered to a worker and not acknowledged yet
    sdfarm_workers{model, state}     workers whose heartbeat is live: serving, or blocked (stopped itself)
    sdfarm_batches{state}            the recent batches (--batches) by state: active, paused,
                                     cancelled, done
    sdfarm_jobs{state}               their jobs: total, done, failed
    sdfarm_batch_eta_seconds{batch}  per running batch: remaining jobs / its images per second since
                                     it was submitted

and, for each dataset the scheduler watches (sdfarm.progress.DatasetBoard; counted by the scheduler
in Redis, so they survive its restarts and any exporter reads them):

    sdfarm_dataset_runs_total{dataset, outcome}           due times fired, or missed: never to fire
                                                          (superseded by a later one, or the fire
                                                          failed; producer/ledger.py)
    sdfarm_dataset_next_run_timestamp_seconds{dataset}    the next due time, as of the scheduler's
                                                          last tick: in the past, no tick has fired it
    sdfarm_dataset_last_run_timestamp_seconds{dataset}    when a run last fired (or ran by hand)
    sdfarm_webhook_deliveries_total{dataset, outcome}     completion webhook attempts: delivered (2xx),
                                                          failed (network error or another status;
                                                          retried), unsent (its secret is not set)
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sdfarm.models import Registry
from sdfarm.progress import ACTIVE, DatasetBoard, ProgressBoard

log = logging.getLogger("sdfarm.exporter")

RECENT_BATCHES: Final = 200  # batches whose states and jobs are exported


class FarmCollector(Collector):
    def __init__(self, board: ProgressBoard, registry: Registry, recent: int = RECENT_BATCHES) -> None:
        self.board, self.registry, self.recent = board, registry, recent

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("sdfarm_queue_depth", "Chunks waiting in a model's queue (every priority).",
                                  labels=["model"])
        workers = GaugeMetricFamily("sdfarm_workers", "Workers with a live heartbeat: serving, or blocked.",
                                    labels=["model", "state"])
        live = Counter((beat.model, "blocked" if beat.blocked else "serving") for beat in self.board.workers().live())
        for model in self.registry.names():
            depth.add_metric([model], self.board.queue_depth(model))
            for state in ("serving", "blocked"):
                workers.add_metric([model, state], live.get((model, state), 0))
        unacked = GaugeMetricFamily("sdfarm_unacked_chunks", "Chunks delivered and not acknowledged yet.")
        unacked.add_metric([], self.board.unacked())
        yield from (depth, workers, unacked)
        yield from self._batches()
        yield from self._datasets()

    def _batches(self) -> Iterator[GaugeMetricFamily]:
        states: Counter[str] = Counter()
        jobs: Counter[str] = Counter()
        eta = GaugeMetricFamily("sdfarm_batch_eta_seconds", "Seconds a running batch needs still, at its rate.",
                                labels=["batch"])
        now = time.time()
        for progress in self.board.read_many(self.board.recent(self.recent)):
            state = "done" if progress.finished else progress.state
            states[state] += 1
            jobs.update(total=progress.total, done=progress.done, failed=progress.failed)
            remaining = progress.total - progress.done - progress.failed
            elapsed = now - progress.submitted_at
            if state == ACTIVE and progress.done and elapsed > 0:
                eta.add_metric([progress.batch_id], remaining / (progress.done / elapsed))
        batches = GaugeMetricFamily("sdfarm_batches", "Recent batches by state.", labels=["state"])
        for state in ("active", "paused", "cancelled", "done"):
            batches.add_metric([state], states.get(state, 0))
        job_counts = GaugeMetricFamily("sdfarm_jobs", "Jobs of the recent batches.", labels=["state"])
        for key in ("total", "done", "failed"):
            job_counts.add_metric([key], jobs.get(key, 0))
        yield from (batches, job_counts, eta)

    def _datasets(self) -> Iterator[Metric]:
        runs = CounterMetricFamily("sdfarm_dataset_runs", "Due times of scheduled datasets: fired, or missed.",
                                   labels=["dataset", "outcome"])
        next_run = GaugeMetricFamily("sdfarm_dataset_next_run_timestamp_seconds",
                                     "A dataset's next due time, as of the scheduler's last tick.", labels=["dataset"])
        last_run = GaugeMetricFamily("sdfarm_dataset_last_run_timestamp_seconds", "When a dataset's run last fired.",
                                     labels=["dataset"])
        webhooks = CounterMetricFamily("sdfarm_webhook_deliveries", "Completion webhook attempts by outcome.",
                                       labels=["dataset", "outcome"])
        for stats in self.board.datasets().stats():  # every outcome, at 0 too: rate() sees a first increment
            for outcome in DatasetBoard.RUN_OUTCOMES:
                runs.add_metric([stats.name, outcome], stats.counts.get(outcome, 0))
            for outcome in DatasetBoard.WEBHOOK_OUTCOMES:
                webhooks.add_metric([stats.name, outcome], stats.counts.get(f"webhook_{outcome}", 0))
            if stats.next_due_at is not None:
                next_run.add_metric([stats.name], stats.next_due_at)
            if stats.last_fired_at is not None:
                last_run.add_metric([stats.name], stats.last_fired_at)
        yield from (runs, next_run, last_run, webhooks)


def serve(board: ProgressBoard, registry: Registry, port: int, addr: str, recent: int = RECENT_BATCHES) -> None:
    """Serve /metrics until the process is stopped."""
    metrics = CollectorRegistry()
    metrics.register(FarmCollector(board, registry, recent))
    start_http_server(port, addr=addr, registry=metrics)
    log.info("farm metrics on http://%s:%d/metrics", addr, port)
    while True:
        time.sleep(3600)
