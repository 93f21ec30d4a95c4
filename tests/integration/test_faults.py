"""Fault injection against real workers: poison jobs, cancel, duplicate delivery, a crash between the
PNG and its sidecar, hostile messages (pickle, malformed, from a newer producer), a model that cannot
load, a job whose image is NaN."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from producer.submit import record_batch, submit_plan
from sdfarm.batchfile import plan_file
from sdfarm.jobs import RECORDED, SCHEMA_VERSION, RenderJob, make_chunks
from sdfarm.layout import dead_letter_key, failed_key, image_key, sidecar_key, thumbnail_key
from sdfarm.models import Registry
from sdfarm.progress import ProgressBoard
from sdfarm.queue import enqueue_chunks, queue_depth, queue_name
from sdfarm.store import Store
from tests.conftest import BROKEN, FAULTS, IDLE, ROOT, WorkerProcess, cli, wait_for
from worker.tasks import message_digest


@pytest.fixture(scope="module")
def fault_workers(start_worker: Callable[..., WorkerProcess]) -> list[WorkerProcess]:
    workers = [start_worker("fault-a", model=FAULTS), start_worker("fault-b", model=FAULTS)]
    yield workers  # type: ignore[misc]
    for w in workers:
        w.stop()


def write_batch(tmp_path: Path, name: str, prompts: list[str], steps: int = 6) -> Path:
    path = tmp_path / f"{name}.yaml"
    items = "".join(f"  - {json.dumps(p)}\n" for p in prompts)
    path.write_text(f"name: {name}\nseed: 7\ndefaults: {{model: {FAULTS}, width: 64, height: 64, steps: {steps}}}\n"
                    f"items:\n{items}")
    return path


def progress_of(board: ProgressBoard, batch_id: str) -> tuple[int, int]:
    p = board.read(batch_id)
    return (p.done, p.failed) if p else (0, 0)


def idle(workers: list[WorkerProcess], board: ProgressBoard) -> bool:
    return queue_depth(board.r, FAULTS) == 0 and not any(w.busy_with() for w in workers)


def test_poison_job_fails_after_three_deaths_and_the_worker_serves_on(
        tmp_path: Path, fault_workers: list[WorkerProcess], env: dict[str, str], store: Store,
        board: ProgressBoard, registry: Registry, redis_client: Any) -> None:
    path = write_batch(tmp_path, "poison", ["a job that kills its worker"], steps=150)
    plan = plan_file(path, registry, 10)
    chunk_id = next(make_chunks(plan.batch_id, enumerate(plan.jobs), 4)).id
    assert cli(["submit", str(path)], env).returncode == 0

    killed: set[int] = set()  # a killed child's heartbeat record (pid, chunk) lingers until it expires

    def rendering_child() -> int | None:
        for w in fault_workers:
            chunk, pid = redis_client.hmget(f"sdfarm:worker:{w.hostname}", "current_chunk", "pid")
            if chunk and chunk.decode() == chunk_id and pid and int(pid) not in killed:
                return int(pid)
        return None

    for attempt in range(3):
        child = wait_for(rendering_child, 90, f"attempt {attempt + 1} to start rendering")
        os.kill(child, signal.SIGKILL)  # the pool child dies at render start, as a segfault or OOM kill would
        killed.add(child)
    wait_for(lambda: progress_of(board, plan.batch_id) == (0, 1), 120, "the job to be failed")
    job = plan.jobs[0]
    record = store.get_json(failed_key(plan.batch_id, job.id))
    assert "gave up after 3 attempts" in record["reason"]
    assert not store.exists(image_key(job.id))
    assert not store.exists(sidecar_key(job.id))

    # shown by status, watch exits 1, fetch names the reason
    assert "failed" in cli(["status"], env).stdout
    watched = cli(["watch", plan.batch_id], env)
    assert watched.returncode == 1
    assert "1 of 1 jobs failed" in watched.stderr
    # the workers keep serving other jobs
    good = write_batch(tmp_path, "after-poison", ["a harmless job"])
    assert cli(["submit", str(good), "--watch"], env).returncode == 0
    # retry re-enqueues the failed job with a fresh attempt count: it renders now
    assert "1 failed jobs enqueued again" in cli(["retry", plan.batch_id], env).stdout
    wait_for(lambda: progress_of(board, plan.batch_id) == (1, 0), 120, "the retried job to render")
    assert store.exists(sidecar_key(job.id))


def test_cancel_stops_new_renders_and_resume_finishes(
        tmp_path: Path, fault_workers: list[WorkerProcess], env: dict[str, str], store: Store,
        board: ProgressBoard, registry: Registry) -> None:
    # long enough that the batch is still running when the cancel lands (a chunk takes seconds, the
    # `sdfarm cancel` process about as long to start): 8 chunks of 4 over two workers
    path = write_batch(tmp_path, "cancel-me", [f"cancel test {i}" for i in range(32)], steps=50)
    plan = plan_file(path, registry, 100)
    assert cli(["submit", str(path)], env).returncode == 0
    wait_for(lambda: progress_of(board, plan.batch_id)[0] >= 4, 120, "some jobs to finish")
    assert cli(["cancel", plan.batch_id], env).returncode == 0
    cancelled_at = time.time()
    wait_for(lambda: idle(fault_workers, board), 120, "the workers to drain the queue")
    done = [j for j in plan.jobs if store.exists(sidecar_key(j.id))]
    assert 4 <= len(done) < len(plan.jobs)
    for job in done:
        assert store.get_json(sidecar_key(job.id))["timings"]["render_started_at"] < cancelled_at
    watched = cli(["watch", plan.batch_id], env)
    assert watched.returncode == 1
    assert "cancelled" in watched.stderr

    resumed = cli(["resume", plan.batch_id], env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(plan.jobs) - len(done)} jobs enqueued" in resumed.stdout
    wait_for(lambda: progress_of(board, plan.batch_id) == (32, 0), 180, "the resumed batch to finish")


def test_watch_reconciles_lost_messages_and_reconcile_is_idempotent(
        tmp_path: Path, fault_workers: list[WorkerProcess], env: dict[str, str], store: Store,
        board: ProgressBoard, registry: Registry, redis_client: Any) -> None:
    path = write_batch(tmp_path, "lost", [f"lost message {i}" for i in range(8)])
    plan = plan_file(path, registry, 100)
    assert cli(["reconcile", plan.batch_id], env).returncode == 2  # unknown batch: nothing recorded
    # the record and the progress exist but the messages are gone (Redis lost them before a worker did)
    record_batch(plan, store, board)
    watched = cli(["watch", plan.batch_id, "--reconcile-after", "1", "--timeout", "120"], env)
    assert watched.returncode == 0, watched.stderr
    assert "8 jobs missing: re-enqueued them (reconcile)" in watched.stderr

    redis_client.delete(f"sdfarm:batch:{plan.batch_id}", f"sdfarm:batch:{plan.batch_id}:done")
    for _ in range(2):  # any number of times: nothing missing, nothing enqueued, progress repaired from S3
        out = cli(["reconcile", plan.batch_id], env)
        assert "8 jobs, 8 done, 0 failed, 0 re-enqueued" in out.stdout
    assert progress_of(board, plan.batch_id) == (8, 0)


def test_crash_between_png_and_sidecar_completes_without_overwriting(
        tmp_path: Path, fault_workers: list[WorkerProcess], env: dict[str, str], store: Store,
        registry: Registry) -> None:
    path = write_batch(tmp_path, "half-written", ["a png without its sidecar", "an untouched job"])
    plan = plan_file(path, registry, 10)
    job = plan.jobs[0]
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="PNG")  # what the dead attempt had stored
    planted = buf.getvalue()
    assert store.put_if_absent(image_key(job.id), planted, "image/png")
    assert cli(["submit", str(path), "--watch"], env).returncode == 0
    assert store.get(image_key(job.id)) == planted  # not overwritten
    assert store.get_json(sidecar_key(job.id))["image"]["sha256"] == hashlib.sha256(planted).hexdigest()
    with Image.open(io.BytesIO(store.get(thumbnail_key(job.id)))) as thumb:  # the thumbnail shows that PNG too
        red = thumb.convert("RGB").getpixel((32, 32))
    assert isinstance(red, tuple)
    assert max(abs(a - b) for a, b in zip(red, (255, 0, 0), strict=True)) < 8  # lossy WebP: close
    assert store.exists(thumbnail_key(plan.jobs[1].id))


def test_the_same_chunk_delivered_to_two_workers_is_stored_once(
        tmp_path: Path, fault_workers: list[WorkerProcess], store: Store, board: ProgressBoard,
        registry: Registry, celery_app: Any) -> None:
    path = write_batch(tmp_path, "twice", [f"delivered twice {i}" for i in range(4)], steps=60)
    plan = plan_file(path, registry, 10)
    board.register(plan.batch_id, plan.name, len(plan.jobs))
    chunk = next(make_chunks(plan.batch_id, enumerate(plan.jobs), 4))
    enqueue_chunks(celery_app, [chunk, chunk])
    wait_for(lambda: all(w.busy_with() == chunk.id for w in fault_workers), 60, "both workers to take the chunk")
    wait_for(lambda: progress_of(board, plan.batch_id) == (4, 0) and idle(fault_workers, board), 120,
             "both deliveries to finish")
    for job in plan.jobs:
        png = store.get(image_key(job.id))
        assert store.get_json(sidecar_key(job.id))["image"]["sha256"] == hashlib.sha256(png).hexdigest()
    assert len([k for k in store.keys("renders/") if any(j.id in k for j in plan.jobs)]) == 8
    assert len([k for k in store.keys("thumbs/") if any(j.id in k for j in plan.jobs)]) == 4
    assert board.read(plan.batch_id).rendered == 4  # type: ignore[union-attr]


class _Exploit:
    """Unpickling this runs a shell command: what a pickle-accepting worker would execute."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_message_pushed_onto_the_queue_is_refused(
        tmp_path: Path, fault_workers: list[WorkerProcess], env: dict[str, str], board: ProgressBoard,
        celery_app: Any) -> None:
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    celery_app.send_task("sdfarm.render_chunk", args=[_Exploit(marker)], queue=queue_name(FAULTS),
                         serializer="pickle")
    wait_for(lambda: idle(fault_workers, board), 60, "the message to be consumed")
    logs = "".join(w.tail(10**9) for w in fault_workers)
    wait_for(lambda: "ContentDisallowed" in "".join(w.tail(10**9) for w in fault_workers) or
             "Refusing to deserialize" in "".join(w.tail(10**9) for w in fault_workers), 30, "the refusal log line")
    assert not marker.exists()
    # and the workers still serve
    good = write_batch(tmp_path, "after-pickle", ["still serving"])
    assert cli(["submit", str(good), "--watch"], env).returncode == 0, logs[-2000:]


def test_a_worker_that_cannot_load_its_model_exits_non_zero(env: dict[str, str]) -> None:
    result = subprocess.run([sys.executable, "-m", "producer", "worker", "--model", BROKEN, "--device", "cpu",
                             "--hostname", "broken@tests"], env={**os.environ, **env}, cwd=ROOT,
                            capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 3
    assert f"cannot load model '{BROKEN}'" in result.stderr


def test_a_worker_that_keeps_failing_while_peers_succeed_blocks_itself(
        tmp_path: Path, fault_workers: list[WorkerProcess], start_worker: Callable[..., WorkerProcess],
        env: dict[str, str], board: ProgressBoard, registry: Registry) -> None:
    from worker.testing import write_tiny_model

    # a node whose copy of the model differs from the registry's (other weights under the same name)
    other = write_tiny_model(tmp_path / "other-weights", seed=1)
    (tmp_path / "models.yaml").write_text(f"models:\n  {FAULTS}:\n    path: {other}\n")
    # a threshold of 1: whether the bad worker wins one chunk or several from its two peers is a race
    # (2 failed in 2 of 4 fresh-clone runs); a later peer success then blocks it at its next heartbeat
    bad = start_worker("fault-bad", model=FAULTS, extra_env={
        "SDFARM_MODELS_FILE": str(tmp_path / "models.yaml"), "SDFARM_BLOCK_AFTER_FAILURES": "1"})
    try:
        path = write_batch(tmp_path, "bad-node", [f"bad node {i}" for i in range(24)], steps=30)
        plan = plan_file(path, registry, 100)
        assert cli(["submit", str(path), "--watch"], env).returncode == 0  # no job failed
        assert progress_of(board, plan.batch_id) == (24, 0)
        blocked = wait_for(lambda: board.r.hget(f"sdfarm:worker:{bad.hostname}", "blocked"), 30,
                           "the bad worker to block itself")
        assert b"failures in a row while fault-" in blocked
        assert b"model mismatch" in blocked
        shown = cli(["workers"], env)
        assert "BLOCKED" in shown.stdout
        assert "fault-bad@tests" in shown.stdout
    finally:
        bad.stop()


def test_a_job_whose_image_is_nan_fails_alone_and_its_chunk_mates_are_stored(
        tmp_path: Path, fault_workers: list[WorkerProcess], store: Store, board: ProgressBoard,
        registry: Registry, celery_app: Any) -> None:
    # a chunk queued before weights were bounded at submit: one job's weight is infinity in float32
    path = write_batch(tmp_path, "one-nan", [f"a calm sea {i}" for i in range(4)])
    plan = plan_file(path, registry, 10)
    absurd = RenderJob.model_validate({**plan.jobs[1].model_dump(), "prompt": "a (boat:1" + "0" * 45 + ")"},
                                      context=RECORDED)
    submit_plan(dataclasses.replace(plan, jobs=(plan.jobs[0], absurd, *plan.jobs[2:])), store, celery_app, board, 4)
    wait_for(lambda: progress_of(board, plan.batch_id) == (3, 1), 120, "three jobs done and one failed")
    assert "NaN or infinite latents" in store.get_json(failed_key(plan.batch_id, absurd.id))["reason"]
    for job in (plan.jobs[0], *plan.jobs[2:]):
        assert store.exists(sidecar_key(job.id))
    assert not store.exists(image_key(absurd.id))


def test_retry_enqueues_failed_jobs_one_per_chunk(
        tmp_path: Path, env: dict[str, str], store: Store, board: ProgressBoard, registry: Registry,
        redis_client: Any) -> None:
    """Jobs that failed together (the whole chunk, as one NaN job used to make it) are retried each in
    a chunk of its own, so one that fails again fails alone. No worker serves IDLE: the queue shows it."""
    path = tmp_path / "failed-together.yaml"
    path.write_text(f"defaults: {{model: {IDLE}, width: 64, height: 64}}\n"
                    "items: [failed together 0, failed together 1, failed together 2]\n")
    plan = plan_file(path, registry, 10)
    record_batch(plan, store, board)
    for index, job in enumerate(plan.jobs):  # as a worker records a failure
        store.put_json(failed_key(plan.batch_id, job.id), {"job_id": job.id, "index": index, "reason": "NaN"})
        board.mark_failed(plan.batch_id, index)
    assert "3 failed jobs enqueued again" in cli(["retry", plan.batch_id], env).stdout
    messages = [m for m in queued_messages(redis_client, IDLE) if m["batch_id"] == plan.batch_id]
    assert sorted(len(m["entries"]) for m in messages) == [1, 1, 1]


def queued_messages(r: Any, model: str) -> list[dict[str, Any]]:
    """The chunk messages waiting in a model's queues, decoded as a worker decodes them."""
    bodies = [json.loads(raw)["body"] for key in r.scan_iter(f"{queue_name(model)}*") for raw in r.lrange(key, 0, -1)]
    return [json.loads(base64.b64decode(body))[0][0] for body in bodies]


def worker_health(workers: list[WorkerProcess], board: ProgressBoard) -> list[tuple[bytes | None, bytes | None]]:
    return [tuple(board.r.hmget(f"sdfarm:worker:{w.hostname}", "failure_streak", "blocked"))  # type: ignore[misc]
            for w in workers]


def test_a_malformed_message_is_dead_lettered_once_with_its_reason(
        fault_workers: list[WorkerProcess], store: Store, board: ProgressBoard, celery_app: Any) -> None:
    garbage = {"schema_version": 999, "batch_id": "not hex", "entries": "garbage"}
    task_id = f"garbage-{uuid.uuid4().hex}"
    health = worker_health(fault_workers, board)
    celery_app.send_task("sdfarm.render_chunk", args=[garbage], queue=queue_name(FAULTS), task_id=task_id)
    key = dead_letter_key(message_digest(task_id, garbage))
    record = wait_for(lambda: store.exists(key) and store.get_json(key), 60, "the message to be dead-lettered")
    assert record["reason"].startswith("malformed chunk message: batch_id: String should match pattern")
    assert "entries: Input should be a valid tuple" in record["reason"]
    assert json.loads(record["message"]) == garbage
    wait_for(lambda: idle(fault_workers, board), 30, "the message to be acknowledged")
    assert not board.r.exists(f"sdfarm:handbacks:{message_digest(task_id, garbage)}")  # never handed back
    assert worker_health(fault_workers, board) == health


def test_a_newer_schema_message_is_handed_back_at_most_ten_times_then_dead_lettered(
        tmp_path: Path, fault_workers: list[WorkerProcess], store: Store, board: ProgressBoard,
        registry: Registry, celery_app: Any) -> None:
    """Well-formed but for a field this worker does not know, from a producer two versions ahead:
    handed back for an upgraded worker (none comes), counted per message, never against the workers."""
    plan = plan_file(write_batch(tmp_path, "from-the-future", ["a message from the future"]), registry, 10)
    message = next(make_chunks(plan.batch_id, enumerate(plan.jobs), 4)).message()
    message["schema_version"] = SCHEMA_VERSION + 2
    message["entries"][0]["job"]["a_field_from_the_future"] = True
    task_id = f"future-{uuid.uuid4().hex}"
    health = worker_health(fault_workers, board)
    celery_app.send_task("sdfarm.render_chunk", args=[message], queue=queue_name(FAULTS), task_id=task_id)
    key = dead_letter_key(message_digest(task_id, message))
    record = wait_for(lambda: store.exists(key) and store.get_json(key), 90, "the message to be dead-lettered")
    assert record["reason"] == (f"handed back 10 times, no worker took it: chunk schema version {SCHEMA_VERSION + 2}"
                                f" is newer than this worker's {SCHEMA_VERSION}: upgrade it")
    assert int(board.r.get(f"sdfarm:handbacks:{message_digest(task_id, message)}")) == 11
    wait_for(lambda: idle(fault_workers, board), 30, "the message to be acknowledged")
    assert worker_health(fault_workers, board) == health  # no failure counted, nobody blocked
    assert progress_of(board, plan.batch_id) == (0, 0)
