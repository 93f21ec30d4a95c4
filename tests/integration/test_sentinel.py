"""Redis that fails over (issue 12, item 7): a primary, a replica and three sentinels, real
`redis-server` processes. The primary is SIGKILLed mid-batch; the sentinels promote the replica, and
the workers, a running `watch` and the producer's clients find the new master by themselves."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from infra.sentinel import SentinelGroup
from sdfarm.batchfile import plan_file
from sdfarm.models import Registry
from sdfarm.progress import ProgressBoard
from sdfarm.queue import in_flight
from sdfarm.settings import Settings
from sdfarm.store import Store
from tests.conftest import OUTAGE, ROOT, WorkerProcess, cli, renders, start_services, wait_for
from tests.integration.test_outages import assert_complete_once, done_count, write_batch


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    g = SentinelGroup(tmp_path_factory.mktemp("sentinel"))
    start_services("Redis group", g.start, g.stop)
    yield g
    g.stop()


def test_a_sentinel_failover_mid_batch_loses_nothing_and_renders_nothing_twice(
        tmp_path: Path, group: SentinelGroup, env: dict[str, str], store: Store, registry: Registry,
        start_worker: Callable[..., WorkerProcess]) -> None:
    farm_env = {**env, **group.env()}
    board = ProgressBoard.from_settings(Settings.from_env(farm_env))
    assert board.r.connection_pool.connection_kwargs.get("port") is None  # a sentinel-managed pool
    path = write_batch(tmp_path, "failover", 32, steps=40)
    plan = plan_file(path, registry, 100)
    submitted = cli(["submit", str(path)], farm_env)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    watch_log = tmp_path / "watch.log"
    with watch_log.open("wb") as out:  # a watch started before the failover, never restarted
        watcher = subprocess.Popen([sys.executable, "-m", "producer", "watch", plan.batch_id, "--timeout", "300",
                                    "--reconcile-after", "600"], env={**os.environ, **farm_env}, cwd=ROOT,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "watching batch" in watch_log.read_text(errors="replace"), 60, "the watch to read the batch")
        workers = [start_worker(name, model=OUTAGE, extra_env=group.env(), wait=False, client=board.r)
                   for name in ("sentinel-a", "sentinel-b")]
        for w in workers:
            wait_for(w.ready, 180, f"worker {w.hostname} to start on the Redis group")
        wait_for(lambda: done_count(board, plan.batch_id) >= 4, 120, "the batch to be under way")
        assert done_count(board, plan.batch_id) <= len(plan.jobs) // 2
        old = group.kill_master()
        killed_at = time.time()
        new = group.wait_failover(old)
        assert new != old
        assert watcher.wait(320) == 0, watch_log.read_text(errors="replace")
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert f"all {len(plan.jobs)} jobs done" in watch_log.read_text(errors="replace")
    metas = assert_complete_once(store, plan)  # one PNG and one sidecar a job, whole
    after = {m["worker"]["hostname"] for m in metas if m["timings"]["render_started_at"] > killed_at}  # type: ignore[index]
    assert after == {w.hostname for w in workers}, "both workers go on rendering after the failover"
    assert all(w.proc.poll() is None for w in workers), "the workers reconnected in place, not restarted"
    rendered = renders(workers, [job.id for job in plan.jobs])
    assert set(rendered.values()) == {1}, "every job rendered once, none again after the failover"
    progress = board.read(plan.batch_id)
    assert progress is not None
    assert (progress.done, progress.failed, progress.rendered) == (len(plan.jobs), 0, len(plan.jobs))
    wait_for(lambda: in_flight(board.r, plan.batch_id) is False, 30, "every chunk to be acknowledged")
    assert {b.hostname for b in board.workers().live()} >= {w.hostname for w in workers}
    for w in workers:
        w.stop()
    for text in [*(w.log.read_text(errors="replace") for w in workers), watch_log.read_text(errors="replace")]:
        assert group.password not in text
