"""Secrets stay secret; links handed out are short-lived and read-only."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from infra.stack import StackInfo
from sdfarm.layout import image_key
from sdfarm.store import Store
from tests.conftest import LOGS, TINY, WorkerProcess, cli


@pytest.fixture(scope="module")
def secretive(start_worker: Callable[..., WorkerProcess]) -> Iterator[WorkerProcess]:
    worker = start_worker("secretive")
    yield worker
    worker.stop()


def test_links_are_presigned_gets_that_cannot_write(tmp_path: Path, env: dict[str, str], store: Store,
                                                    secretive: WorkerProcess) -> None:
    path = tmp_path / "linked.yaml"
    path.write_text(f"defaults: {{model: {TINY}, width: 64, height: 64, steps: 4}}\nitems: [a linked image]\n")
    assert cli(["submit", str(path), "--watch"], env).returncode == 0
    batch_id = cli(["submit", str(path)], env).stdout.split()[1].rstrip(":")
    out = cli(["links", batch_id, "--expires", "600"], env)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.splitlines()[0])
    assert "X-Amz-Expires=600" in row["url"] or "Expires=" in row["url"]
    with urllib.request.urlopen(row["url"], timeout=10) as response:
        assert response.read() == store.get(image_key(row["job_id"]))
    put = urllib.request.Request(row["url"], data=b"overwritten", method="PUT")
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(put, timeout=10)
    assert store.get(image_key(row["job_id"])) != b"overwritten"
    too_long = cli(["links", batch_id, "--expires", str(30 * 24 * 3600)], env)
    assert too_long.returncode == 2
    assert "allowed: 1..604800 seconds" in too_long.stderr


def test_no_secret_reaches_a_log_or_an_output(tmp_path: Path, env: dict[str, str], stack_info: StackInfo,
                                              secretive: WorkerProcess) -> None:
    worker = secretive
    path = tmp_path / "quiet.yaml"
    path.write_text(f"defaults: {{model: {TINY}, width: 64, height: 64, steps: 4}}\nitems: [a quiet image]\n")
    outputs = [cli(["submit", str(path), "--watch"], env), cli(["status"], env), cli(["workers"], env),
               cli(["submit", str(tmp_path / "missing.yaml")], env)]
    worker.stop()
    text = worker.tail(10**9) + "".join(o.stdout + o.stderr for o in outputs)
    assert "secretive@tests" in text
    for secret in (stack_info.redis_password, stack_info.s3_secret_key):
        assert secret not in text


def test_json_logs_are_one_object_a_line_with_each_jobs_fields_and_no_secret(
        tmp_path: Path, env: dict[str, str], stack_info: StackInfo, start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker("json-logs", model=LOGS, extra_env={"SDFARM_LOG_FORMAT": "json"})
    path = tmp_path / "logged.yaml"
    path.write_text(f"defaults: {{model: {LOGS}, width: 64, height: 64, steps: 4}}\nitems: [a logged image]\n")
    submitted = cli(["submit", str(path), "--watch"], env)
    assert submitted.returncode == 0, submitted.stderr + worker.tail()
    worker.stop()
    text = worker.tail(10**9)
    lines = [line for line in text.splitlines() if line.strip()]
    # every line one object, but the shutdown notice Celery writes to the terminal itself (sdfarm/logs.py)
    assert [line for line in lines if not line.startswith("{")] == ["worker: Warm shutdown (MainProcess)"]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    job, = (r for r in records if r.get("outcome") == "rendered")
    assert (job["worker"], job["model"], job["index"], job["logger"]) == ("json-logs@tests", LOGS, 0, "sdfarm.worker")
    assert {"job", "batch", "seconds"} <= job.keys()
    assert job["batch"] == submitted.stdout.split()[1].rstrip(":")
    for secret in (stack_info.redis_password, stack_info.s3_secret_key):
        assert secret not in text
