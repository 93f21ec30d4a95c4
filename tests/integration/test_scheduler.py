"""`sdfarm scheduler`: scheduled dataset runs fire once, however many schedulers run; finished
batches get their exports and a signed completion webhook, retried after a failure."""

from __future__ import annotations

import hmac
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from infra.stack import EmbeddedStack
from producer.webhook import SIGNATURE_HEADER, sign
from sdfarm.progress import ProgressBoard
from sdfarm.store import Store
from tests.conftest import IDLE, ROOT, TINY, WorkerProcess, cli, stop_group, wait_for

SECRET = "webhook-secret-for-tests"


class Scheduler:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "producer", "scheduler"], env={**os.environ, **env},
                                         cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        stop_group(self.proc)


@pytest.fixture
def schedulers(env: dict[str, str], tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Scheduler]]:
    started: list[Scheduler] = []

    def start(extra: dict[str, str]) -> Scheduler:
        s = Scheduler({**env, "SDFARM_SCHEDULER_TICK_S": "1", **extra}, tmp_path / f"scheduler-{len(started)}.log")
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def test_two_schedulers_fire_a_due_run_once(tmp_path: Path, schedulers: Callable[[dict[str, str]], Scheduler],
                                            redis_client: Any) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    name = f"every-minute-{os.getpid()}"
    (specs / "spec.yaml").write_text(f"""name: {name}
templates: ["a {{thing}}"]
wildcards: {{thing: [cube, sphere]}}
images_per_run: 2
render: {{model: {IDLE}, width: 64, height: 64, steps: 2}}
schedule: {{cron: "* * * * *", timezone: UTC}}
""")
    # simulated due time: the spec has been known for two minutes, so the latest minute is due now
    redis_client.hset(f"sdfarm:dataset:{name}", "since", time.time() - 120)
    pair = [schedulers({"SDFARM_DATASETS_DIR": str(specs)}) for _ in range(2)]
    wait_for(lambda: redis_client.hlen(f"sdfarm:dataset:{name}:runs"), 90, "the scheduled run to fire")
    # let both processes tick a while longer
    wait_for(lambda: sum(s.text().count("sdfarm.dataset_tick") for s in pair) >= 12, 60, "more ticks")
    fired = [m.groups() for s in pair for m in re.finditer(rf"dataset fired: {name} due (\S+) -> batch (\w+)",
                                                           s.text())]
    due_times = [due for due, _ in fired]
    assert len(due_times) == len(set(due_times)) >= 1  # every due time fired once, by one process
    assert len({batch for _, batch in fired}) == 1  # one batch
    assert redis_client.hlen(f"sdfarm:dataset:{name}:runs") == 1


class _Receiver(BaseHTTPRequestHandler):
    calls: ClassVar[list[tuple[int, bytes, str]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status = 500 if not self.calls else 200  # fail the first delivery
        self.calls.append((status, body, self.headers.get(SIGNATURE_HEADER, "")))
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    _Receiver.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


def test_finished_run_is_exported_and_announced_with_a_signed_webhook(
        tmp_path: Path, schedulers: Callable[[dict[str, str]], Scheduler], receiver: str,
        start_worker: Callable[..., WorkerProcess], env: dict[str, str], store: Store, board: ProgressBoard) -> None:
    worker = start_worker("scheduled-render")
    name = f"hooked-{os.getpid()}"
    try:
        schedulers({"SDFARM_WEBHOOK_SECRET": SECRET})
        spec = tmp_path / "hooked.yaml"
        spec.write_text(f"""name: {name}
templates: ["a {{thing}}"]
wildcards: {{thing: [cube, sphere, cone]}}
images_per_run: 3
render: {{model: {TINY}, width: 64, height: 64, steps: 3}}
output_prefix: exports/hooked
export: [parquet]
webhook: {{url: "{receiver}"}}
""")
        run = cli(["dataset", "run", str(spec), "--date", "2026-11-21", "--watch"], env)
        assert run.returncode == 0, run.stdout + run.stderr
        batch_id = run.stdout.split("batch ")[1].split(":")[0]
        wait_for(lambda: len(_Receiver.calls) >= 2, 120, "the webhook to be retried after its 500")
        (first_status, first_body, first_sig), (second_status, second_body, second_sig) = _Receiver.calls[:2]
        assert (first_status, second_status) == (500, 200)
        assert first_body == second_body
        for body, signature in ((first_body, first_sig), (second_body, second_sig)):
            assert hmac.compare_digest(signature, sign(SECRET.encode(), body))
        notice = json.loads(second_body)
        assert notice["event"] == "batch.completed"
        assert (notice["batch_id"], notice["done"], notice["failed"]) == (batch_id, 3, 0)
        assert store.exists("exports/hooked/2026-11-21/parquet/manifest.parquet")
        assert len(_Receiver.calls) == 2  # one notice delivered, not more
        # and counted for the exporter: the failed attempt and the delivery
        counted = wait_for(lambda: next((s.counts for s in board.datasets().stats()
                                         if s.name == name and "webhook_delivered" in s.counts), None), 30,
                           "the delivery to be counted")
        assert counted == {"webhook_failed": 1, "webhook_delivered": 1}
    finally:
        worker.stop()


def test_the_beat_ticks_on_after_a_redis_outage(schedulers: Callable[[dict[str, str]], Scheduler],
                                                stack: EmbeddedStack) -> None:
    """Redis down for several ticks: RedBeat's own tick would end the beat process while the
    scheduler lived on without ticks (no dataset run, no reconcile, ever again)."""
    scheduler = schedulers({})
    wait_for(lambda: "Sending due task dataset-tick" in scheduler.text(), 60, "the beat to tick")
    stack.kill_redis()
    down_at = time.monotonic()
    wait_for(lambda: "beat: Redis unreachable" in scheduler.text(), 30, "a tick while Redis is down")
    wait_for(lambda: time.monotonic() - down_at > 3, 10, "three ticks' worth of outage", interval_s=0.5)
    stack.start_redis()
    before = scheduler.text().count("Sending due task dataset-tick")
    wait_for(lambda: scheduler.text().count("Sending due task dataset-tick") > before + 2, 60,
             "the beat to tick again after the outage")
    assert "Process Beat" not in scheduler.text()  # the beat process never died
