"""The streamed submit path gives exactly what the in-memory one gave: the same jobs and ids, the
same batch id, the same jobs.jsonl bytes, the same chunks and chunk messages (no services)."""

from __future__ import annotations

import hashlib
import io
import json
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest

from producer.submit import JobSpool, describe_plan, describe_stream, jobs_jsonl
from sdfarm.batchfile import plan_batch, stream_batch
from sdfarm.errors import BatchInvalid
from sdfarm.jobs import MAX_SEED, Chunk, RenderJob, SeedSweep, make_chunks
from sdfarm.models import HashCache, Registry, parse_registry
from sdfarm.queue import chunk_json, entry_json

HASH = "ab" * 32
BASE = {"model": "tiny-sd15", "model_hash": HASH, "prompt": "a red fox", "seed": 7, "width": 64, "height": 64,
        "steps": 8}
INIT = {"key": "inputs/a.png", "sha256": "01" * 32, "width": 64, "height": 64}
VARIANTS: list[dict[str, Any]] = [
    {},
    {"prompt": "ünïcode ☃ \"quoted\" \\ fox", "negative_prompt": "blurry, (bad:1.2)"},
    {"guidance_scale": 0, "sampler": "Euler a", "clip_skip": 2, "width": 2048, "height": 64},
    {"hires": {"scale": 2, "upscaler": "4x-Sharp", "upscaler_sha256": "07" * 32}},
    {"upscale": {"factor": 2}, "vae": {"name": "vae", "sha256": "0e" * 32},
     "embeddings": [{"name": "z", "sha256": "ef" * 32}, {"name": "a", "sha256": "ef" * 32}]},
    {"loras": [{"name": "b", "weight": 0.5, "sha256": "cd" * 32}, {"name": "a", "weight": 1, "sha256": "ef" * 32}]},
    {"init_image": INIT, "strength": 0.5, "mask_prompt": "sky", "mask_model": {"name": "clipseg", "sha256": "04" * 32},
     "mask_blur": 0},
]
BATCH = """name: pinned ☃
seed: 11
defaults: {model: tiny-sd15, width: 64, height: 64, steps: 8}
matrix: {guidance_scale: [5, 7.5]}
items:
  - {prompt: a fox, count: 3}
  - {prompt: a cat, seeds: [1, 4294967295]}
  - {prompt: seeded, seed: 100, count: 2, sampler: Euler a}
  - {prompt: swept, matrix: {seed: [5, 6]}}
"""


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    text = "models:\n  tiny-sd15:\n    hub: test/tiny\n    sha256: '" + "9" * 64 + "'\n"
    return Registry(parse_registry(text, "test", tmp_path), HashCache(tmp_path))


def spec_id(job: RenderJob) -> str:
    """The id as the job model defines it, computed from scratch."""
    payload = job.model_dump(mode="json", exclude_defaults=True, exclude={"model", "schema_version"})
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def test_ids_are_the_ones_jobs_always_had() -> None:
    # since schema 3 (sdfarm.jobs.RENDER_CHANGES) a job states the schedule "Automatic" resolves to:
    # these jobs render other pixels than before, so they have other ids (8be86016..., b34e3126...,
    # 4d2c14de... until then)
    assert RenderJob.model_validate(BASE).id == "acc9aeb05d24ba479c32770fb6f0a881"
    assert RenderJob.model_validate({**BASE, **VARIANTS[5], "prompt": "ünïcode ☃ fox", "seed": MAX_SEED,
                                     "hires": VARIANTS[3]["hires"]}).id == "da27cf3c52eded5f5a7f264f5337f763"
    assert RenderJob.model_validate({**BASE, "seed": 0, "init_image": INIT, "strength": 0.5}).id == \
        "d0158c1e8b230b2fffdcbe269b538582"


@pytest.mark.parametrize("changes", VARIANTS)
def test_a_seed_sweep_gives_the_jobs_validation_gives(changes: dict[str, Any]) -> None:
    first = RenderJob.model_validate({**BASE, **changes})
    assert (first.id, first.wire_json, first.record_json) == (  # caches filled before the copies are made
        spec_id(first), json.dumps(first.model_dump(mode="json", exclude_defaults=True)),
        json.dumps(first.model_dump(mode="json"), ensure_ascii=False))
    sweep = SeedSweep(first)
    for seed in (0, 1, 7, 123456789, MAX_SEED):
        copy, fresh = sweep.job(seed), RenderJob.model_validate({**BASE, **changes, "seed": seed})
        assert copy == fresh
        assert copy.model_fields_set == fresh.model_fields_set
        assert copy.id == fresh.id == spec_id(fresh)
        assert copy.wire == fresh.wire == fresh.model_dump(mode="json", exclude_defaults=True)
        assert copy.wire_json == json.dumps(fresh.model_dump(mode="json", exclude_defaults=True))
        assert copy.record_json == json.dumps(fresh.model_dump(mode="json"), ensure_ascii=False)
        assert copy.compat_key() == fresh.compat_key()
    assert (first.seed, first.id) == (7, spec_id(first))  # the first job is left as it was


def test_a_seed_sweep_replaces_every_cached_value_of_a_job() -> None:
    # a copy starts with the first job's cached values: SeedSweep.job must set each one anew
    cached = {name for name, value in vars(RenderJob).items() if isinstance(value, cached_property)}
    assert cached == {"id", "wire", "wire_json", "record_json"}


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, True, 3.0, "5"])
def test_a_seed_sweep_refuses_what_it_cannot_copy(seed: Any) -> None:
    with pytest.raises(ValueError, match="validate such a job in full"):
        SeedSweep(RenderJob.model_validate(BASE)).job(seed)


def test_a_streamed_batch_is_the_planned_batch(registry: Registry) -> None:
    plan = plan_batch(BATCH, "b.yaml", "yaml", registry, 100)
    assert plan.batch_id == "2e97a518391a21275cd2"  # the batch id it has had since schema 3 (53a0651f... before)
    assert (len(plan.jobs), plan.jobs[0].id, plan.jobs[-1].id) == (
        18, "b654ebef6369abaf95c48596cbeed4b8", "71b4b583f9af53404b4074332ccf498a")
    assert plan.batch_id == hashlib.sha256(json.dumps([plan.name, [j.id for j in plan.jobs]]).encode()).hexdigest()[:20]
    stream = stream_batch(BATCH, "b.yaml", "yaml", registry, 100)
    with pytest.raises(RuntimeError, match="once all its jobs have been read"):
        stream.record()
    jobs = list(stream)
    assert jobs == list(plan.jobs)
    assert [j.id for j in jobs] == [spec_id(j) for j in plan.jobs]
    record = stream.record()
    assert (record.batch_id, record.name, record.seed, record.job_count) == (plan.batch_id, plan.name, 11, 18)
    assert record.spec == plan.spec
    with pytest.raises(RuntimeError, match="read once"):
        list(stream)


def test_the_batch_id_hashes_every_job_id_beyond_one_buffer(registry: Registry) -> None:
    text = "defaults: {model: tiny-sd15}\nitems:\n" + "".join(f"  - {{prompt: p{i}, count: 1000}}\n" for i in range(5))
    plan = plan_batch(text, "big.yaml", "yaml", registry, 10_000)
    assert plan.batch_id == hashlib.sha256(json.dumps([plan.name, [j.id for j in plan.jobs]]).encode()).hexdigest()[:20]
    assert [j.id for j in plan.jobs[::997]] == [spec_id(j) for j in plan.jobs[::997]]


def test_an_invalid_streamed_batch_stops_giving_jobs_and_names_every_problem(registry: Registry) -> None:
    text = ("defaults: {model: tiny-sd15}\nitems:\n  - {prompt: fine, count: 3}\n  - {prompt: bad, width: 100}\n"
            "  - {prompt: fine again, count: 3}\n  - {prompt: also bad, steps: 0}\n")
    stream = stream_batch(text, "bad.yaml", "yaml", registry, 100)
    given: list[RenderJob] = []
    with pytest.raises(BatchInvalid) as caught:
        given.extend(stream)
    assert len(given) == 3  # the jobs before the first problem; nothing after it
    assert [(p.item, p.field) for p in caught.value.problems] == [(2, "width"), (4, "steps")]


def test_the_job_cap_counts_before_validating(registry: Registry) -> None:
    text = "defaults: {model: tiny-sd15}\nitems:\n  - {prompt: a, count: 5}\n  - {prompt: b, width: 100}\n"
    with pytest.raises(BatchInvalid) as caught:
        plan_batch(text, "cap.yaml", "yaml", registry, 5)
    assert [p.message for p in caught.value.problems] == [
        "the batch expands to more than 5 jobs (allowed: at most 5; the cap is SDFARM_MAX_JOBS_PER_BATCH)"]


def spool_of(jobs: list[RenderJob]) -> JobSpool:
    spool = JobSpool(io.BytesIO(), io.BytesIO())
    for job in jobs:
        spool.add(job)
    return spool


def test_the_spooled_jobs_jsonl_is_the_one_written_before(registry: Registry) -> None:
    plan = plan_batch(BATCH, "b.yaml", "yaml", registry, 100)
    jobs = list(plan.jobs) + [RenderJob.model_validate({**BASE, **v}) for v in VARIANTS]
    written = spool_of(jobs).jobs_file().read()
    before = "".join(json.dumps({"index": i, "id": j.id, "job": j.model_dump(mode="json")}, ensure_ascii=False) + "\n"
                     for i, j in enumerate(jobs)).encode()
    assert written == before
    assert jobs_jsonl(plan) == before[:len(jobs_jsonl(plan))]
    rows = [json.loads(line) for line in written.decode().splitlines()]  # as retry and reconcile read it
    assert [(r["index"], RenderJob.model_validate(r["job"])) for r in rows] == list(enumerate(jobs))


@pytest.mark.parametrize("size", [1, 3, 4, 64])
@pytest.mark.parametrize("done", [b"", b"\x00", b"\xa5\x01", b"\xff\xff\xff"])
def test_spooled_chunks_are_make_chunks_and_their_messages(size: int, done: bytes) -> None:
    jobs = [RenderJob.model_validate({**BASE, **VARIANTS[k % len(VARIANTS)], "seed": k}) for k in range(23)]
    bit = [bool(done[i // 8] & (0x80 >> i % 8)) if i // 8 < len(done) else False for i in range(len(jobs))]
    pending = [(i, j) for i, j in enumerate(jobs) if not bit[i]]
    expected: list[Chunk] = list(make_chunks("ab" * 10, pending, size))
    got = list(spool_of(jobs).chunks(size, done))
    assert [(m, len(e), v) for m, e, v in got] == [
        (c.model, len(c.entries), c.message()["schema_version"]) for c in expected]
    for (_, entries, version), chunk in zip(got, expected, strict=True):
        assert entries == [entry_json(e.index, e.job) for e in chunk.entries]
        assert chunk_json(chunk.batch_id, entries, version) == json.dumps(chunk.message())  # what send_task sent


def test_the_streamed_dry_run_reads_as_before(registry: Registry) -> None:
    for size in (1, 4, 8):
        assert describe_stream(stream_batch(BATCH, "b.yaml", "yaml", registry, 100), size) == \
            describe_plan(plan_batch(BATCH, "b.yaml", "yaml", registry, 100), size)
