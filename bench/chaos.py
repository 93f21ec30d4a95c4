"""10,000 jobs through two workers, one worker SIGKILLed and replaced midway, Redis restarted once,
and (on a Sentinel group, the default) the Redis master SIGKILLed so that the sentinels fail over.

    .venv/bin/python bench/chaos.py [--jobs 10000] [--chunk 8] [--redis sentinel|single]

Stages, by jobs done: 30% SIGKILL worker w0 and start w2; 55% restart Redis (SIGTERM, start again:
on a Sentinel group, the master); 80%, Sentinel only: SIGKILL the master, wait until a replica is
promoted, then start the killed node again (the sentinels make it a replica).

Reports: jobs lost (must be 0), duplicate objects (must be 0), sidecars whose sha256 does not match
their PNG (must be 0), jobs rendered more than once (wasted work, allowed), wall time, and Redis
memory per queued job (measured after enqueueing, before any worker starts). The tiny model at its
smallest size and fewest steps: this measures the farm's machinery, not a GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import MODEL, Farm, check_outputs, emit, start_farm
from producer.control import reconcile
from producer.submit import submit_plan
from sdfarm.batchfile import BatchPlan, plan_batch
from sdfarm.models import Registry
from sdfarm.queue import in_flight, queue_depth


def chaos_plan(jobs: int, registry: Registry) -> BatchPlan:
    """`jobs` jobs of the tiny model at its smallest size and fewest steps, 1,000 to an item."""
    per_item = 1000
    items = "".join(f"  - {{prompt: 'chaos {i}', count: {min(per_item, jobs - i)}}}\n"
                    for i in range(0, jobs, per_item))
    text = f"name: chaos\ndefaults: {{model: {MODEL}, width: 64, height: 64, steps: 1}}\nitems:\n{items}"
    return plan_batch(text, "chaos.yaml", "yaml", registry, jobs)


def restart_redis(farm: Farm) -> None:
    if farm.group is None:
        farm.stack.stop_redis()
        farm.stack.start_redis()
        return
    port = farm.group.master_port()
    farm.group.stop_node(port)
    farm.group.start_node(port)


def fail_over(farm: Farm, t0: float, n: int) -> None:
    assert farm.group is not None
    killed_at = time.perf_counter()
    old = farm.group.kill_master()
    new = farm.group.wait_failover(old)
    promoted_s = time.perf_counter() - killed_at
    farm.group.start_node(old)
    emit(stage="failed_over", at_done=n, t=round(time.perf_counter() - t0, 1), old_master=old, new_master=new,
         promoted_after_s=round(promoted_s, 1))


def run_through_chaos(farm: Farm, plan: BatchPlan, jobs: int, chunk: int, t0: float) -> None:
    """Wait until every job is done or failed: at 30% SIGKILL worker w0 and start w2 in its place, at
    55% restart Redis, at 80% (a Sentinel group) SIGKILL its master, and reconcile whenever progress
    has stalled for 45 s with nothing queued."""
    killed = restarted = failed_over = False
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
        if killed and not restarted and n >= jobs * 0.55:
            restart_redis(farm)
            restarted = True
            emit(stage="restarted_redis", at_done=n, t=round(time.perf_counter() - t0, 1))
        if farm.group is not None and restarted and not failed_over and n >= jobs * 0.8:
            fail_over(farm, t0, n)
            failed_over = True
        if (time.monotonic() - last_change > 45 and queue_depth(farm.redis, MODEL) == 0
                and in_flight(farm.redis, plan.batch_id) is False):
            rec = reconcile(farm.store, farm.board, farm.app, plan.batch_id, chunk)
            emit(stage="reconcile", enqueued=rec.enqueued_jobs, done=rec.done)
            last_change = time.monotonic()
        time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--redis", choices=("sentinel", "single"), default="sentinel",
                    help="a Sentinel group (primary, replica, three sentinels) or one Redis server")
    args = ap.parse_args()

    farm = start_farm(Path(tempfile.mkdtemp(prefix="sdfarm-chaos-")), args.chunk, sentinel=args.redis == "sentinel")
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
        outputs = check_outputs(farm.store, plan)
        emit(stage="result", jobs=args.jobs, wall_s=round(wall, 1), images_per_s=round(args.jobs / wall, 1),
             jobs_lost=len(outputs.missing), duplicate_objects=outputs.duplicate_objects,
             sha_mismatches=len(outputs.mismatched),
             jobs_rendered_more_than_once=sum(1 for c in farm.renders().values() if c > 1),
             redis_bytes_per_queued_job=round((queued - base) / args.jobs, 1))
    finally:
        farm.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
