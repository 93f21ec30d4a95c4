"""The GPU tier: every test under tests/gpu/ is marked `gpu` and runs only where CUDA is available.

CI never has a GPU: there the tier is collected and skipped with the reason. On a GPU machine run
`pytest tests/gpu` (bench/gpu/run.sh does, on a lent device, before the GPU benchmark). CUDA is
probed lazily, in the collection hook of the pytest process (never a worker's prefork parent), and
only when the session collected a test of this tier.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

from tests.conftest import ROOT, WorkerProcess, wait_for

HERE = Path(__file__).resolve().parent
EAGER = "tiny-gpu-eager"  # the tiny model under two names that only this tier's workers serve:
COMPILED = "tiny-gpu-compiled"  # one worker each, with SDFARM_COMPILE off and on
WORKER_START_S = 600  # a cold torch.compile of the UNet and the VAE decoder happens in the start-up

# Tolerances, in 8-bit levels (0..255), also stated in the README ("GPU checks"). The GPU run
# (bench/gpu/run.sh) records the measured values as junit properties and in results.jsonl.
CHUNK_MAX_DIFF = 8  # one job alone vs inside a chunk, same pipeline: fp16 kernels may round differently per batch size
COMPILED_MEAN_DIFF = 8.0  # compiled vs eager, mean |difference| per image: Inductor fuses and reorders fp16 arithmetic


def cuda_missing() -> str | None:
    """Why this tier cannot run here, or None when a CUDA device is visible."""
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
        return f"needs a CUDA GPU (torch {torch.__version__}, {build}, sees none); run bash bench/gpu/run.sh on one"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    ours = [item for item in items if HERE in item.path.parents]
    if not ours:
        return
    reason = cuda_missing()
    for item in ours:
        item.add_marker(pytest.mark.gpu)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def differences(a: Image.Image, b: Image.Image) -> tuple[float, int]:
    """Mean and max absolute difference of two images, in 8-bit levels."""
    d = np.abs(pixels(a) - pixels(b))
    return float(d.mean()), int(d.max())


@pytest.fixture(scope="session")
def gpu_env(env: dict[str, str], tiny_model_dir: Path) -> dict[str, str]:
    """The session's SDFARM_* plus EAGER and COMPILED in the registry (SDFARM_MODELS merges over the file)."""
    names = {name: {"path": str(tiny_model_dir)} for name in (EAGER, COMPILED)}
    return {**env, "SDFARM_MODELS": json.dumps({"models": names})}


@pytest.fixture(scope="module")
def start_cuda_worker(gpu_env: dict[str, str], redis_client: redis.Redis, tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[Callable[[str, str, dict[str, str]], WorkerProcess]]:
    """A real `sdfarm worker --device cuda:0`; stopped when the module ends."""
    started: list[WorkerProcess] = []
    logs = tmp_path_factory.mktemp("cuda-worker-logs")

    def start(name: str, model: str, extra_env: dict[str, str]) -> WorkerProcess:
        hostname = f"{name}@gpu-tests"
        log = logs / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "producer", "worker", "--model", model, "--device", "cuda:0",
                 "--hostname", hostname],
                env={**os.environ, **gpu_env, **extra_env}, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = WorkerProcess(hostname, proc, log, redis_client)
        started.append(worker)
        wait_for(worker.ready, WORKER_START_S, f"worker {hostname} to load {model} on cuda:0")
        return worker

    yield start
    for worker in started:
        worker.stop()
