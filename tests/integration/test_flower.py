"""Flower, the Celery dashboard, sees the farm: a real Flower (from PyPI) on the embedded stack's Redis,
behind basic auth, lists a worker that sends task events (SDFARM_TASK_EVENTS) and the chunks it
rendered, through Flower's own HTTP API."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sdfarm.queue import RENDER_TASK
from tests.conftest import EVENTS, WorkerProcess, cli, free_port, served, wait_for
from tests.integration.test_farm import batch_file

LOGIN = "ops:flower-test-password"


class Flower:
    def __init__(self, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.port, self.proc, self.log = port, proc, log

    def read(self, path: str, login: str | None = LOGIN) -> bytes:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if login:
            request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
        with urllib.request.urlopen(request, timeout=10) as response:
            body: bytes = response.read()
            return body

    def get(self, path: str, login: str | None = LOGIN) -> Any:
        return json.loads(self.read(path, login))

    def answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"flower exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
        try:
            return self.read("/healthcheck", None) == b"OK"
        except (urllib.error.URLError, ConnectionError):
            return False


@pytest.fixture(scope="module")
def flower(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    port, log = free_port(), tmp_path_factory.mktemp("flower") / "flower.log"
    # as the README says to run it: on the farm's app (its broker options)
    with served([sys.executable, "-m", "celery", "-A", "sdfarm.celery_app", "flower", f"--port={port}",
                 "--address=127.0.0.1", f"--basic_auth={LOGIN}"], log, {**os.environ, **env}) as proc:
        f = Flower(port, proc, log)
        wait_for(f.answers, 60, "flower to answer")
        yield f


def test_flower_sees_a_worker_with_task_events_and_the_chunks_it_rendered(
        tmp_path: Path, env: dict[str, str], flower: Flower, start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker("eventful", model=EVENTS, extra_env={"SDFARM_TASK_EVENTS": "true"})
    wait_for(lambda: worker.hostname in flower.get("/api/workers?refresh=1"), 60, "flower to list the worker")
    path = batch_file(tmp_path, "watched", EVENTS, ["a watched image", "another one"], steps=4)
    assert cli(["submit", str(path), "--watch"], env).returncode == 0

    def rendered() -> list[dict[str, Any]]:
        tasks = flower.get(f"/api/tasks?workername={worker.hostname}").values()
        return [t for t in tasks if t.get("name") == RENDER_TASK and t.get("state") == "SUCCESS"]

    task, = wait_for(rendered, 60, "flower to see the rendered chunk")
    assert task["worker"] == worker.hostname
    assert "'rendered': 2" in str(task["result"])
    with pytest.raises(urllib.error.HTTPError) as refused:  # the API wants the login
        flower.get("/api/workers", login=None)
    assert refused.value.code == 401
    worker.stop()
