"""Submitting: validation is all or nothing; the record lands in S3 before anything is enqueued."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.submit import jobs_jsonl, submit_plan
from sdfarm.batchfile import plan_file
from sdfarm.errors import TransientError
from sdfarm.jobs import make_chunks
from sdfarm.layout import batch_key, jobs_key
from sdfarm.models import Registry
from sdfarm.progress import ProgressBoard
from sdfarm.queue import RENDER_TASK, ChunkSender, broker_priority, entry_json, queue_name
from sdfarm.settings import Settings
from sdfarm.store import Store
from tests.conftest import IDLE, cli


def snapshot(r: redis.Redis, store: Store) -> tuple[dict[str, Any], list[str]]:
    """Every Redis key with its content and every object key in the bucket; aside: the heartbeats
    and kombu's unacked_mutex, which live workers' restore sweeps take and drop every second."""
    keys: dict[str, Any] = {}
    for raw in r.scan_iter("*"):
        key = raw.decode()
        if not key.startswith("sdfarm:worker:") and key != "unacked_mutex":
            keys[key] = r.dump(key)
    return keys, sorted(store.keys(""))


def queued(r: redis.Redis, model: str) -> int:
    return sum(int(r.llen(k)) for k in r.scan_iter(f"render.{model}*"))


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_invalid_batch_changes_nothing_and_names_every_problem(
        tmp_path: Path, env: dict[str, str], redis_client: redis.Redis, store: Store) -> None:
    batch = write(tmp_path, "bad.yaml", f"""defaults: {{model: {IDLE}}}
items:
  - a fine prompt
  - {{prompt: b, width: 100}}
  - {{prompt: c, model: ../../etc/passwd}}
""")
    before = snapshot(redis_client, store)
    result = cli(["submit", str(batch)], env)
    assert result.returncode == 2
    assert f"{batch}:4: item 2: width: 100 is not allowed" in result.stderr
    assert f"{batch}:5: item 3: model: unknown model '../../etc/passwd'" in result.stderr
    assert "nothing was enqueued" in result.stderr
    assert snapshot(redis_client, store) == before


def test_dry_run_prints_the_plan_and_enqueues_nothing(
        tmp_path: Path, env: dict[str, str], redis_client: redis.Redis, store: Store) -> None:
    batch = write(tmp_path, "dry.yaml", f"defaults: {{model: {IDLE}, width: 64, height: 64}}\n"
                                        "items: [{prompt: a, count: 5}, {prompt: b, width: 128}]\n")
    before = snapshot(redis_client, store)
    result = cli(["submit", str(batch), "--dry-run"], env)
    assert result.returncode == 0, result.stderr
    assert "6 jobs, 3 chunks of up to 4" in result.stdout
    assert f"{IDLE}" in result.stdout
    assert "64x64" in result.stdout
    assert "128x64" in result.stdout
    assert "nothing enqueued" in result.stdout
    assert snapshot(redis_client, store) == before


def test_submit_writes_the_record_then_enqueues_json_chunks(
        tmp_path: Path, env: dict[str, str], redis_client: redis.Redis, store: Store, registry: Registry) -> None:
    batch = write(tmp_path, "idle.yaml", f"defaults: {{model: {IDLE}, width: 64, height: 64}}\n"
                                         "items: [{prompt: queued only, count: 6}]\n")
    before = queued(redis_client, IDLE)
    result = cli(["submit", str(batch), "--priority", "7"], env)
    assert result.returncode == 0, result.stderr
    plan = plan_file(batch, registry, 100)
    assert f"batch {plan.batch_id}: 6 jobs, 2 chunks enqueued" in result.stdout
    spec = store.get_json(batch_key(plan.batch_id))
    assert spec["job_count"] == 6
    assert spec["models"] == {IDLE: registry.identity(IDLE)}
    lines = store.get(jobs_key(plan.batch_id)).decode().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [j.id for j in plan.jobs]
    assert queued(redis_client, IDLE) == before + 2
    message = json.loads(redis_client.lindex(next(redis_client.scan_iter(f"render.{IDLE}*")), 0))  # type: ignore[arg-type]
    assert message["content-type"] == "application/json"
    assert message["headers"]["task"] == "sdfarm.render_chunk"


def test_nothing_is_enqueued_when_s3_cannot_take_the_record(
        tmp_path: Path, settings: Settings, redis_client: redis.Redis, registry: Registry, celery_app: Any,
        board: ProgressBoard) -> None:
    batch = write(tmp_path, "nos3.yaml", f"defaults: {{model: {IDLE}}}\nitems: [{{prompt: never queued}}]\n")
    plan = plan_file(batch, registry, 100)
    dead = Store.from_settings(settings.model_copy(update={"s3_endpoint_url": "http://127.0.0.1:9",
                                                           "s3_max_attempts": 1}))
    before = queued(redis_client, IDLE)
    with pytest.raises(TransientError, match="S3"):
        submit_plan(plan, dead, celery_app, board, chunk_size=4)
    assert queued(redis_client, IDLE) == before
    assert board.read(plan.batch_id) is None


def batch_messages(r: redis.Redis, model: str, batch_id: str) -> list[dict[str, Any]]:
    """The chunk messages of one batch waiting in a model's queues, decoded as a worker decodes them."""
    found = []
    for key in r.scan_iter(f"render.{model}*"):
        for raw in r.lrange(key, 0, -1):
            args, _kwargs, _embed = json.loads(base64.b64decode(json.loads(raw)["body"]))
            if args[0]["batch_id"] == batch_id:
                found.append(args[0])
    return found


def without_ids(raw: bytes, message: dict[str, Any]) -> str:
    return raw.decode().replace(message["headers"]["id"], "TASK-ID").replace(
        message["properties"]["delivery_tag"], "DELIVERY-TAG")


def test_chunks_go_out_as_send_task_sent_them(
        tmp_path: Path, redis_client: redis.Redis, registry: Registry, celery_app: Any) -> None:
    batch = write(tmp_path, "same.yaml", f"defaults: {{model: {IDLE}, width: 64, height: 64}}\n"
                                         "items: [{prompt: 'ünïcode ☃ \"quoted\"', count: 6}]\n")
    plan = plan_file(batch, registry, 100)
    model = "tiny-compare"  # a queue of this test's own
    level = broker_priority(7)
    for chunk in make_chunks(plan.batch_id, enumerate(plan.jobs), 4):  # a full chunk, then a tail
        celery_app.send_task(RENDER_TASK, args=[chunk.message()], queue=queue_name(model), priority=level,
                             ignore_result=True)  # how every chunk was sent before
        with ChunkSender(celery_app, 7) as sender:
            sender.send(model, chunk.batch_id, [entry_json(e.index, e.job) for e in chunk.entries],
                        chunk.message()["schema_version"])
        key = f"{queue_name(model)}:{level}"
        assert list(redis_client.scan_iter(f"{queue_name(model)}*")) == [key.encode()]
        before, fast = (redis_client.rpop(key) for _ in range(2))  # LPUSHed: the oldest is on the right
        assert isinstance(before, bytes)
        assert isinstance(fast, bytes)
        assert redis_client.llen(key) == 0
        old, new = json.loads(before), json.loads(fast)
        assert base64.b64decode(new["body"]) == base64.b64decode(old["body"])  # byte for byte
        assert old["headers"]["id"] != new["headers"]["id"]
        # every header and property, in the same order, but the task id and delivery tag (fresh uuids)
        assert without_ids(fast, new) == without_ids(before, old)


def test_a_resubmitted_batch_enqueues_only_what_is_not_done(
        tmp_path: Path, env: dict[str, str], redis_client: redis.Redis, store: Store, registry: Registry,
        board: ProgressBoard) -> None:
    batch = write(tmp_path, "again.yaml", f"defaults: {{model: {IDLE}, width: 64, height: 64}}\n"
                                          "items: [{prompt: resubmitted, count: 10}]\n")
    plan = plan_file(batch, registry, 100)
    first = cli(["submit", str(batch)], env)
    assert first.returncode == 0, first.stderr
    assert f"batch {plan.batch_id}: 10 jobs, 3 chunks enqueued, 0 already done" in first.stdout
    assert store.get(jobs_key(plan.batch_id)) == jobs_jsonl(plan)  # streamed, as the in-memory record was
    for index in (0, 1, 2, 3, 7):
        board.mark_done(plan.batch_id, index, rendered=True)
    second = cli(["submit", str(batch)], env)
    assert second.returncode == 0, second.stderr
    assert f"batch {plan.batch_id}: 10 jobs, 2 chunks enqueued, 5 already done" in second.stdout
    chunks = sorted([e["index"] for e in m["entries"]] for m in batch_messages(redis_client, IDLE, plan.batch_id))
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 8], [8, 9], [9]]
