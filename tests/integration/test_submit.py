"""Submitting: validation is all or nothing; the record lands in S3 before anything is enqueued."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.submit import submit_plan
from sdfarm.batchfile import plan_file
from sdfarm.errors import TransientError
from sdfarm.layout import batch_key, jobs_key
from sdfarm.models import Registry
from sdfarm.progress import ProgressBoard
from sdfarm.settings import Settings
from sdfarm.store import Store
from tests.conftest import IDLE, cli


def snapshot(r: redis.Redis, store: Store) -> tuple[dict[str, Any], list[str]]:
    """Every Redis key with its content (heartbeats aside) and every object key in the bucket."""
    keys: dict[str, Any] = {}
    for raw in r.scan_iter("*"):
        key = raw.decode()
        if not key.startswith("sdfarm:worker:"):
            keys[key] = r.dump(key)
    return keys, sorted(store.keys(""))


def queued(r: redis.Redis, model: str) -> int:
    return sum(int(r.llen(k)) for k in r.scan_iter(f"render.{model}*"))  # type: ignore[arg-type]


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
