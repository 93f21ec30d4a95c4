"""Fixtures: a tiny model, the embedded stack (real Redis + real S3), real worker processes.

Everything is started by the test session and stopped at its end. When a service cannot start,
tests fail under CI (CI=true) and are skipped locally with the reason.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from infra.stack import EmbeddedStack, StackInfo
from sdfarm.models import Registry
from sdfarm.progress import ProgressBoard
from sdfarm.queue import make_celery
from sdfarm.settings import Settings
from sdfarm.store import Store

ROOT = Path(__file__).resolve().parent.parent
TINY = "tiny-sd15"
IDLE = "tiny-idle"  # registered, same weights, no worker serves it: its queue only fills
VICTIM = "tiny-victim"  # served only by the workers of the kill test
FAULTS = "tiny-faults"  # served only by the workers of the fault-injection tests
OUTAGE = "tiny-outage"  # served only by the workers of the Redis/S3 outage tests
BROKEN = "tiny-broken"  # a diffusers folder whose UNet weights are garbage: it cannot load
FEATURES = "tiny-features"  # served only by the workers of the render-feature farm tests
SDXL = "tiny-sdxl"  # the tiny SDXL-architecture model (family: sdxl)
LOGS = "tiny-logs"  # served only by the worker of the JSON log test
DRAIN = "tiny-drain"  # served only by the workers of the drain tests
EVENTS = "tiny-events"  # served only by the worker of the Flower test (task events on)
METRICS = "tiny-metrics"  # served only by the worker that Prometheus scrapes
QUEUED = "tiny-queued"  # no worker serves it: the exporter test's queue only fills
XL_REFINER = "tiny-xl-refiner"  # the tiny SDXL-refiner-architecture model (family: sdxl-refiner)
# the same weights as tiny-sd15 and tiny-sdxl under another identity (a note in the folder): refiners
# that, taking over, must leave the image as it was
SD15_TWIN = "tiny-sd15-twin"
XL_TWIN = "tiny-sdxl-twin"


def free_port() -> int:
    """A loopback port nothing listens on now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def served(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A server a test starts (Flower, Prometheus): its output in `log`, stopped when the block ends."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Poll until condition() is truthy; fail with `what` after timeout_s. Never a bare sleep."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.testing import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd15")


@pytest.fixture(scope="session")
def tiny_assets(tiny_model_dir: Path) -> dict[str, Path]:
    """The tiny model's LoRAs (diffusers and kohya layouts) and embedding, as local files."""
    from worker.testing import write_tiny_assets

    return write_tiny_assets(tiny_model_dir.parent / "assets")


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_model_dir: Path) -> dict[str, Path]:
    """The tiny SDXL model ("model") and its LoRAs, embedding and VAE."""
    from worker.testing import write_tiny_model, write_tiny_sdxl_assets

    folder = tiny_model_dir.parent / "sdxl"
    return {"model": write_tiny_model(folder / "tiny-sdxl", family="sdxl"), **write_tiny_sdxl_assets(folder),
            "refiner": write_tiny_model(folder / "tiny-xl-refiner", family="sdxl-refiner")}


def _twin(folder: Path, at: Path) -> Path:
    """A copy of a model folder with a note added: the same weights, another identity."""
    shutil.copytree(folder, at)
    (at / "twin.txt").write_text(f"the weights of {folder.name}\n")
    return at


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def registry_file(tiny_model_dir: Path, tiny_assets: dict[str, Path], tiny_sdxl: dict[str, Path]) -> Path:
    """Every test model, plus LoRAs and an embedding: local files, and S3 sources (uploaded by the
    tests that use them) whose registered sha256 is the good file's."""
    path = tiny_model_dir.parent / "models.yaml"
    broken = tiny_model_dir.parent / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    entries = {TINY: tiny_model_dir, IDLE: tiny_model_dir, VICTIM: tiny_model_dir, FAULTS: tiny_model_dir,
               OUTAGE: tiny_model_dir, FEATURES: tiny_model_dir, LOGS: tiny_model_dir, DRAIN: tiny_model_dir,
               EVENTS: tiny_model_dir, METRICS: tiny_model_dir, QUEUED: tiny_model_dir,
               BROKEN: broken}
    detail = sha256_of(tiny_assets["tiny-detail"])
    unseen = hashlib.sha256(b"a file no worker has: the bucket holds other bytes under its key").hexdigest()
    path.write_text(
        "models:\n" + "".join(f"  {name}:\n    path: {folder}\n" for name, folder in entries.items())
        + f"  {SDXL}: {{path: {tiny_sdxl['model']}, family: sdxl}}\n"
        f"  {XL_REFINER}: {{path: {tiny_sdxl['refiner']}, family: sdxl-refiner}}\n"
        f"  {SD15_TWIN}: {{path: {_twin(tiny_model_dir, tiny_model_dir.parent / SD15_TWIN)}}}\n"
        f"  {XL_TWIN}: {{path: {_twin(tiny_sdxl['model'], tiny_model_dir.parent / XL_TWIN)}, family: sdxl}}\n"
        f"loras:\n  tiny-grain: {{file: {tiny_assets['tiny-grain']}}}\n"
        f"  s3-detail: {{s3: loras/detail.safetensors, sha256: '{detail}'}}\n"
        f"  s3-tampered: {{s3: loras/tampered.safetensors, sha256: '{unseen}'}}\n"
        f"  xl-detail: {{file: {tiny_sdxl['xl-detail']}, family: sdxl}}\n"
        f"  xl-grain: {{file: {tiny_sdxl['xl-grain']}, family: sdxl}}\n"
        f"embeddings:\n  tiny-sparkle: {{file: {tiny_assets['tiny-sparkle']}}}\n"
        f"  xl-sparkle: {{file: {tiny_sdxl['xl-sparkle']}, family: sdxl}}\n"
        f"vaes:\n  xl-vae: {{path: {tiny_sdxl['xl-vae']}, family: sdxl}}\n"
        f"upscalers:\n  tiny-esrgan: {{file: {tiny_assets['tiny-esrgan']}}}\n"
        f"  s3-esrgan: {{s3: upscalers/esrgan.safetensors, sha256: '{sha256_of(tiny_assets['tiny-esrgan'])}'}}\n"
        f"mask_models:\n  clipseg: {{path: {tiny_assets['tiny-clipseg']}}}\n")
    return path


@pytest.fixture(scope="session")
def inputs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SDFARM_INPUTS_DIR of the test session: `local:NAME` init images and masks."""
    return tmp_path_factory.mktemp("inputs")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cache_root of the compiled tiny models: one cold compile per session, later loads read it."""
    return tmp_path_factory.mktemp("compile-cache")


@pytest.fixture(scope="session")
def registry(registry_file: Path, cache_dir: Path) -> Registry:
    return Registry.from_settings(Settings(models_file=registry_file, cache_dir=cache_dir))


def start_services(what: str, start: Callable[[], object], stop: Callable[[], object]) -> None:
    """start() a fixture's servers. When they cannot start, the test fails under CI (CI=true) and is
    skipped locally, with the reason."""
    try:
        start()
    except Exception as e:
        stop()
        if os.environ.get("CI") == "true":
            pytest.fail(f"{what} did not start: {e}")
        pytest.skip(f"{what} did not start: {e}")


def running_stack(folder: Path) -> Iterator[EmbeddedStack]:
    """A fixture's embedded stack in `folder`: started, yielded, stopped."""
    s = EmbeddedStack(folder)
    start_services("embedded stack", s.start, s.stop)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    yield from running_stack(tmp_path_factory.mktemp("stack"))


@pytest.fixture(scope="session")
def stack_info(stack: EmbeddedStack) -> StackInfo:
    assert stack.info is not None
    return stack.info


@pytest.fixture(scope="session")
def env(stack_info: StackInfo, registry_file: Path, cache_dir: Path, inputs_dir: Path) -> dict[str, str]:
    """SDFARM_* for processes started by tests: short visibility timeout so a killed worker's chunk
    comes back within seconds."""
    return {
        **stack_info.env(),
        "SDFARM_MODELS_FILE": str(registry_file),
        "SDFARM_CACHE_DIR": str(cache_dir),
        "SDFARM_INPUTS_DIR": str(inputs_dir),
        "SDFARM_CHUNK_SIZE": "4",
        "SDFARM_CPU_THREADS": "1",  # up to three workers share two cores
        "SDFARM_VISIBILITY_TIMEOUT": "20",
        "SDFARM_UNACKED_RESTORE_INTERVAL": "1",
        "SDFARM_HEARTBEAT_INTERVAL": "1",
        "SDFARM_S3_MAX_ATTEMPTS": "3",
        "SDFARM_RETRY_BACKOFF_S": "1",
        "SDFARM_RETRY_BACKOFF_MAX_S": "5",
    }


@pytest.fixture(scope="session")
def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


@pytest.fixture(scope="session")
def store(settings: Settings) -> Store:
    return Store.from_settings(settings)


@pytest.fixture(scope="session")
def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url.get_secret_value())


@pytest.fixture(scope="session")
def board(settings: Settings) -> ProgressBoard:
    return ProgressBoard.from_settings(settings)


@pytest.fixture(scope="session")
def celery_app(settings: Settings) -> Any:
    return make_celery(settings)


def cli(args: list[str], env: dict[str, str], timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real `sdfarm` command line in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "producer", *args], env={**os.environ, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s, check=False)


@dataclass
class WorkerProcess:
    """A real `sdfarm worker` process (Celery prefork parent + one pool child)."""

    hostname: str
    proc: subprocess.Popen[bytes]
    log: Path
    client: redis.Redis
    alive: bool = field(default=True)

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"worker {self.hostname} exited with {self.proc.returncode}:\n{self.tail()}")
        return bool(self.client.exists(f"sdfarm:worker:{self.hostname}"))

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def busy_with(self) -> str | None:
        chunk = self.client.hget(f"sdfarm:worker:{self.hostname}", "current_chunk")
        return chunk.decode() if chunk else None

    def kill(self) -> None:
        """SIGKILL the whole worker: parent and pool child, mid-whatever."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.alive = False

    def stop(self, timeout_s: float = 30) -> None:
        stop_group(self.proc, timeout_s)
        self.alive = False


def stop_group(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """SIGTERM a process started in its own session (its children too), SIGKILL after timeout_s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def renders(workers: list[WorkerProcess], job_ids: list[str]) -> dict[str, int]:
    """How many times the workers rendered each job, from their logs: a render whose PNG another
    delivery had stored first logs `rendered-existing`, wasted work that put-if-absent hid."""
    counts = dict.fromkeys(job_ids, 0)
    for w in workers:
        for m in re.finditer(r"job=([0-9a-f]{32}) .*outcome=(?:rendered|rendered-existing) ", w.tail(10**8)):
            if m.group(1) in counts:
                counts[m.group(1)] += 1
    return counts


@pytest.fixture(scope="session")
def start_worker(env: dict[str, str], redis_client: redis.Redis, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []
    logs = tmp_path_factory.mktemp("worker-logs")

    def start(name: str, model: str = TINY, wait: bool = True, extra_env: dict[str, str] | None = None,
              device: str = "cpu", ready_s: float = 120, client: redis.Redis | None = None) -> WorkerProcess:
        """A worker on the session's stack, or on the Redis `client` reaches (extra_env points it there)."""
        hostname = f"{name}@tests"
        log = logs / f"{name}-{len(started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "producer", "worker", "--model", model, "--device", device,
                 "--hostname", hostname],
                env={**os.environ, **env, **(extra_env or {})}, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        w = WorkerProcess(hostname, proc, log, client or redis_client)
        started.append(w)
        if wait:
            wait_for(w.ready, ready_s, f"worker {hostname} to load {model} on {device}")
        return w

    yield start
    for w in started:
        w.stop()


API_TOKEN = "tests-token-" + "a" * 20  # the `tests` caller of the API server below
OTHER_TOKEN = "other-token-" + "b" * 20  # a second caller, `other`


@dataclass
class ApiServer:
    """A real `sdfarm serve` process on loopback, with two callers (tests, other)."""

    url: str
    token: str
    proc: subprocess.Popen[bytes]
    log: Path

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def start_api(env: dict[str, str], log: Path, extra_env: dict[str, str] | None = None) -> ApiServer:
    """`sdfarm serve` on a free port; returns once /healthz answers."""
    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    full = {**os.environ, **env, "SDFARM_API_TOKENS": f"tests:{API_TOKEN},other:{OTHER_TOKEN}", **(extra_env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "producer", "serve", "--port", str(port)], env=full, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = ApiServer(f"http://127.0.0.1:{port}", API_TOKEN, proc, log)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"sdfarm serve exited with {proc.returncode}:\n{server.tail()}")
        try:
            return requests.get(server.url + "/healthz", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    wait_for(up, 60, "sdfarm serve to answer /healthz")
    return server


def stop_api(server: ApiServer) -> None:
    stop_group(server.proc, 20)


@pytest.fixture(scope="session")
def api(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """The session's API server on the embedded stack."""
    server = start_api(env, tmp_path_factory.mktemp("api") / "serve.log")
    yield server
    stop_api(server)
