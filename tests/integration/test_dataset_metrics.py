"""The farm's dataset metrics, on the stack's real Redis: the scheduler's ledger of due times (fired,
missed, the next one), its dataset tick and completion task counting runs and webhook attempts, and
`sdfarm exporter` exporting what they counted. The tick and the task run in this process, at times
the tests choose."""

from __future__ import annotations

import datetime as dt
import itertools
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from celery import Celery
from prometheus_client import CollectorRegistry

from producer.exporter import FarmCollector
from producer.ledger import account, scheduled_specs
from producer.scheduler import register_control_tasks
from sdfarm.errors import TransientError
from sdfarm.layout import batch_key, dataset_key
from sdfarm.models import Registry
from sdfarm.progress import DatasetBoard, ProgressBoard
from sdfarm.queue import BATCH_FINISHED_TASK, DATASET_TICK_TASK, make_celery
from sdfarm.settings import Settings
from sdfarm.store import Store
from tests.conftest import IDLE

BERLIN = dt.timezone(dt.timedelta(hours=1))  # Europe/Berlin in January
_names = itertools.count()


def unique(stem: str) -> str:
    return f"{stem}-{os.getpid()}-{next(_names)}"


def write_spec(folder: Path, name: str, cron: str, model: str = IDLE) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(f"""name: {name}
templates: ["a {{thing}}"]
wildcards: {{thing: [cube, sphere]}}
images_per_run: 2
render: {{model: {model}, width: 64, height: 64, steps: 2}}
schedule: {{cron: "{cron}", timezone: Europe/Berlin}}
""")
    return path


def at(day: int, hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime(2026, 1, day, hour, minute, tzinfo=BERLIN)


def exported(board: ProgressBoard, registry: Registry, name: str, **labels: str) -> float | None:
    metrics = CollectorRegistry()
    metrics.register(FarmCollector(board, registry))
    return metrics.get_sample_value(name, labels)


def test_due_times_are_fired_or_missed_once_and_the_next_one_is_written_down(
        tmp_path: Path, board: ProgressBoard, registry: Registry) -> None:
    name = unique("nightly")
    folder = tmp_path / "specs"
    write_spec(folder, name, "0 3 * * *")
    datasets = board.datasets()

    def tick(now: dt.datetime, fire: bool = True) -> int:
        """What a tick does, at `now`: claim the latest due time (the fire), then the ledger."""
        specs, complete = scheduled_specs(folder)
        if fire and specs:
            datasets.claim(name, specs[0].schedule.latest(now).isoformat())
        return account(datasets, specs, complete, now)

    assert tick(at(1, 4), fire=False) == 0  # first seen after the day's due time: nothing owed
    assert exported(board, registry, "sdfarm_dataset_next_run_timestamp_seconds", dataset=name) == \
        at(2, 3).timestamp()
    assert exported(board, registry, "sdfarm_dataset_runs_total", dataset=name, outcome="missed") == 0
    assert tick(at(2, 3, 1)) == 0  # fired on time
    # every scheduler down from the 2nd to the 5th: the 3rd and the 4th can never fire (the 5th does)
    assert tick(at(5, 3, 10)) == 2
    assert tick(at(5, 3, 10)) == 0  # a second tick, or a second scheduler, counts nothing again
    assert account(board.datasets(), *scheduled_specs(folder), at(5, 3, 11)) == 0
    assert tick(at(7, 3, 5)) == 1  # the 5th was fired: only the 6th is missed
    assert next(s for s in datasets.stats() if s.name == name).counts == {"missed": 3}
    assert exported(board, registry, "sdfarm_dataset_runs_total", dataset=name, outcome="missed") == 3
    assert exported(board, registry, "sdfarm_dataset_next_run_timestamp_seconds", dataset=name) == \
        at(8, 3).timestamp()

    # a new schedule starts a new ledger: the old one's due times are not owed under the new
    write_spec(folder, name, "30 4 * * *")
    assert tick(at(9, 5)) == 0
    assert exported(board, registry, "sdfarm_dataset_next_run_timestamp_seconds", dataset=name) == \
        at(10, 4, 30).timestamp()

    # a spec that does not load: nothing is forgotten (its name is unknown), the next due time stays
    (folder / "broken.yaml").write_text("name: [unclosed\n")
    (folder / f"{name}.yaml").unlink()
    assert tick(at(11, 5)) == 0
    assert exported(board, registry, "sdfarm_dataset_next_run_timestamp_seconds", dataset=name) == \
        at(10, 4, 30).timestamp()
    # every spec loads and this one is gone: no run is expected of it any more; its counts stay
    (folder / "broken.yaml").unlink()
    tick(at(11, 6))
    assert exported(board, registry, "sdfarm_dataset_next_run_timestamp_seconds", dataset=name) is None
    assert exported(board, registry, "sdfarm_dataset_runs_total", dataset=name, outcome="missed") == 3


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The control tasks' SDFARM_DATASETS_DIR."""
    return tmp_path_factory.mktemp("specs")


@pytest.fixture(scope="module")
def control(settings: Settings, specs: Path) -> Celery:
    """The scheduler's control tasks on an app of their own, run in this process (once per process:
    Celery shares a task with every app made after it, and the first registration wins)."""
    app = make_celery(settings)
    register_control_tasks(app, settings.model_copy(update={"datasets_dir": specs}))
    return app


def test_the_tick_counts_a_fired_run_and_a_fire_that_failed_as_missed(
        specs: Path, control: Celery, board: ProgressBoard, registry: Registry, redis_client: Any) -> None:
    good, bad = unique("fires"), unique("cannot-fire")
    write_spec(specs, good, "* * * * *")
    write_spec(specs, bad, "* * * * *", model="no-such-model")  # refused when planned
    for name in (good, bad):  # known for two minutes: the latest minute is due
        redis_client.hset(dataset_key(name), "since", dt.datetime.now(dt.timezone.utc).timestamp() - 120)
    control.tasks[DATASET_TICK_TASK]()
    assert exported(board, registry, "sdfarm_dataset_runs_total", dataset=good, outcome="fired") == 1
    assert exported(board, registry, "sdfarm_dataset_runs_total", dataset=good, outcome="missed") == 0
    assert exported(board, registry, "sdfarm_dataset_runs_total", dataset=bad, outcome="fired") == 0
    assert exported(board, registry, "sdfarm_dataset_runs_total", dataset=bad, outcome="missed") == 1
    # the fired run's chunks were enqueued, and said when: a worker's queue wait starts there
    batch_id = board.datasets().last_run(good)["last_batch"]
    enqueued_at = board.enqueued_at(batch_id)
    assert enqueued_at is not None
    assert abs(enqueued_at - dt.datetime.now(dt.timezone.utc).timestamp()) < 60


class _Receiver(BaseHTTPRequestHandler):
    statuses: ClassVar[list[int]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(self.statuses.pop(0))
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


def test_webhook_attempts_are_counted_delivered_failed_or_unsent(
        control: Celery, receiver: str, store: Store, board: ProgressBoard, registry: Registry,
        monkeypatch: pytest.MonkeyPatch) -> None:
    name = unique("hooked")
    batch_id = f"{os.getpid():08x}{next(_names):08x}"
    store.put_json(batch_key(batch_id), {"name": name, "hooks": {
        "dataset": name, "date": "2026-01-02", "export": [],
        "webhook": {"url": receiver, "secret_env": "SDFARM_WEBHOOK_SECRET"}}})
    finished = control.tasks[BATCH_FINISHED_TASK]
    monkeypatch.setenv("SDFARM_WEBHOOK_SECRET", "a secret")
    _Receiver.statuses = [503, 200]
    with pytest.raises(TransientError):  # called directly, the retry raises what failed
        finished(batch_id)
    finished(batch_id)
    monkeypatch.delenv("SDFARM_WEBHOOK_SECRET")
    finished(batch_id)  # no secret: not sent
    counts = {outcome: exported(board, registry, "sdfarm_webhook_deliveries_total", dataset=name, outcome=outcome)
              for outcome in DatasetBoard.WEBHOOK_OUTCOMES}
    assert counts == {"delivered": 1, "failed": 1, "unsent": 1}
    with pytest.raises(ValueError, match="unknown dataset count 'webhook_lost'"):
        board.datasets().count(name, "webhook_lost")
