"""Redis restarted or killed, and S3 gone for 30 s, in the middle of a batch: the batch still completes,
every job once, every object whole; what Redis lost, the scheduler's periodic reconcile sends again."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from infra.stack import EmbeddedStack
from sdfarm.batchfile import BatchPlan, plan_file
from sdfarm.layout import image_key, sidecar_key
from sdfarm.models import Registry
from sdfarm.progress import ProgressBoard
from sdfarm.queue import in_flight, queue_name
from sdfarm.store import Store
from tests.conftest import OUTAGE, WorkerProcess, cli, wait_for
from tests.integration.test_scheduler import Scheduler


@pytest.fixture(scope="module")
def outage_workers(start_worker: Callable[..., WorkerProcess]) -> Iterator[list[WorkerProcess]]:
    workers = [start_worker("outage-a", model=OUTAGE), start_worker("outage-b", model=OUTAGE)]
    yield workers
    for w in workers:
        w.stop()


def write_batch(tmp_path: Path, name: str, count: int, steps: int) -> Path:
    path = tmp_path / f"{name}.yaml"
    items = "".join(f"  - {json.dumps(f'{name} {i}')}\n" for i in range(count))
    path.write_text(f"name: {name}\ndefaults: {{model: {OUTAGE}, width: 64, height: 64, steps: {steps}}}\n"
                    f"items:\n{items}")
    return path


def done_count(board: ProgressBoard, batch_id: str) -> int:
    try:
        p = board.read(batch_id)
    except Exception:  # Redis is down
        return 0
    return p.done if p else 0


def assert_complete_once(store: Store, plan: BatchPlan) -> list[dict[str, object]]:
    keys = list(store.keys("renders/"))
    metas = []
    for job in plan.jobs:
        assert keys.count(image_key(job.id)) == 1
        assert keys.count(sidecar_key(job.id)) == 1
        meta = store.get_json(sidecar_key(job.id))
        assert meta["image"]["sha256"] == hashlib.sha256(store.get(image_key(job.id))).hexdigest()
        metas.append(meta)
    return metas


def test_redis_restart_mid_batch(tmp_path: Path, outage_workers: list[WorkerProcess], stack: EmbeddedStack,
                                 env: dict[str, str], store: Store, board: ProgressBoard,
                                 registry: Registry) -> None:
    path = write_batch(tmp_path, "redis-restart", 24, steps=15)
    plan = plan_file(path, registry, 100)
    assert cli(["submit", str(path)], env).returncode == 0
    wait_for(lambda: done_count(board, plan.batch_id) >= 4, 120, "the batch to be under way")
    stack.stop_redis()  # SIGTERM: Redis writes its AOF and exits
    stack.start_redis()
    restarted_at = time.time()
    watched = cli(["watch", plan.batch_id, "--reconcile-after", "15", "--timeout", "300"], env, timeout_s=360)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    metas = assert_complete_once(store, plan)
    # the workers went on consuming by themselves after the restart
    after = [m for m in metas if m["timings"]["render_started_at"] > restarted_at]  # type: ignore[index]
    assert after, "no job was rendered after Redis came back"
    assert {m["worker"]["hostname"] for m in after} <= {w.hostname for w in outage_workers}  # type: ignore[index]


def test_s3_gone_for_thirty_seconds(tmp_path: Path, outage_workers: list[WorkerProcess], stack: EmbeddedStack,
                                    env: dict[str, str], store: Store, board: ProgressBoard,
                                    registry: Registry) -> None:
    path = write_batch(tmp_path, "s3-outage", 16, steps=15)
    plan = plan_file(path, registry, 100)
    assert cli(["submit", str(path)], env).returncode == 0
    wait_for(lambda: done_count(board, plan.batch_id) >= 4, 120, "the batch to be under way")
    stack.kill_s3()
    down_at = time.time()
    done_while_down = done_count(board, plan.batch_id)
    wait_for(lambda: time.time() - down_at > 30, 40, "30 seconds of outage", interval_s=1)
    # nothing is counted done (acknowledged) while no PUT can succeed
    assert done_count(board, plan.batch_id) <= done_while_down + 2 * 4  # only chunks already past their PUTs
    stack.start_s3()
    watched = cli(["watch", plan.batch_id, "--reconcile-after", "30", "--timeout", "400"], env, timeout_s=450)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert_complete_once(store, plan)


def test_redis_killed_mid_chunk_loses_nothing(tmp_path: Path, outage_workers: list[WorkerProcess],
                                              stack: EmbeddedStack, env: dict[str, str], store: Store,
                                              board: ProgressBoard, registry: Registry) -> None:
    """Redis SIGKILLed while both workers render, back 10 s later: every job is done, with nobody
    running `watch` or `reconcile`. The chunks in hand were waited out in place, not rendered again
    (their renders all began before the kill), and acknowledged (nothing left in flight)."""
    path = write_batch(tmp_path, "redis-killed", 8, steps=60)
    plan = plan_file(path, registry, 100)
    assert cli(["submit", str(path)], env).returncode == 0
    wait_for(lambda: all(w.busy_with() for w in outage_workers), 120, "both workers to render")
    stack.kill_redis()
    killed_at = time.time()
    wait_for(lambda: time.time() - killed_at > 10, 15, "10 s of outage", interval_s=0.5)
    stack.start_redis()
    wait_for(lambda: done_count(board, plan.batch_id) == len(plan.jobs), 120, "every job to be done")
    metas = assert_complete_once(store, plan)
    assert all(m["timings"]["render_started_at"] < killed_at for m in metas)  # type: ignore[index]
    wait_for(lambda: in_flight(board.r, plan.batch_id) is False, 30, "both chunks to be acknowledged")


def test_the_scheduler_reconciles_a_batch_whose_queued_chunk_redis_lost(
        tmp_path: Path, outage_workers: list[WorkerProcess], stack: EmbeddedStack, env: dict[str, str],
        store: Store, board: ProgressBoard, registry: Registry) -> None:
    """Redis SIGKILLed mid-batch comes back without the chunk that was queued (here it is deleted
    first, while both workers hold theirs, and given a second to reach the AOF). Nobody runs
    `watch`: the scheduler finds the batch stalled with nothing queued or in flight and reconciles."""
    scheduler = Scheduler({**env, "SDFARM_SCHEDULER_TICK_S": "1", "SDFARM_RECONCILE_AFTER_S": "3"},
                          tmp_path / "scheduler.log")
    try:
        path = write_batch(tmp_path, "redis-lost", 12, steps=60)
        plan = plan_file(path, registry, 100)
        assert cli(["submit", str(path)], env).returncode == 0
        wait_for(lambda: all(w.busy_with() for w in outage_workers), 120, "both workers to render")
        assert board.r.delete(*board.r.keys(f"{queue_name(OUTAGE)}*")) == 1  # the third chunk: lost
        lost_at = time.monotonic()  # the AOF is fsynced once a second
        wait_for(lambda: time.monotonic() - lost_at > 1.5, 5, "the loss to reach the AOF", interval_s=0.2)
        stack.kill_redis()
        stack.start_redis()
        wait_for(lambda: done_count(board, plan.batch_id) == len(plan.jobs), 120, "the scheduler to reconcile")
        assert f"batch {plan.batch_id}: nothing moved for 3s" in scheduler.text()
        assert "reconciled, 4 of 12 jobs re-enqueued (8 done, 0 failed)" in scheduler.text()
        assert_complete_once(store, plan)
    finally:
        scheduler.stop()
