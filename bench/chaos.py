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
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from infra.stack import EmbeddedStack  # noqa: E402
from producer.control import reconcile  # noqa: E402
from producer.submit import submit_plan  # noqa: E402
from sdfarm.batchfile import plan_batch  # noqa: E402
from sdfarm.layout import image_key, sidecar_key  # noqa: E402
from sdfarm.models import Registry  # noqa: E402
from sdfarm.progress import ProgressBoard  # noqa: E402
from sdfarm.queue import in_flight, make_celery, queue_depth  # noqa: E402
from sdfarm.settings import Settings  # noqa: E402
from sdfarm.store import Store  # noqa: E402


def emit(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--chunk", type=int, default=8)
    args = ap.parse_args()

    from worker.tiny import write_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="sdfarm-chaos-"))
    write_tiny_model(tmp / "tiny")
    (tmp / "models.yaml").write_text("models:\n  tiny-sd15:\n    path: tiny\n")
    stack = EmbeddedStack(tmp / "stack")
    info = stack.start()
    env = {**os.environ, **info.env(), "SDFARM_MODELS_FILE": str(tmp / "models.yaml"),
           "SDFARM_CACHE_DIR": str(tmp / "cache"), "SDFARM_CHUNK_SIZE": str(args.chunk),
           "SDFARM_VISIBILITY_TIMEOUT": "30", "SDFARM_UNACKED_RESTORE_INTERVAL": "2",
           "SDFARM_RETRY_BACKOFF_S": "1", "SDFARM_RETRY_BACKOFF_MAX_S": "10", "SDFARM_UPLOAD_THREADS": "8"}
    settings = Settings.from_env(env)
    registry = Registry.from_settings(settings)
    store, board = Store.from_settings(settings), ProgressBoard.from_url(info.redis_url, 3600)
    app = make_celery(settings)
    r = redis.Redis.from_url(info.redis_url)
    logs = tmp / "logs"
    logs.mkdir()
    workers: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str) -> None:
        with (logs / f"{name}.log").open("wb") as out:
            workers[name] = subprocess.Popen(
                [sys.executable, "-m", "producer", "worker", "--model", "tiny-sd15", "--device", "cpu",
                 "--hostname", f"{name}@chaos"], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

    def done() -> int:
        try:
            p = board.read(plan.batch_id)
        except redis.exceptions.ConnectionError:
            return -1
        return p.done + p.failed if p else 0

    try:
        per_item = 1000
        items = "".join(f"  - {{prompt: 'chaos {i}', count: {min(per_item, args.jobs - i)}}}\n"
                        for i in range(0, args.jobs, per_item))
        text = f"name: chaos\ndefaults: {{model: tiny-sd15, width: 64, height: 64, steps: 1}}\nitems:\n{items}"
        plan = plan_batch(text, "chaos.yaml", "yaml", registry, args.jobs)
        base = int(r.info("memory")["used_memory"])
        t0 = time.perf_counter()
        result = submit_plan(plan, store, app, board, args.chunk)
        queued = int(r.info("memory")["used_memory"])
        emit(stage="submitted", jobs=args.jobs, chunks=result.chunks_enqueued,
             submit_s=round(time.perf_counter() - t0, 2),
             redis_bytes_per_queued_job=round((queued - base) / args.jobs, 1))
        start("w0")
        start("w1")
        killed = restarted = False
        last, last_change = 0, time.monotonic()
        while True:
            n = done()
            if n >= args.jobs:
                break
            if n != last and n >= 0:
                last, last_change = n, time.monotonic()
            if not killed and n >= args.jobs * 0.3:
                os.killpg(workers["w0"].pid, signal.SIGKILL)
                workers["w0"].wait()
                start("w2")
                killed = True
                emit(stage="killed_worker", at_done=n, t=round(time.perf_counter() - t0, 1))
            if killed and not restarted and n >= args.jobs * 0.6:
                stack.stop_redis()
                stack.start_redis()
                restarted = True
                emit(stage="restarted_redis", at_done=n, t=round(time.perf_counter() - t0, 1))
            if (time.monotonic() - last_change > 45 and queue_depth(r, "tiny-sd15") == 0
                    and in_flight(r, plan.batch_id) is False):
                rec = reconcile(store, board, app, plan.batch_id, args.chunk)
                emit(stage="reconcile", enqueued=rec.enqueued_jobs, done=rec.done)
                last_change = time.monotonic()
            time.sleep(0.5)
        wall = time.perf_counter() - t0

        keys = collections.Counter(store.keys("renders/"))
        with ThreadPoolExecutor(16) as pool:
            def check(job_id: str) -> tuple[bool, bool]:
                if keys[sidecar_key(job_id)] == 0 or keys[image_key(job_id)] == 0:
                    return False, False
                meta = store.get_json(sidecar_key(job_id))
                return True, meta["image"]["sha256"] == hashlib.sha256(store.get(image_key(job_id))).hexdigest()
            checks = list(pool.map(check, [j.id for j in plan.jobs]))
        rendered: collections.Counter[str] = collections.Counter()
        for log in logs.glob("*.log"):
            for m in re.finditer(r"job=([0-9a-f]{32}) .*outcome=(rendered|rendered-existing) ", log.read_text()):
                rendered[m.group(1)] += 1
        emit(stage="result", jobs=args.jobs, wall_s=round(wall, 1), images_per_s=round(args.jobs / wall, 1),
             jobs_lost=sum(1 for ok, _ in checks if not ok),
             duplicate_objects=sum(c - 1 for c in keys.values() if c > 1),
             sha_mismatches=sum(1 for ok, same in checks if ok and not same),
             jobs_rendered_more_than_once=sum(1 for c in rendered.values() if c > 1),
             redis_bytes_per_queued_job=round((queued - base) / args.jobs, 1))
    finally:
        for w in workers.values():
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGKILL)
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
