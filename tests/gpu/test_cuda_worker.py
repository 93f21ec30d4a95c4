"""Real `sdfarm worker --device cuda:0` processes against the embedded stack (one whose prefork
parent touched CUDA cannot start here): a batch renders end to end, and each sidecar says on which
device and whether through a compiled pipeline (SDFARM_COMPILE off for one worker, on for the other)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import redis
from PIL import Image

from sdfarm.batchfile import plan_file
from sdfarm.layout import image_key, sidecar_key, worker_key
from sdfarm.models import Registry
from sdfarm.settings import Settings
from sdfarm.store import Store
from tests.conftest import WorkerProcess, cli
from tests.gpu.conftest import CHUNK_MAX_DIFF, COMPILED, COMPILED_MEAN_DIFF, EAGER, differences
from worker.pipeline import load_model
from worker.render import render

# 6 jobs per worker at SDFARM_CHUNK_SIZE=4: a full chunk and a tail of 2 (padded by the compiled
# worker). Other seeds per model: a model's name is a label, not part of a job's id, so the same
# seeds under both names would be the same jobs (one object each).
SEEDS = {EAGER: [11, 12, 13, 14, 15, 16], COMPILED: [21, 22, 23, 24, 25, 26]}


def test_eager_and_compiled_workers_on_cuda_render_a_batch_end_to_end(
        tmp_path: Path, start_cuda_worker: Callable[[str, str, dict[str, str]], WorkerProcess],
        gpu_env: dict[str, str], store: Store, redis_client: redis.Redis,
        record_property: Callable[[str, object], None]) -> None:
    workers = {EAGER: start_cuda_worker("gpu-eager", EAGER, {"SDFARM_COMPILE": "0"}),
               COMPILED: start_cuda_worker("gpu-compiled", COMPILED, {"SDFARM_COMPILE": "1"})}
    for worker in workers.values():
        assert redis_client.hget(worker_key(worker.hostname), "device") == b"cuda:0"
    items = "".join(f"  - {{prompt: 'a lighthouse at dusk', model: {m}, seeds: {json.dumps(s)}}}\n"
                    for m, s in SEEDS.items())
    path = tmp_path / "gpu.yaml"
    path.write_text("name: gpu-tier\nseed: 4242\n"
                    f"defaults: {{width: 64, height: 64, steps: 6, negative_prompt: blurry}}\nitems:\n{items}")
    registry = Registry.from_settings(Settings.from_env(gpu_env))
    plan = plan_file(path, registry, 100)
    result = cli(["submit", str(path), "--watch"], gpu_env, timeout_s=600)
    assert result.returncode == 0, result.stdout + result.stderr + "".join(w.tail() for w in workers.values())
    assert f"batch {plan.batch_id}: all 12 jobs done" in result.stdout

    reference = load_model(registry, EAGER, "cuda", compile=False)  # each job alone, eager, in this process
    worst: dict[str, float] = {EAGER: 0, COMPILED: 0}
    for job in plan.jobs:
        meta = store.get_json(sidecar_key(job.id))
        assert meta["worker"]["hostname"] == workers[job.model].hostname
        assert meta["worker"]["device"] == "cuda:0"
        assert meta["worker"]["compiled"] is (job.model == COMPILED)
        with Image.open(io.BytesIO(store.get(image_key(job.id)))) as png:
            mean, most = differences(png.convert("RGB"), render(reference, [job])[0])
        worst[job.model] = max(worst[job.model], most if job.model == EAGER else mean)
    record_property("eager_worker_vs_alone_max_levels", worst[EAGER])
    record_property("compiled_worker_vs_eager_alone_mean_levels", round(worst[COMPILED], 3))
    assert worst[EAGER] <= CHUNK_MAX_DIFF  # the same job, the same image, in any chunk of any worker
    assert worst[COMPILED] <= COMPILED_MEAN_DIFF


def test_a_worker_asked_for_a_gpu_this_machine_lacks_exits_with_the_reason(gpu_env: dict[str, str]) -> None:
    import torch

    count = torch.cuda.device_count()
    result = cli(["worker", "--model", EAGER, "--device", f"cuda:{count}", "--hostname", "gpu-missing@gpu-tests"],
                 gpu_env, timeout_s=300)
    assert result.returncode == 3, result.stderr[-3000:]
    assert f"device cuda:{count} does not exist ({count} CUDA devices)" in result.stdout + result.stderr
