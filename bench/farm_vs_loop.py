"""Farm throughput against a bare loop over the same pipeline, and submit/queue costs (CPU figures).

    .venv/bin/python bench/farm_vs_loop.py [--jobs 64] [--workers 1] [--submit-jobs 100000]

What it measures, on the tiny random-weight SD1.5-architecture model (64x64, 8 steps):
1. bare loop: the same pipeline in this process, 1 image per call and CHUNK images per call;
2. farm: `sdfarm submit` of the same number of jobs -> PNG + sidecar in S3, with W real worker
   processes on the embedded stack; end-to-end images/s and the farm's added seconds per job;
3. submit: planning + enqueueing a large batch (to a model no worker serves), jobs/s, and Redis
   memory per queued job (INFO used_memory before/after).
Prints one JSON line per figure. Ratios from one run are what to report; these machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from infra.stack import EmbeddedStack  # noqa: E402
from producer.submit import submit_plan  # noqa: E402
from sdfarm.batchfile import plan_batch  # noqa: E402
from sdfarm.models import Registry  # noqa: E402
from sdfarm.progress import ProgressBoard  # noqa: E402
from sdfarm.queue import make_celery  # noqa: E402
from sdfarm.settings import Settings  # noqa: E402
from sdfarm.store import Store  # noqa: E402


def emit(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def batch_text(model: str, n: int, tag: str) -> str:
    items = "".join(f"  - {{prompt: 'bench {tag} image {i}', count: {min(10_000, n - i)}}}\n"
                    for i in range(0, n, 10_000))
    return (f"name: bench-{tag}\nseed: {int(time.time())}\n"
            f"defaults: {{model: {model}, width: 64, height: 64, steps: 8}}\nitems:\n{items}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--submit-jobs", type=int, default=100_000)
    args = ap.parse_args()

    from worker.pipeline import load_model
    from worker.render import render
    from worker.testing import write_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="sdfarm-bench-"))
    write_tiny_model(tmp / "tiny")
    (tmp / "models.yaml").write_text("models:\n  tiny-sd15:\n    path: tiny\n  idle:\n    path: tiny\n")
    base = Settings(models_file=tmp / "models.yaml", cache_dir=tmp / "cache", chunk_size=args.chunk)
    registry = Registry.from_settings(base)

    # 1. bare loop over the same pipeline and the same render code
    loaded = load_model(registry, "tiny-sd15", "cpu")
    plan = plan_batch(batch_text("tiny-sd15", args.jobs, "loop"), "loop.yaml", "yaml", registry, 10**6)
    jobs = list(plan.jobs)
    for per_call in (1, args.chunk):
        t = time.perf_counter()
        for i in range(0, len(jobs), per_call):
            render(loaded, jobs[i:i + per_call])
        dt = time.perf_counter() - t
        emit(stage="bare_loop", images_per_call=per_call, images=len(jobs), s=round(dt, 3),
             images_per_s=round(len(jobs) / dt, 2))
    loop_ips = len(jobs) / dt
    del loaded

    stack = EmbeddedStack(tmp / "stack")
    info = stack.start()
    env = {**os.environ, **info.env(), "SDFARM_MODELS_FILE": str(tmp / "models.yaml"),
           "SDFARM_CACHE_DIR": str(tmp / "cache"), "SDFARM_CHUNK_SIZE": str(args.chunk)}
    settings = Settings.from_env(env)
    r = redis.Redis.from_url(info.redis_url)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        # 2. the farm, end to end
        for n in range(args.workers):
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "producer", "worker", "--model", "tiny-sd15", "--device", "cpu",
                 "--hostname", f"bench-{n}@local"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True))
        while sum(1 for _ in r.scan_iter("sdfarm:worker:bench-*")) < args.workers:
            time.sleep(0.2)
        store, board = Store.from_settings(settings), ProgressBoard(redis.Redis.from_url(info.redis_url), 3600)
        app = make_celery(settings)
        plan = plan_batch(batch_text("tiny-sd15", args.jobs, "farm"), "farm.yaml", "yaml", registry, 10**6)
        t = time.perf_counter()
        submit_plan(plan, store, app, board, args.chunk)
        while not (p := board.read(plan.batch_id)) or not p.finished:
            time.sleep(0.05)
        dt = time.perf_counter() - t
        farm_ips = args.jobs / dt
        emit(stage="farm_end_to_end", workers=args.workers, chunk=args.chunk, images=args.jobs, s=round(dt, 3),
             images_per_s=round(farm_ips, 2), ratio_vs_bare_loop_chunked=round(farm_ips / loop_ips, 3),
             added_s_per_job=round(dt / args.jobs - 1 / loop_ips / args.workers, 4))

        # 3. submitting a large batch: rate and Redis memory per queued job
        for w in workers:
            os.killpg(w.pid, signal.SIGTERM)
        for w in workers:
            w.wait(60)
        workers.clear()
        before = int(r.info("memory")["used_memory"])
        t = time.perf_counter()
        big = plan_batch(batch_text("idle", args.submit_jobs, "submit"), "big.yaml", "yaml", registry, 10**7)
        t_plan = time.perf_counter() - t
        result = submit_plan(big, store, app, board, args.chunk)
        dt = time.perf_counter() - t
        after = int(r.info("memory")["used_memory"])
        emit(stage="submit", jobs=args.submit_jobs, chunks=result.chunks_enqueued, plan_s=round(t_plan, 2),
             total_s=round(dt, 2), jobs_per_s=round(args.submit_jobs / dt), redis_bytes=after - before,
             redis_bytes_per_queued_job=round((after - before) / args.submit_jobs, 1))
    finally:
        for w in workers:
            os.killpg(w.pid, signal.SIGKILL)
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
