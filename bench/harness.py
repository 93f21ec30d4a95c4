"""The farm that the fault benchmarks (chaos.py, soak.py) run: the embedded stack with the tiny model,
real `sdfarm worker` and `sdfarm scheduler` processes, and the clients that look at what they did."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import redis
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from infra.sentinel import SentinelGroup  # noqa: E402
from infra.stack import EmbeddedStack  # noqa: E402
from sdfarm.batchfile import BatchPlan  # noqa: E402
from sdfarm.layout import (  # noqa: E402
    image_key,
    sidecar_key,
    worker_key,
)
from sdfarm.models import Registry  # noqa: E402
from sdfarm.progress import Progress, ProgressBoard  # noqa: E402
from sdfarm.queue import make_celery  # noqa: E402
from sdfarm.redis_target import RedisTarget  # noqa: E402
from sdfarm.settings import Settings  # noqa: E402
from sdfarm.store import Store  # noqa: E402

MODEL = "tiny-sd15"


def emit(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


@dataclass
class Farm:
    """The farm under test: the embedded stack, its clients, the processes started on it and their logs."""

    stack: EmbeddedStack
    env: dict[str, str]
    registry: Registry
    store: Store
    board: ProgressBoard
    app: Celery
    redis: redis.Redis
    logs: Path
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    others: list[subprocess.Popen[bytes]] = field(default_factory=list)
    group: SentinelGroup | None = None  # the farm's Redis when it runs on a Sentinel group (the stack's is idle)

    def _spawn(self, args: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with (self.logs / log).open("ab") as out:
            return subprocess.Popen([sys.executable, "-m", "producer", *args], env={**self.env, **(env or {})},
                                    cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def start_worker(self, name: str) -> None:
        """A worker of MODEL on the CPU, hostname `name@bench`; its log is logs/<name>.log."""
        self.workers[name] = self._spawn(["worker", "--model", MODEL, "--device", "cpu", "--hostname",
                                          f"{name}@bench"], f"{name}.log")

    def start_scheduler(self, env: dict[str, str]) -> None:
        self.others.append(self._spawn(["scheduler"], "scheduler.log", env))

    def kill_worker(self, name: str) -> None:
        """SIGKILL the whole worker: prefork parent and pool child."""
        os.killpg(self.workers[name].pid, signal.SIGKILL)
        self.workers[name].wait()

    def beat(self, name: str) -> dict[str, str]:
        """The worker's heartbeat hash (current_chunk, pid of its pool child, ...); {} while Redis is down."""
        try:
            raw: dict[bytes, bytes] = self.redis.hgetall(worker_key(f"{name}@bench"))  # type: ignore[assignment]
        except redis.exceptions.ConnectionError:
            return {}
        return {k.decode(): v.decode() for k, v in raw.items()}

    def ready(self, name: str) -> bool:
        if self.workers[name].poll() is not None:
            raise RuntimeError(f"worker {name} exited with {self.workers[name].returncode}; see {self.logs}/{name}.log")
        return bool(self.beat(name))

    def progress(self, batch_id: str) -> Progress | None:
        """The batch's live progress; None while Redis is down or before it is registered."""
        try:
            return self.board.read(batch_id)
        except redis.exceptions.ConnectionError:
            return None

    def done(self, batch_id: str) -> int:
        """Jobs done or failed so far; -1 while Redis is down."""
        try:
            p = self.board.read(batch_id)
        except redis.exceptions.ConnectionError:
            return -1
        return p.done + p.failed if p else 0

    def redis_memory(self) -> int:
        return int(self.redis.info("memory")["used_memory"])

    def log_text(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def renders(self) -> collections.Counter[str]:
        """How many times each job id was rendered, over every worker log."""
        counts: collections.Counter[str] = collections.Counter()
        for log in self.logs.glob("*.log"):
            for m in re.finditer(r"job=([0-9a-f]{32}) .*outcome=(rendered|rendered-existing) ", log.read_text()):
                counts[m.group(1)] += 1
        return counts

    def stop(self) -> None:
        for p in [*self.workers.values(), *self.others]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        if self.group is not None:
            self.group.stop()
        self.stack.stop()


def start_farm(tmp: Path, chunk: int, env: dict[str, str] | None = None, sentinel: bool = False) -> Farm:
    """The tiny model and its registry under tmp, a started embedded stack, and no process on it yet.
    `env` overrides the SDFARM_* settings given here. With `sentinel`, the farm's Redis is a Sentinel
    group (a primary, a replica, three sentinels; infra/sentinel.py) and the stack serves S3 only."""
    from worker.testing import write_tiny_model

    write_tiny_model(tmp / "tiny")
    (tmp / "models.yaml").write_text(f"models:\n  {MODEL}:\n    path: tiny\n")
    stack = EmbeddedStack(tmp / "stack")
    info = stack.start()
    group = SentinelGroup(tmp / "redis-group") if sentinel else None
    if group is not None:
        group.start()
    full = {**os.environ, **info.env(), **(group.env() if group else {}),
            "SDFARM_MODELS_FILE": str(tmp / "models.yaml"),
            "SDFARM_CACHE_DIR": str(tmp / "cache"), "SDFARM_CHUNK_SIZE": str(chunk),
            "SDFARM_VISIBILITY_TIMEOUT": "30", "SDFARM_UNACKED_RESTORE_INTERVAL": "2",
            "SDFARM_RETRY_BACKOFF_S": "1", "SDFARM_RETRY_BACKOFF_MAX_S": "10", "SDFARM_UPLOAD_THREADS": "8",
            **(env or {})}
    settings = Settings.from_env(full)
    logs = tmp / "logs"
    logs.mkdir()
    client = RedisTarget.from_settings(settings).client()
    return Farm(stack=stack, env=full, registry=Registry.from_settings(settings), store=Store.from_settings(settings),
                board=ProgressBoard(client, 3600), app=make_celery(settings), redis=client, logs=logs, group=group)


@dataclass(frozen=True)
class Outputs:
    """What the bucket holds for a batch's jobs."""

    missing: list[str]  # job ids without a PNG or without a sidecar
    mismatched: list[str]  # job ids whose sidecar's sha256 is not their PNG's (an overwrite, a torn write)
    duplicate_objects: int  # keys listed more than once


def check_outputs(store: Store, plan: BatchPlan) -> Outputs:
    keys = collections.Counter(store.keys("renders/"))
    wanted = {j.id for j in plan.jobs}

    def check(job_id: str) -> tuple[str, bool, bool]:
        if keys[sidecar_key(job_id)] == 0 or keys[image_key(job_id)] == 0:
            return job_id, False, False
        meta = store.get_json(sidecar_key(job_id))
        return job_id, True, meta["image"]["sha256"] == hashlib.sha256(store.get(image_key(job_id))).hexdigest()

    with ThreadPoolExecutor(16) as pool:
        checks = list(pool.map(check, sorted(wanted)))
    doubled = [k for k, c in keys.items() if c > 1 and k.removeprefix("renders/").rsplit(".", 1)[0] in wanted]
    return Outputs(missing=[j for j, ok, _ in checks if not ok],
                   mismatched=[j for j, ok, same in checks if ok and not same],
                   duplicate_objects=sum(keys[k] - 1 for k in doubled))
