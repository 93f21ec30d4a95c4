"""Render features on the farm: LoRAs fetched from S3 and verified, embeddings, hires fix, through
real `sdfarm worker` processes; a tampered LoRA fails its job with the reason, the worker serves on."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from sdfarm.batchfile import plan_file
from sdfarm.infotext import parse_infotext
from sdfarm.layout import failed_key, image_key, sidecar_key
from sdfarm.models import Registry
from sdfarm.store import Store
from tests.conftest import FEATURES, WorkerProcess, cli, sha256_of


@pytest.fixture(scope="module")
def feature_worker(start_worker: Callable[..., WorkerProcess], store: Store, tiny_assets: dict[str, Path]
                   ) -> WorkerProcess:
    good = tiny_assets["tiny-detail"].read_bytes()
    store.client.put_object(Bucket=store.bucket, Key="models/loras/detail.safetensors", Body=good)
    # a LoRA file, but not the one whose sha256 the registry names for this key
    store.client.put_object(Bucket=store.bucket, Key="models/loras/tampered.safetensors", Body=good)
    return start_worker("features", model=FEATURES)


def write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nseed: 5\ndefaults: {{model: {FEATURES}, width: 64, height: 64, steps: 4}}\n"
                    + body)
    return path


def test_loras_embeddings_and_hires_render_on_the_farm(tmp_path: Path, feature_worker: WorkerProcess,
                                                      env: dict[str, str], store: Store, registry: Registry,
                                                      tiny_assets: dict[str, Path]) -> None:
    path = write(tmp_path, "features", """items:
  - prompt: a fox <lora:s3-detail:0.7>, tiny-sparkle
  - {prompt: a fox, loras: ["s3-detail:0.7", "tiny-grain:0.5"]}
  - {prompt: "a (fox:1.2) BREAK in snow", hires: {scale: 2, steps: 2, denoising_strength: 0.5}}
  - {prompt: a fox, upscale: {factor: 2}}
""")
    plan = plan_file(path, registry, 100)
    result = cli(["submit", str(path), "--watch"], env)
    assert result.returncode == 0, result.stdout + result.stderr + feature_worker.tail()

    images = {job.id: Image.open(io.BytesIO(store.get(image_key(job.id)))) for job in plan.jobs}
    first, second, hires, upscaled = (images[j.id] for j in plan.jobs)
    info = parse_infotext(first.text["parameters"])
    detail = sha256_of(tiny_assets["tiny-detail"])[:12]
    assert info["Lora hashes"] == f"s3-detail: {detail}"
    assert info["TI hashes"] == f"tiny-sparkle: {sha256_of(tiny_assets['tiny-sparkle'])[:12]}"
    assert parse_infotext(second.text["parameters"])["Prompt"] == "a fox <lora:s3-detail:0.7> <lora:tiny-grain:0.5>"
    assert hires.size == (128, 128)
    assert parse_infotext(hires.text["parameters"])["Hires upscale"] == "2"
    assert upscaled.size == (128, 128)
    meta = store.get_json(sidecar_key(plan.jobs[1].id))
    assert [x["name"] for x in meta["loras"]] == ["s3-detail", "tiny-grain"]
    assert (meta["image"]["width"], meta["image"]["height"]) == (64, 64)
    # the S3 LoRA was downloaded once into the worker's cache, verified, and reused
    assert feature_worker.tail(10**9).count("lora s3-detail fetched from s3://") == 1


def test_a_tampered_lora_fails_its_job_with_the_reason_and_the_worker_serves_on(
        tmp_path: Path, feature_worker: WorkerProcess, env: dict[str, str], store: Store,
        registry: Registry) -> None:
    path = write(tmp_path, "tampered", """items:
  - {prompt: a fox, loras: [s3-tampered]}
  - a fox without LoRAs
""")
    plan = plan_file(path, registry, 100)
    watched = cli(["submit", str(path), "--watch"], env)
    assert watched.returncode == 1
    bad, good = plan.jobs
    reason = store.get_json(failed_key(plan.batch_id, bad.id))["reason"]
    assert "lora 's3-tampered': s3://" in reason
    assert "models/loras/tampered.safetensors has sha256" in reason
    assert "not loaded" in reason
    assert not store.exists(image_key(bad.id))
    assert store.exists(sidecar_key(good.id))  # the other chunk rendered
    assert feature_worker.proc.poll() is None
    again = write(tmp_path, "after-tampered", "items: [a later job]\n")
    assert cli(["submit", str(again), "--watch"], env).returncode == 0
