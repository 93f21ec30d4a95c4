"""A dataset run end to end, its backfill, and exports read back with the libraries trainers use."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sdfarm.store import Store
from tests.conftest import TINY, WorkerProcess, cli

SPEC = f"""name: tiny-animals
templates: ["a photo of a {{animal}} in {{place}}"]
wildcards:
  animal: [cat, dog, fox]
  place: [a forest, a city]
images_per_run: 6
render: {{model: {TINY}, width: 64, height: 64, steps: 4}}
output_prefix: exports/tiny-animals
schedule: {{cron: "0 3 * * *", timezone: Europe/Berlin}}
"""


@pytest.fixture(scope="module")
def dataset_worker(start_worker: Callable[..., WorkerProcess]) -> Iterator[WorkerProcess]:
    worker = start_worker("datasets")
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def batch_id(dataset_worker: WorkerProcess, env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("specs")
    (folder / "tiny-animals.yaml").write_text(SPEC)
    first = cli(["dataset", "run", str(folder / "tiny-animals.yaml"), "--date", "2026-11-20", "--watch"], env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "6 jobs, 2 chunks enqueued, 0 already done" in first.stdout
    # backfilling a date that already ran renders nothing
    again = cli(["dataset", "run", str(folder / "tiny-animals.yaml"), "--date", "2026-11-20"], env)
    assert "0 chunks enqueued, 6 already done" in again.stdout
    listed = cli(["dataset", "list", str(folder)], env)
    assert "2026-11-20" in listed.stdout
    assert "6/6 done" in listed.stdout
    assert "0 3 * * * Europe/Berlin" in listed.stdout
    return first.stdout.split("batch ")[1].split(":")[0]


def test_imagefolder_loads_with_datasets(batch_id: str, env: dict[str, str], tmp_path: Path) -> None:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    from datasets import load_dataset

    out = cli(["export", batch_id, str(tmp_path / "if"), "--format", "imagefolder"], env)
    assert out.returncode == 0, out.stderr
    ds = load_dataset("imagefolder", data_dir=str(tmp_path / "if"), split="train")
    assert len(ds) == 6
    row = ds[0]
    assert row["image"].size == (64, 64)
    assert row["prompt"].startswith("a photo of a ")
    assert {"seed", "sampler", "model_hash", "job_id", "infotext"} <= set(ds.column_names)


def test_webdataset_shards_iterate(batch_id: str, env: dict[str, str], tmp_path: Path) -> None:
    import webdataset as wds

    out = cli(["export", batch_id, str(tmp_path / "wds"), "--format", "webdataset", "--shard-size", "4"], env)
    assert out.returncode == 0, out.stderr
    shards = sorted(str(p) for p in (tmp_path / "wds").glob("shard-*.tar"))
    assert len(shards) == 2
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
    assert len(samples) == 6
    assert samples[0]["png"].size == (64, 64)
    assert samples[0]["json"]["job_id"] in samples[0]["__key__"]


def test_parquet_manifest_reads_with_pyarrow_and_matches_s3(batch_id: str, env: dict[str, str], tmp_path: Path,
                                                          store: Store) -> None:
    import pyarrow.parquet as pq

    out = cli(["export", batch_id, f"s3://{store.bucket}/exports/{batch_id}", "--format", "parquet"], env)
    assert out.returncode == 0, out.stderr
    (tmp_path / "m.parquet").write_bytes(store.get(f"exports/{batch_id}/manifest.parquet"))
    table = pq.read_table(tmp_path / "m.parquet").to_pylist()
    assert len(table) == 6
    for row in table:
        sidecar = store.get_json(f"renders/{row['job_id']}.json")
        assert row["image_sha256"] == sidecar["image"]["sha256"]
        assert row["seed"] == sidecar["seed"]
        assert json.loads(json.dumps(row["prompt"])) == sidecar["job"]["prompt"]
