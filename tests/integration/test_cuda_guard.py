"""The worker's prefork parent never touches the CUDA driver (a CPU suite cannot see this otherwise).

A parent that initialises CUDA, or merely counts devices (torch.cuda.is_available()), leaves its
forked pool child unable to use the GPU: "Cannot re-initialize CUDA in forked subprocess". Here a
real `sdfarm worker` starts with a sitecustomize that traps the two torch entry points every such
path goes through and records the calling process; the parent must have made no call.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.conftest import ROOT, TINY, wait_for

pytestmark = pytest.mark.integration

TRAP = '''
import os, traceback
import torch, torch.cuda

_log = os.environ["SDFARM_TEST_CUDA_TRAP"]


def _record(kind):
    with open(_log, "a") as f:
        f.write(f"{kind} {os.getpid()} " + traceback.format_stack(limit=8)[-3].strip().replace("\\n", " ") + "\\n")


def _wrap(kind, fn):
    def trapped(*args, **kwargs):
        _record(kind)
        return fn(*args, **kwargs)
    return trapped


torch._C._cuda_getDeviceCount = _wrap("count", torch._C._cuda_getDeviceCount)
torch.cuda._lazy_init = _wrap("init", torch.cuda._lazy_init)
_record("installed")
'''


def _calls(log: Path) -> list[tuple[str, int, str]]:
    rows = []
    for line in log.read_text().splitlines():
        kind, pid, where = line.split(" ", 2)
        rows.append((kind, int(pid), where))
    return rows


def test_worker_parent_never_touches_cuda(env: dict[str, str], redis_client: redis.Redis, tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(TRAP)
    log = tmp_path / "cuda-calls.log"
    hostname = "cuda-guard@tests"
    worker_log = tmp_path / "worker.log"
    with worker_log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "producer", "worker", "--model", TINY, "--device", "cpu", "--hostname", hostname],
            env={**os.environ, **env, "SDFARM_TEST_CUDA_TRAP": str(log),
                 "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])},
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # the pool child has loaded the model and renders: start-up in the parent is over
        wait_for(lambda: proc.poll() is not None or redis_client.exists(f"sdfarm:worker:{hostname}"), 120,
                 "the worker to load its model")
        assert proc.poll() is None, worker_log.read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    calls = _calls(log)
    assert ("installed", proc.pid) in {(k, p) for k, p, _ in calls}, "the trap was not installed in the parent"
    in_parent = [f"{kind}: {where}" for kind, pid, where in calls if pid == proc.pid and kind != "installed"]
    assert in_parent == [], "the worker's parent touched CUDA before forking:\n" + "\n".join(in_parent)
    # the trap works: the pool child, which imports diffusers to load the pipeline, is recorded
    assert any(kind != "installed" and pid != proc.pid for kind, pid, _ in calls)
