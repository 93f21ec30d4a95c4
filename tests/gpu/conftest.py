"""The GPU tier: every test under tests/gpu/ is marked `gpu` and runs only where CUDA is available.

CI never has a GPU: there the tier is collected and skipped with the reason. On a GPU machine run
`pytest tests/gpu` (bench/gpu/run.sh does, on a lent device, before the GPU benchmark). CUDA is
probed lazily, in the collection hook of the pytest process (never a worker's prefork parent), and
only when the session collected a test of this tier.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import WorkerProcess

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
def start_cuda_worker(gpu_env: dict[str, str], env: dict[str, str], start_worker: Callable[..., WorkerProcess]
                      ) -> Callable[[str, str, dict[str, str]], WorkerProcess]:
    """A real `sdfarm worker --device cuda:0` serving one of this tier's models (stopped with the session)."""
    extra = {k: v for k, v in gpu_env.items() if env.get(k) != v}

    def start(name: str, model: str, extra_env: dict[str, str]) -> WorkerProcess:
        return start_worker(name, model, extra_env={**extra, **extra_env}, device="cuda:0", ready_s=WORKER_START_S)

    return start
