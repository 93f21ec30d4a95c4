"""Graceful drain with real workers (worker/drain.py): `sdfarm drain` or SIGTERM finishes the chunk in
hand, stores it and exits 0; out of time (SDFARM_DRAIN_TIMEOUT, or a second SIGTERM) the chunk is handed
back to the queue at once, its attempts not spent. Either way every job is done exactly once."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import redis

from sdfarm.batchfile import BatchPlan, plan_file
from sdfarm.models import Registry
from sdfarm.progress import ProgressBoard
from sdfarm.queue import queue_depth
from sdfarm.store import Store
from tests.conftest import DRAIN, WorkerProcess, cli, wait_for
from tests.integration.test_farm import assert_one_png_and_sidecar_per_job, batch_file, finished


def submit(tmp_path: Path, name: str, env: dict[str, str], registry: Registry, jobs: int, chunk: int) -> BatchPlan:
    """`jobs` jobs for the drain tests' model, `chunk` to a chunk, 150 steps each (a 64x64 image takes
    about 0.6 s on one core)."""
    path = batch_file(tmp_path, name, DRAIN, [f"{name} {i}" for i in range(jobs)], steps=150)
    submitted = cli(["submit", str(path)], {**env, "SDFARM_CHUNK_SIZE": str(chunk)})
    assert submitted.returncode == 0, submitted.stderr
    return plan_file(path, registry, 100)


def rescue(start_worker: Callable[..., WorkerProcess], board: ProgressBoard, store: Store, plan: BatchPlan,
           renders: int) -> None:
    """Another worker finishes the batch: every job done once, `renders` of them by it."""
    rescuer = start_worker(f"rescuer-{plan.batch_id[:6]}", model=DRAIN)
    wait_for(lambda: finished(board, plan.batch_id), 240, "the rescuer to finish the batch")
    progress = board.read(plan.batch_id)
    assert progress is not None
    assert (progress.done, progress.failed) == (len(plan.jobs), 0)
    assert_one_png_and_sidecar_per_job(store, plan)
    assert rescuer.tail(10**9).count("outcome=rendered") == renders
    rescuer.stop()


def test_a_drained_worker_finishes_its_chunk_stores_it_and_exits_0(
        tmp_path: Path, start_worker: Callable[..., WorkerProcess], env: dict[str, str], store: Store,
        board: ProgressBoard, registry: Registry, redis_client: redis.Redis) -> None:
    worker = start_worker("drainee", model=DRAIN)
    plan = submit(tmp_path, "drained", env, registry, jobs=16, chunk=4)
    wait_for(worker.busy_with, 60, "the worker to start a chunk", interval_s=0.02)
    drained = cli(["drain", worker.hostname], env)  # a few chunks may finish while the command starts
    assert drained.returncode == 0, drained.stderr
    assert drained.stdout.strip() == "drainee@tests: draining (it finishes the chunk in hand, then exits)"
    assert worker.proc.wait(120) == 0, worker.tail()
    progress = board.read(plan.batch_id)
    assert progress is not None
    waiting = queue_depth(redis_client, DRAIN)
    assert waiting >= 1  # it took no further chunk: they wait for another worker
    assert (progress.done, progress.failed) == (16 - 4 * waiting, 0)  # the chunk in hand finished and stored
    rescue(start_worker, board, store, plan, renders=4 * waiting)
    nobody = cli(["drain", "nobody@nowhere"], env)
    assert nobody.returncode == 2
    assert "error: no worker named 'nobody@nowhere' answered (live workers: " in nobody.stderr


def test_a_drain_out_of_time_hands_the_chunk_back_at_once_without_spending_attempts(
        tmp_path: Path, start_worker: Callable[..., WorkerProcess], env: dict[str, str], store: Store,
        board: ProgressBoard, registry: Registry, redis_client: redis.Redis) -> None:
    worker = start_worker("drain-late", model=DRAIN, extra_env={"SDFARM_DRAIN_TIMEOUT": "1"})
    plan = submit(tmp_path, "late", env, registry, jobs=8, chunk=8)
    wait_for(worker.busy_with, 60, "the worker to start the chunk", interval_s=0.02)
    os.kill(worker.proc.pid, signal.SIGTERM)  # the parent alone, as Kubernetes signals a pod's main process
    assert worker.proc.wait(60) == 0, worker.tail()
    log = worker.tail(10**9)
    assert "draining: the drain timeout passed; a chunk still in hand is handed back (1 pool process told)" in log
    assert "handing the chunk back unacknowledged: the worker is draining and its time is up" in log
    assert queue_depth(redis_client, DRAIN) == 1  # back in the queue at once, not after the visibility timeout
    progress = board.read(plan.batch_id)
    assert progress is not None
    assert (progress.done, progress.failed) == (0, 0)
    assert set(redis_client.hvals(f"sdfarm:batch:{plan.batch_id}:attempts")) <= {b"0"}  # a drain is no death
    rescue(start_worker, board, store, plan, renders=8)


def test_a_second_sigterm_hands_the_chunk_back_now(
        tmp_path: Path, start_worker: Callable[..., WorkerProcess], env: dict[str, str], store: Store,
        board: ProgressBoard, registry: Registry, redis_client: redis.Redis) -> None:
    worker = start_worker("drain-twice", model=DRAIN)  # the default timeout: minutes
    plan = submit(tmp_path, "twice", env, registry, jobs=8, chunk=8)
    wait_for(worker.busy_with, 60, "the worker to start the chunk", interval_s=0.02)
    os.kill(worker.proc.pid, signal.SIGTERM)
    wait_for(lambda: "draining: the chunk in hand is finished" in worker.tail(), 10, "the drain to begin")
    os.kill(worker.proc.pid, signal.SIGTERM)
    assert worker.proc.wait(60) == 0, worker.tail()
    log = worker.tail(10**9)
    assert "draining: a second SIGTERM; a chunk still in hand is handed back (1 pool process told)" in log
    assert queue_depth(redis_client, DRAIN) == 1
    rescue(start_worker, board, store, plan, renders=8)
