"""The A1111-compatible API's own time on a txt2img call, under concurrent callers: the embedded stack,
real CPU workers of the tiny model, a real `sdfarm serve`, and callers posting /sdapi/v1/txt2img
(one image each, a random seed) as fast as they are answered.

    .venv/bin/python bench/a1111_overhead.py [--callers 1,32] [--calls 8] [--workers 2] [--steps 2]

Per call, from the caller's clock and the batch's own records (the sidecar's timings, the time its
chunk was enqueued; one machine, one clock):
- response_s: the call, as the caller sees it, the JSON answer read whole;
- beyond_render_s: response_s less the render the sidecar records (chunk_render_s, one image a chunk);
  this includes the wait for a free worker, which grows with callers per worker;
- queue_s: from the chunk's enqueue to the start of its render (the farm's capacity, not the API);
- worker_s: the render, PNG encoding and upload (sidecar: chunk_render_s + encode_s + upload_s);
- api_s: the API's own time: before the enqueue (validation, planning, the batch's record in S3 and
  Redis, the message) plus after the sidecar is written (the poll that sees it, the PNG read back,
  base64, the answer) = response_s - queue_s - worker_s.
Reported as p50, p95, p99 and max for each number of callers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import MODEL, ROOT, Farm, emit, start_farm
from producer.control import read_batch_jobs
from sdfarm.layout import sidecar_key

TOKEN = "bench-token-" + "c" * 20


def start_api(farm: Farm) -> str:
    """`sdfarm serve` on a free loopback port, a token for the bench; returns its URL once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**farm.env, "SDFARM_API_TOKENS": f"bench:{TOKEN}", "SDFARM_API_MAX_CONCURRENT": "256"}
    with (farm.logs / "serve.log").open("ab") as out:
        farm.others.append(subprocess.Popen([sys.executable, "-m", "producer", "serve", "--port", str(port),
                                             "--loglevel", "warning"], env=env, cwd=ROOT, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                return url
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"sdfarm serve did not answer; see {farm.logs}/serve.log")


def call(session: requests.Session, url: str, steps: int) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": steps,
                            "seed": -1, "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": MODEL}}
    t0 = time.time()
    r = session.post(url + "/sdapi/v1/txt2img", json=body, timeout=600)
    answer = r.json()
    t1 = time.time()
    if r.status_code != 200 or len(answer["images"]) != 1:
        raise RuntimeError(f"txt2img answered {r.status_code}: {r.text[:500]}")
    return {"t0": t0, "t1": t1, "batch_id": json.loads(answer["info"])["sdfarm_batch_id"]}


def run(url: str, callers: int, calls: int, steps: int) -> tuple[list[dict[str, Any]], float]:
    """`callers` threads, each posting `calls` calls one after another; every call's times."""
    done: list[dict[str, Any]] = []
    lock = threading.Lock()

    def caller(_: int) -> None:
        with requests.Session() as session:
            session.headers["Authorization"] = f"Bearer {TOKEN}"
            for _ in range(calls):
                found = call(session, url, steps)
                with lock:
                    done.append(found)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        list(pool.map(caller, range(callers)))
    return done, time.perf_counter() - t0


def measured(farm: Farm, done: dict[str, Any]) -> dict[str, float]:
    """One call's numbers, from its batch's records (read after the run: not timed)."""
    ((_, job),) = read_batch_jobs(farm.store, done["batch_id"])
    timings = farm.store.get_json(sidecar_key(job.id))["timings"]
    enqueued = farm.board.enqueued_at(done["batch_id"])
    assert enqueued is not None
    response = done["t1"] - done["t0"]
    worker = timings["chunk_render_s"] + timings["encode_s"] + timings["upload_s"]
    queue = timings["render_started_at"] - enqueued
    return {"response_s": response, "beyond_render_s": response - timings["chunk_render_s"], "queue_s": queue,
            "worker_s": worker, "api_s": response - queue - worker, "api_before_s": enqueued - done["t0"]}


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": round(ordered[-1], 4)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--callers", default="1,32", help="comma-separated numbers of concurrent callers, run in turn")
    ap.add_argument("--calls", type=int, default=8, help="calls each caller makes, one after another")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()

    farm = start_farm(Path(tempfile.mkdtemp(prefix="sdfarm-a1111-")), chunk=1,
                      env={"SDFARM_CPU_THREADS": str(max(1, (os.cpu_count() or 2) // args.workers))})
    try:
        for n in range(args.workers):
            farm.start_worker(f"w{n}")
        url = start_api(farm)
        deadline = time.monotonic() + 180
        while not all(farm.ready(f"w{n}") for n in range(args.workers)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers did not start; see {farm.logs}")
            time.sleep(0.5)
        run(url, args.workers, 2, args.steps)  # warm: each worker's first render, the service's first plans
        for callers in (int(c) for c in args.callers.split(",")):
            done, wall = run(url, callers, args.calls, args.steps)
            rows = [measured(farm, d) for d in done]
            emit(callers=callers, calls=len(rows), workers=args.workers, steps=args.steps,
                 wall_s=round(wall, 2), calls_per_s=round(len(rows) / wall, 2),
                 **{k: percentiles([r[k] for r in rows]) for k in rows[0]})
    finally:
        farm.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
