"""`sdfarm submit` of a very large batch, end to end (CPU figures, no GPU or worker needed).

    .venv/bin/python bench/submit_scale.py [--jobs 1000000] [--chunk 8] [--distinct]

Starts the embedded stack (real Redis + real S3), writes a batch file of N jobs (items of 10,000
seeds each; with --distinct a .txt file of N different prompts, so that every job is validated in
full) for a registered model that no worker serves, and runs the real command line,
`python -m producer submit FILE`, in a fresh process: parse, plan, validate, record in S3, enqueue.
A watcher process polls S3 for the batch's jobs.jsonl and Redis for the model's queue, to tell
whether the record was in S3 before the first message was queued.

Prints one JSON line per figure: jobs, seconds, jobs/s, the producer's peak RSS, Redis bytes per
queued job (INFO used_memory before and after), and whether the record preceded the first
message. Targets (issue 9): 1,000,000 jobs in <= 60 s, peak RSS <= 1 GiB, <= 450 B per job.
These machines are shared and noisy: the load average at start and end is printed too.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from infra.stack import EmbeddedStack, StackInfo  # noqa: E402
from sdfarm.queue import queue_depth  # noqa: E402
from sdfarm.settings import Settings  # noqa: E402
from sdfarm.store import Store  # noqa: E402

MODEL = "idle"  # registered by hub id and revision (no files); no worker serves it


def emit(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def batch_text(n: int, seed: int) -> str:
    """The batch bench/farm_vs_loop.py submits (items of 10,000 seeds), so the figures compare."""
    items = "".join(f"  - {{prompt: 'bench submit image {i}', count: {min(10_000, n - i)}}}\n"
                    for i in range(0, n, 10_000))
    return (f"name: bench-submit\nseed: {seed}\n"
            f"defaults: {{model: {MODEL}, width: 64, height: 64, steps: 8}}\nitems:\n{items}")


def watch(info: dict[str, Any], out: Any, stop: Any) -> None:
    """In its own process: when the jobs.jsonl object and the first message first appear.

    Each round looks at Redis first, then S3; the record counts as first only when S3 had it in a
    round before the one that saw a message (a message and a record first seen in the same round
    count as not proven)."""
    settings = Settings.from_env(info)
    store = Store.from_settings(settings)
    r = redis.Redis.from_url(settings.redis_url.get_secret_value())
    record_round = message_round = None
    n = 0
    while not stop.is_set() and message_round is None:
        n += 1
        if queue_depth(r, MODEL) > 0:
            message_round = n
            out.put(("message", time.time()))
        if record_round is None and any(k.endswith("/jobs.jsonl") for k in store.keys("batches/")):
            record_round = n
            out.put(("record", time.time()))
        time.sleep(0.01)
    out.put(("rounds", (record_round, message_round)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1_000_000)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--distinct", action="store_true", help="N different prompts, one job each (a .txt batch)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sdfarm-submit-scale-"))
    registry = tmp / "models.yaml"
    registry.write_text(f"models:\n  {MODEL}: {{hub: bench/idle, revision: '0123456789abcdef'}}\n")
    if args.distinct:
        batch = tmp / "big.txt"
        batch.write_text("".join(f"bench submit image {i}\n" for i in range(args.jobs)))
        flags = ["--model", MODEL, "--set", "width=64", "--set", "height=64", "--set", "steps=8"]
    else:
        batch = tmp / "big.yaml"
        batch.write_text(batch_text(args.jobs, int(time.time())))
        flags = []
    stack = EmbeddedStack(tmp / "stack")
    info: StackInfo = stack.start()
    env = {**os.environ, **info.env(), "SDFARM_MODELS_FILE": str(registry), "SDFARM_CACHE_DIR": str(tmp / "cache"),
           "SDFARM_CHUNK_SIZE": str(args.chunk)}
    if args.jobs > Settings.model_fields["max_jobs_per_batch"].default:  # the default allows a million
        env["SDFARM_MAX_JOBS_PER_BATCH"] = str(args.jobs)
    r = redis.Redis.from_url(info.redis_url)
    ctx = mp.get_context("spawn")
    events, stop = ctx.Queue(), ctx.Event()
    watcher = ctx.Process(target=watch, args=(info.env(), events, stop), daemon=True)
    try:
        watcher.start()
        emit(figure="load_average_at_start", value=os.getloadavg()[0])
        before = int(r.info("memory")["used_memory"])
        t = time.time()
        with (tmp / "stdout").open("w") as out, (tmp / "stderr").open("w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "producer", "submit", str(batch), *flags], env=env,
                                    cwd=ROOT, stdout=out, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage: its peak RSS
        seconds = time.time() - t
        stdout, stderr = (tmp / "stdout").read_text(), (tmp / "stderr").read_text()
        if os.waitstatus_to_exitcode(status) != 0:
            emit(error="submit failed", returncode=os.waitstatus_to_exitcode(status), stderr=stderr[-3000:])
            return 1
        peak_kib = usage.ru_maxrss
        after = int(r.info("memory")["used_memory"])
        stop.set()
        watcher.join(30)
        seen: dict[str, Any] = {}
        while not events.empty():
            what, value = events.get()
            seen[what] = value
        match = re.search(r"(\d+) chunks enqueued, (\d+) already done", stdout)
        chunks, done = (int(match.group(1)), int(match.group(2))) if match else (None, None)
        queued = args.jobs - (done or 0)
        record_round, message_round = seen.get("rounds", (None, None))
        emit(figure="jobs", value=args.jobs, chunk=args.chunk, chunks=chunks, queued=queued,
             batch="distinct prompts (.txt)" if args.distinct else "items of 10,000 seeds (.yaml)")
        emit(figure="seconds", value=round(seconds, 2), target=60, note="python -m producer submit, start to exit")
        emit(figure="jobs_per_s", value=round(args.jobs / seconds))
        emit(figure="producer_peak_rss_mib", value=round(peak_kib / 1024, 1), target=1024)
        emit(figure="redis_bytes_per_queued_job", value=round((after - before) / max(queued, 1), 1), target=450,
             redis_bytes=after - before)
        emit(figure="record_before_first_message",
             value=record_round is not None and message_round is not None and record_round < message_round,
             record_seen_s=round(seen["record"] - t, 2) if "record" in seen else None,
             first_message_seen_s=round(seen["message"] - t, 2) if "message" in seen else None)
        emit(figure="load_average_at_end", value=os.getloadavg()[0])
        emit(figure="stdout", value=stdout.strip()[-300:])
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.terminate()
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # a million jobs leave ~1 GB of Redis AOF and S3 data
    return 0


if __name__ == "__main__":
    sys.exit(main())
