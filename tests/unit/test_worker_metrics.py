"""A worker's own metrics (worker/metrics.py) as its pool child records them: queue wait, compile
seconds, and the LoRA and VAE switches and loads between chunks, counted by kind on the tiny SDXL
model as the worker prepares chunk after chunk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sdfarm.jobs import RenderJob
from sdfarm.models import Registry
from tests.conftest import SDXL
from worker.assets import AssetFiles
from worker.masks import MaskModels
from worker.metrics import SWAP_KINDS, WorkerMetrics
from worker.pipeline import load_model
from worker.render import prepare

MODEL = "sd15"


def sample(metrics: WorkerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"model": metrics.model, **labels})


def test_queue_wait_is_a_histogram_per_model_never_below_zero() -> None:
    metrics = WorkerMetrics(MODEL, "gpu0@node1")
    metrics.waited(42.0)
    metrics.waited(-3.0)  # the producer's clock ahead of this node's
    assert sample(metrics, "sdfarm_queue_wait_seconds_count") == 2
    assert sample(metrics, "sdfarm_queue_wait_seconds_sum") == 42.0
    assert sample(metrics, "sdfarm_queue_wait_seconds_bucket", le="1.0") == 1
    assert sample(metrics, "sdfarm_queue_wait_seconds_bucket", le="30.0") == 1
    assert sample(metrics, "sdfarm_queue_wait_seconds_bucket", le="60.0") == 2


def test_compile_seconds_only_for_a_compiled_model() -> None:
    compiled, eager = WorkerMetrics(MODEL, "a@n"), WorkerMetrics(MODEL, "b@n")
    compiled.loaded(95.0, True, 80.0)
    eager.loaded(4.0, False)
    assert sample(compiled, "sdfarm_model_compile_seconds") == 80.0
    assert sample(compiled, "sdfarm_model_load_seconds", compiled="true") == 95.0
    assert sample(eager, "sdfarm_model_compile_seconds") is None
    assert sample(eager, "sdfarm_model_load_seconds", compiled="false") == 4.0


def test_every_swap_kind_is_exported_from_the_start_and_no_other() -> None:
    metrics = WorkerMetrics(MODEL, "gpu0@node1")
    assert {kind: sample(metrics, "sdfarm_swaps_total", kind=kind) for kind in SWAP_KINDS} == dict.fromkeys(
        SWAP_KINDS, 0.0)
    with pytest.raises(ValueError, match="unknown swap kind 'embedding'"):
        metrics.swapped("embedding")


def test_lora_and_vae_switches_and_loads_between_chunks_are_counted_by_kind(registry: Registry,
                                                                            cache_dir: Path) -> None:
    loaded = load_model(registry, SDXL, "cpu")
    assets = AssetFiles(registry, None, cache_dir)
    masks = MaskModels(loaded.device)
    metrics = WorkerMetrics(SDXL, "xl@tests")
    loaded.count_swaps(metrics.swapped)

    def job(loras: dict[str, float] | None = None, vae: str | None = None) -> RenderJob:
        spec: dict[str, Any] = {
            "model": SDXL, "model_hash": loaded.identity, "prompt": "a fox", "seed": 1, "width": 64, "height": 64,
            "steps": 2, "loras": [{"name": n, "weight": w, "sha256": registry.asset_identity("lora", n)}
                                  for n, w in (loras or {}).items()]}
        if vae:
            spec["vae"] = {"name": vae, "sha256": registry.asset_identity("vae", vae)}
        return RenderJob.model_validate(spec)

    def counts() -> dict[str, float | None]:
        return {kind: sample(metrics, "sdfarm_swaps_total", kind=kind) for kind in SWAP_KINDS}

    chunks = [  # what each chunk adds to the counts
        (job(), {}),  # the model as loaded: nothing switched
        (job({"xl-detail": 1.0}), {"lora-load": 1, "lora": 1}),
        (job({"xl-detail": 1.0}), {}),  # the same set: kept as it is
        (job({"xl-detail": 0.5}), {"lora": 1}),  # a new weight: switched, nothing loaded
        (job({"xl-grain": 1.0}, vae="xl-vae"), {"lora-load": 1, "lora": 1, "vae-load": 1, "vae": 1}),
        (job(), {"lora": 1, "vae": 1}),  # LoRAs off, the model's own VAE back
        (job({"xl-detail": 1.0}, vae="xl-vae"), {"lora": 1, "vae": 1}),  # both still held: switched, not loaded
    ]
    expected = dict.fromkeys(SWAP_KINDS, 0.0)
    for n, (chunk, added) in enumerate(chunks):
        prepare(loaded, assets, masks, [chunk])
        for kind, count in added.items():
            expected[kind] += count
        assert counts() == expected, f"after chunk {n}"
