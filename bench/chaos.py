"""10,000 jobs through two workers, one worker SIGKILLed and replaced midway, Redis restarted once.

    .venv/bin/python bench/chaos.py [--jobs 10000] [--chunk 8]

Reports: jobs lost (must be 0), duplicate objects (must be 0), sidecars whose sha256 does not match
their PNG (must be 0), jobs rendered more than once (wasted work, allowed), wall time, and Redis
memory per queued job (measured after enqueueing, before any worker starts). The tiny model at its
smallest size and fewest steps: this measures the farm's machinery, not a GPU.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import redis
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from infra.stack import EmbeddedStack  # noqa: E402
from producer.control import reconcile  # noqa: E402
from producer.submit import submit_plan  # noqa: E402
from sdfarm.batchfile import BatchPlan, plan_batch  # noqa: E402
from sdfarm.layout import image_key, sidecar_key  # noqa: E402
from sdfarm.models import Registry  # noqa: E402
from sdfarm.progress import ProgressBoard  # noqa: E402
from sdfarm.queue import in_flight, make_celery, queue_depth  # noqa: E402
from sdfarm.settings import Settings  # noqa: E402
from sdfarm.store import Store  # noqa: E402


def emit(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


@dataclass
class Farm:
    """The farm under test: the embedded stack, its clients, the worker processes and their logs."""

    stack: EmbeddedStack
    env: dict[str, str]
    registry: Registry
    store: Store
    board: ProgressBoard
    app: Celery
    redis: redis.Redis
    logs: Path
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start_worker(self, name: str) -> None:
        with (self.logs / f"{name}.log").open("wb") as out:
            self.workers[name] = subprocess.Popen(
                [sys.executable, "-m", "producer", "worker", "--model", "tiny-sd15", "--device", "cpu",
                 "--hostname", f"{name}@chaos"], env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

    def kill_worker(self, name: str) -> None:
        os.killpg(self.workers[name].pid, signal.SIGKILL)
        self.workers[name].wait()

    def done(self, batch_id: str) -> int:
        """Jobs done or failed so far; -1 while Redis is down."""
        try:
            p = self.board.read(batch_id)
        except redis.exceptions.ConnectionError:
            return -1
        return p.done + p.failed if p else 0

    def redis_memory(self) -> int:
        return int(self.redis.info("memory")["used_memory"])

    def stop(self) -> None:
        for w in self.workers.values():
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGKILL)
        self.stack.stop()


def start_farm(tmp: Path, chunk: int) -> Farm:
    """The tiny model and its registry under tmp, a started embedded stack, and no worker yet."""
    from worker.testing import write_tiny_model

    write_tiny_model(tmp / "tiny")
    (tmp / "models.yaml").write_text("models:\n  tiny-sd15:\n    path: tiny\n")
    stack = EmbeddedStack(tmp / "stack")
    info = stack.start()
    env = {**os.environ, **info.env(), "SDFARM_MODELS_FILE": str(tmp / "models.yaml"),
           "SDFARM_CACHE_DIR": str(tmp / "cache"), "SDFARM_CHUNK_SIZE": str(chunk),
           "SDFARM_VISIBILITY_TIMEOUT": "30", "SDFARM_UNACKED_RESTORE_INTERVAL": "2",
           "SDFARM_RETRY_BACKOFF_S": "1", "SDFARM_RETRY_BACKOFF_MAX_S": "10", "SDFARM_UPLOAD_THREADS": "8"}
    settings = Settings.from_env(env)
    logs = tmp / "logs"
    logs.mkdir()
    return Farm(stack=stack, env=env, registry=Registry.from_settings(settings), store=Store.from_settings(settings),
                board=ProgressBoard.from_url(info.redis_url, 3600), app=make_celery(settings),
                redis=redis.Redis.from_url(info.redis_url), logs=logs)


def chaos_plan(jobs: int, registry: Registry) -> BatchPlan:
    """`jobs` jobs of the tiny model at its smallest size and fewest steps, 1,000 to an item."""
    per_item = 1000
    items = "".join(f"  - {{prompt: 'chaos {i}', count: {min(per_item, jobs - i)}}}\n"
                    for i in range(0, jobs, per_item))
    text = f"name: chaos\ndefaults: {{model: tiny-sd15, width: 64, height: 64, steps: 1}}\nitems:\n{items}"
    return plan_batch(text, "chaos.yaml", "yaml", registry, jobs)


def run_through_chaos(farm: Farm, plan: BatchPlan, jobs: int, chunk: int, t0: float) -> None:
    """Wait until every job is done or failed: at 30% SIGKILL worker w0 and start w2 in its place, at
    60% restart Redis, and reconcile whenever progress has stalled for 45 s with nothing queued."""
    killed = restarted = False
    last, last_change = 0, time.monotonic()
    while True:
        n = farm.done(plan.batch_id)
        if n >= jobs:
            return
        if n != last and n >= 0:
            last, last_change = n, time.monotonic()
        if not killed and n >= jobs * 0.3:
            farm.kill_worker("w0")
            farm.start_worker("w2")
            killed = True
            emit(stage="killed_worker", at_done=n, t=round(time.perf_counter() - t0, 1))
        if killed and not restarted and n >= jobs * 0.6:
            farm.stack.stop_redis()
            farm.stack.start_redis()
            restarted = True
            emit(stage="restarted_redis", at_done=n, t=round(time.perf_counter() - t0, 1))
        if (time.monotonic() - last_change > 45 and queue_depth(farm.redis, "tiny-sd15") == 0
                and in_flight(farm.redis, plan.batch_id) is False):
            rec = reconcile(farm.store, farm.board, farm.app, plan.batch_id, chunk)
            emit(stage="reconcile", enqueued=rec.enqueued_jobs, done=rec.done)
            last_change = time.monotonic()
        time.sleep(0.5)


def check_outputs(farm: Farm, plan: BatchPlan) -> dict[str, int]:
    """What the bucket and the worker logs hold: lost jobs, duplicate objects, sidecars whose sha256
    is not their PNG's, and jobs rendered more than once."""
    keys = collections.Counter(farm.store.keys("renders/"))
    with ThreadPoolExecutor(16) as pool:
        def check(job_id: str) -> tuple[bool, bool]:
            if keys[sidecar_key(job_id)] == 0 or keys[image_key(job_id)] == 0:
                return False, False
            meta = farm.store.get_json(sidecar_key(job_id))
            return True, meta["image"]["sha256"] == hashlib.sha256(farm.store.get(image_key(job_id))).hexdigest()
        checks = list(pool.map(check, [j.id for j in plan.jobs]))
    rendered: collections.Counter[str] = collections.Counter()
    for log in farm.logs.glob("*.log"):
        for m in re.finditer(r"job=([0-9a-f]{32}) .*outcome=(rendered|rendered-existing) ", log.read_text()):
            rendered[m.group(1)] += 1
    return {"jobs_lost": sum(1 for ok, _ in checks if not ok),
            "duplicate_objects": sum(c - 1 for c in keys.values() if c > 1),
            "sha_mismatches": sum(1 for ok, same in checks if ok and not same),
            "jobs_rendered_more_than_once": sum(1 for c in rendered.values() if c > 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--chunk", type=int, default=8)
    args = ap.parse_args()

    farm = start_farm(Path(tempfile.mkdtemp(prefix="sdfarm-chaos-")), args.chunk)
    try:
        plan = chaos_plan(args.jobs, farm.registry)
        base = farm.redis_memory()
        t0 = time.perf_counter()
        result = submit_plan(plan, farm.store, farm.app, farm.board, args.chunk)
        queued = farm.redis_memory()
        emit(stage="submitted", jobs=args.jobs, chunks=result.chunks_enqueued,
             submit_s=round(time.perf_counter() - t0, 2),
             redis_bytes_per_queued_job=round((queued - base) / args.jobs, 1))
        farm.start_worker("w0")
        farm.start_worker("w1")
        run_through_chaos(farm, plan, args.jobs, args.chunk, t0)
        wall = time.perf_counter() - t0
        emit(stage="result", jobs=args.jobs, wall_s=round(wall, 1), images_per_s=round(args.jobs / wall, 1),
             **check_outputs(farm, plan), redis_bytes_per_queued_job=round((queued - base) / args.jobs, 1))
    finally:
        farm.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
