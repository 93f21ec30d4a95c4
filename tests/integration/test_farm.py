"""The farm end to end: real Redis, real S3, real `sdfarm worker` processes rendering the tiny model."""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdfarm.batchfile import BatchPlan, plan_file
from sdfarm.infotext import parse_infotext
from sdfarm.layout import image_key, sidecar_key
from sdfarm.models import Registry
from sdfarm.progress import ProgressBoard
from sdfarm.store import Store
from tests.conftest import TINY, VICTIM, WorkerProcess, cli, wait_for
from worker.pipeline import load_model
from worker.render import render

PROMPTS = [
    "a lighthouse at dusk", "a red fox in snow", "an astronaut on a horse", "a bowl of ramen",
    "a neon street market", "a watercolor island map", "a cat in a reading nook", "a steam locomotive",
    "a bonsai tree", "glass towers at sunrise", "an origami owl", "a castle in the clouds",
]


@pytest.fixture(scope="module")
def two_workers(start_worker: Callable[..., WorkerProcess]) -> list[WorkerProcess]:
    return [start_worker("farm-a"), start_worker("farm-b")]


def batch_file(tmp_path: Path, name: str, model: str, prompts: list[str], steps: int = 6) -> Path:
    lines = [f"name: {name}", "seed: 4242",
             f"defaults: {{model: {model}, width: 64, height: 64, steps: {steps}, negative_prompt: blurry}}",
             "items:"] + [f"  - {json.dumps(p)}" for p in prompts]
    path = tmp_path / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def rendered_lines(workers: list[WorkerProcess]) -> int:
    return sum(w.tail(10**9).count("outcome=rendered") for w in workers)


def finished(board: ProgressBoard, batch_id: str) -> bool:
    p = board.read(batch_id)
    return p is not None and p.finished


def assert_one_png_and_sidecar_per_job(store: Store, plan: BatchPlan) -> None:
    keys = set(store.keys("renders/"))
    for job in plan.jobs:
        assert image_key(job.id) in keys
        assert sidecar_key(job.id) in keys
        png = store.get(image_key(job.id))
        meta = store.get_json(sidecar_key(job.id))
        assert meta["image"]["sha256"] == hashlib.sha256(png).hexdigest()  # the sidecar describes this PNG
        assert meta["job"] == job.model_dump(mode="json")


def test_batch_of_twelve_lands_in_s3_with_full_metadata(
        tmp_path: Path, two_workers: list[WorkerProcess], env: dict[str, str], store: Store, board: ProgressBoard,
        registry: Registry) -> None:
    path = batch_file(tmp_path, "twelve", TINY, PROMPTS)
    plan = plan_file(path, registry, 100)
    result = cli(["submit", str(path), "--watch"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"batch {plan.batch_id}: all 12 jobs done" in result.stdout

    assert_one_png_and_sidecar_per_job(store, plan)
    hostnames = set()
    for index, job in enumerate(plan.jobs):
        meta = store.get_json(sidecar_key(job.id))
        assert (meta["job_id"], meta["batch_id"], meta["index"], meta["seed"]) == (job.id, plan.batch_id, index,
                                                                                   job.seed)
        assert meta["model"] == {"name": TINY, "sha256": job.model_hash, "hash": job.model_hash[:10]}
        assert set(meta["versions"]) >= {"torch", "diffusers", "transformers", "sdfarm"}
        assert meta["timings"]["render_s_per_image"] > 0
        hostnames.add(meta["worker"]["hostname"])
        with Image.open(io.BytesIO(store.get(image_key(job.id)))) as img:
            assert img.size == (64, 64)
            info = parse_infotext(img.text["parameters"])  # type: ignore[attr-defined]
            embedded = json.loads(img.text["sdfarm"])  # type: ignore[attr-defined]
        assert (info["Prompt"], info["Negative prompt"], info["Seed"]) == (job.prompt, "blurry", str(job.seed))
        assert (info["Steps"], info["Sampler"], info["Model"]) == ("6", job.sampler, TINY)
        assert info["Model hash"] == job.model_hash[:10]
        assert embedded["id"] == job.id
    assert hostnames <= {w.hostname for w in two_workers}
    progress = board.read(plan.batch_id)
    assert progress is not None
    assert (progress.done, progress.failed, progress.rendered) == (12, 0, 12)

    # fetch: images, sidecars and a manifest; a contact sheet
    out = tmp_path / "fetched"
    result = cli(["fetch", plan.batch_id, str(out), "--contact-sheet", str(tmp_path / "sheet.png")], env)
    assert result.returncode == 0, result.stderr
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["status"] for m in manifest] == ["done"] * 12
    assert len(list(out.glob("*.png"))) == 12
    assert len(list(out.glob("*.json"))) == 12
    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.size[0] >= 8 * 64

    status = cli(["status"], env)
    assert plan.batch_id in status.stdout


def test_resubmitting_renders_nothing(
        tmp_path: Path, two_workers: list[WorkerProcess], env: dict[str, str], store: Store, board: ProgressBoard,
        registry: Registry, redis_client: object) -> None:
    path = batch_file(tmp_path, "again", TINY, PROMPTS[:8])
    plan = plan_file(path, registry, 100)
    assert cli(["submit", str(path), "--watch"], env).returncode == 0
    lines_before = rendered_lines(two_workers)
    created = {j.id: store.get_json(sidecar_key(j.id))["created_at"] for j in plan.jobs}

    # same file again: every job is known done, nothing is enqueued
    again = cli(["submit", str(path), "--watch"], env)
    assert again.returncode == 0, again.stderr
    assert "0 chunks enqueued, 8 already done" in again.stdout

    # live progress lost (Redis flushed of it): chunks are enqueued, workers skip every job by its sidecar
    board.r.delete(f"sdfarm:batch:{plan.batch_id}:done", f"sdfarm:batch:{plan.batch_id}")
    third = cli(["submit", str(path), "--watch"], env)
    assert third.returncode == 0, third.stderr
    assert "2 chunks enqueued, 0 already done" in third.stdout
    progress = board.read(plan.batch_id)
    assert progress is not None
    assert (progress.done, progress.rendered) == (8, 0)
    assert rendered_lines(two_workers) == lines_before  # zero images rendered
    assert {j.id: store.get_json(sidecar_key(j.id))["created_at"] for j in plan.jobs} == created


def test_a_job_gives_the_same_image_alone_and_in_a_chunk(
        tmp_path: Path, two_workers: list[WorkerProcess], env: dict[str, str], store: Store,
        registry: Registry) -> None:
    path = batch_file(tmp_path, "chunked", TINY, ["one", "two", "three", "four"])
    plan = plan_file(path, registry, 100)
    assert cli(["submit", str(path), "--watch"], env).returncode == 0
    target = plan.jobs[2]
    assert store.get_json(sidecar_key(target.id))["timings"]["chunk_size"] == 4  # rode in a chunk of 4
    with Image.open(io.BytesIO(store.get(image_key(target.id)))) as img:
        from_farm = np.asarray(img.convert("RGB")).astype(np.int16)
    alone = render(load_model(registry, TINY, "cpu"), [target])[0]  # this process, chunk of one
    assert np.abs(from_farm - np.asarray(alone).astype(np.int16)).max() <= 2


def test_reproduce_renders_a_stored_image_again_from_its_sidecar(
        tmp_path: Path, two_workers: list[WorkerProcess], env: dict[str, str], registry: Registry) -> None:
    path = batch_file(tmp_path, "again-from-sidecar", TINY, ["a weathered signpost in fog"])
    job = plan_file(path, registry, 100).jobs[0]
    assert cli(["submit", str(path), "--watch"], env).returncode == 0
    out = tmp_path / "again.png"
    result = cli(["reproduce", image_key(job.id), "--out", str(out)], env, timeout_s=300)
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"max difference (\d+)/255", result.stdout)
    assert found is not None, result.stdout
    assert int(found.group(1)) <= 2  # this machine's CPU, as the workers' (tests/unit: same image alone or in a chunk)
    assert f"job {job.id}: rendered again on cpu (stored by farm-" in result.stdout
    with Image.open(out) as again:
        assert again.size == (64, 64)
    missing = cli(["reproduce", "0" * 32], env)
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr
    nonsense = cli(["reproduce", "renders/not-a-job.png"], env)
    assert (nonsense.returncode, nonsense.stderr.strip()) == (
        2, "error: 'renders/not-a-job.png' names no job (expected a job id, or renders/<job id>.png)")


def test_a_worker_killed_mid_chunk_loses_nothing(
        tmp_path: Path, start_worker: Callable[..., WorkerProcess], env: dict[str, str], store: Store,
        board: ProgressBoard, registry: Registry) -> None:
    victim = start_worker("victim", model=VICTIM)
    path = batch_file(tmp_path, "killed", VICTIM, [f"kill test {i}" for i in range(8)], steps=150)
    plan = plan_file(path, registry, 100)
    assert cli(["submit", str(path)], env).returncode == 0
    wait_for(victim.busy_with, 60, "the victim to start a chunk", interval_s=0.02)
    victim.kill()
    rescuer = start_worker("rescuer", model=VICTIM)
    wait_for(lambda: finished(board, plan.batch_id), 240, "the rescuer to finish the batch")
    progress = board.read(plan.batch_id)
    assert progress is not None
    assert (progress.done, progress.failed) == (8, 0)
    assert_one_png_and_sidecar_per_job(store, plan)
    assert "outcome=rendered" in rescuer.tail(10**9)
