"""Requests/s of `GET /v1/batches/{id}` under concurrent callers, against a real `sdfarm serve` on the
embedded stack.

    .venv/bin/python bench/api_load.py [--callers 32] [--seconds 20] [--jobs 100] [--loglevel info]

Starts the embedded stack with the tiny model registered and no worker, `sdfarm serve` in its own
process (SDFARM_API_MAX_CONCURRENT raised above the callers, so that no call is refused with a 429),
and submits a batch of N jobs through the API (nobody renders it: its progress stays put, and what
is measured is the API's own work: auth, a Redis read, the images/s window, JSON). Then C callers,
each on its own keep-alive connection, in one asyncio process (a light client, so that the shared
cores go to the server), call `GET /v1/batches/{id}` back to back: a warm-up, then the measured
seconds. Every answer must be a 200.

Prints one JSON line with requests/s, p50 and p99 latency, the number of answers that were not 200
and the load average before and after (these machines are shared and noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import MODEL, ROOT, emit, start_farm

TOKEN_NAME = "bench"


async def caller(host: str, port: int, request: bytes, until: float, latencies: list[float],
                 failures: list[int], measure_from: float) -> None:
    """One keep-alive connection: request after request until `until`; latencies counted after measure_from."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.monotonic() < until:
            t0 = time.monotonic()
            writer.write(request)
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            if t0 >= measure_from:
                latencies.append(time.monotonic() - t0)
                if status != 200:
                    failures.append(status)
    finally:
        writer.close()


async def load(host: str, port: int, path: str, token: str, callers: int, warmup_s: float, seconds: float
               ) -> tuple[list[float], list[int], float]:
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
               "Accept: application/json\r\n\r\n").encode()
    start = time.monotonic()
    measure_from, until = start + warmup_s, start + warmup_s + seconds
    latencies: list[float] = []
    failures: list[int] = []
    await asyncio.gather(*(caller(host, port, request, until, latencies, failures, measure_from)
                           for _ in range(callers)))
    return latencies, failures, time.monotonic() - measure_from


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(env: dict[str, str], port: int, loglevel: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "producer", "serve", "--port", str(port), "--loglevel",
                                 loglevel], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_up(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sdfarm serve exited with {proc.returncode}")
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError("sdfarm serve did not answer /healthz")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--callers", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--loglevel", default="info", help="sdfarm serve's (info: one access line per request)")
    args = ap.parse_args()
    token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="sdfarm-api-load-") as tmp:
        farm = start_farm(Path(tmp), chunk=8)
        port = free_port()
        env = {**farm.env, "SDFARM_API_TOKENS": f"{TOKEN_NAME}:{token}",
               "SDFARM_API_MAX_CONCURRENT": str(args.callers * 2)}
        proc = serve(env, port, args.loglevel, farm.logs / "serve.log")
        try:
            url = f"http://127.0.0.1:{port}"
            wait_up(url, proc)
            batch: dict[str, Any] = {"name": "api-load", "items": [{"prompt": "load", "count": args.jobs}],
                                     "defaults": {"model": MODEL, "width": 64, "height": 64, "steps": 1}}
            submitted = requests.post(url + "/v1/batches", json=batch, headers={"Authorization": f"Bearer {token}"},
                                      timeout=60)
            submitted.raise_for_status()
            batch_id = submitted.json()["batch_id"]
            load_before = os.getloadavg()[0]
            latencies, failures, elapsed = asyncio.run(load("127.0.0.1", port, f"/v1/batches/{batch_id}", token,
                                                            args.callers, args.warmup, args.seconds))
            emit(figure="get_batch", callers=args.callers, seconds=round(elapsed, 1), requests=len(latencies),
                 requests_per_s=round(len(latencies) / elapsed, 1), p50_ms=round(percentile(latencies, 0.5) * 1e3, 1),
                 p99_ms=round(percentile(latencies, 0.99) * 1e3, 1), not_200=len(failures),
                 loglevel=args.loglevel, cpus=os.cpu_count(), load_before=round(load_before, 2),
                 load_after=round(os.getloadavg()[0], 2))
            return 0 if not failures and latencies else 1
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
            farm.stop()


if __name__ == "__main__":
    sys.exit(main())
