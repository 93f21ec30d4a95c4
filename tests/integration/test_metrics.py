"""A real Prometheus (Debian's package; `make test` installs it) scrapes a real worker's metrics on
loopback while a batch renders, and its query API gives back what the batch did."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from sdfarm.queue import queue_lists, queue_name
from tests.conftest import METRICS, QUEUED, WorkerProcess, cli, free_port, served, wait_for
from tests.integration.test_farm import batch_file


class Prometheus:
    def __init__(self, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.port, self.proc, self.log = port, proc, log

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.loads(response.read())
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False


@pytest.fixture(scope="module")
def worker_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def exporter_port(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A running `sdfarm exporter`, on loopback."""
    port = free_port()
    with served([sys.executable, "-m", "producer", "exporter", f"--port={port}", "--addr=127.0.0.1"],
                tmp_path_factory.mktemp("exporter") / "exporter.log", {**os.environ, **env}):
        yield port


@pytest.fixture(scope="module")
def prometheus(worker_port: int, exporter_port: int, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus is not installed (make test installs Debian's package)")
        pytest.skip("prometheus is not installed (make test installs Debian's package, as root)")
    folder = tmp_path_factory.mktemp("prometheus")
    config = folder / "prometheus.yml"
    config.write_text("global: {scrape_interval: 1s}\nscrape_configs:\n  - job_name: sdfarm-worker\n"
                      f"    static_configs: [{{targets: ['127.0.0.1:{worker_port}']}}]\n"
                      "  - job_name: sdfarm-exporter\n"
                      f"    static_configs: [{{targets: ['127.0.0.1:{exporter_port}']}}]\n")
    port, log = free_port(), folder / "prometheus.log"
    with served([binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}"], log) as proc:
        p = Prometheus(port, proc, log)
        wait_for(p.ready, 60, "prometheus to be ready")
        yield p


def test_prometheus_scrapes_a_worker_and_its_numbers_are_the_batchs(
        tmp_path: Path, env: dict[str, str], prometheus: Prometheus, worker_port: int,
        start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker("metered", model=METRICS, extra_env={"SDFARM_METRICS_PORT": str(worker_port),
                                                               "SDFARM_METRICS_ADDR": "127.0.0.1"})
    wait_for(lambda: prometheus.value(f'sdfarm_worker_up{{model="{METRICS}"}}') == 1, 60,
             "prometheus to scrape the worker")
    path = batch_file(tmp_path, "metered", METRICS, [f"a metered image {i}" for i in range(5)], steps=4)
    assert cli(["submit", str(path), "--watch"], {**env, "SDFARM_CHUNK_SIZE": "2"}).returncode == 0
    chunks = 3  # 5 jobs, 2 to a chunk
    rendered = f'sdfarm_images_total{{model="{METRICS}",outcome="rendered"}}'
    wait_for(lambda: prometheus.value(rendered) == 5, 60, "prometheus to count the 5 rendered images")
    assert prometheus.value(f'sum(sdfarm_chunk_render_seconds_count{{model="{METRICS}"}})') == chunks
    assert prometheus.value(f'sdfarm_chunk_render_seconds_count{{model="{METRICS}",chunk_size="1",size="<=0.25MP"}}'
                            ) == 1
    assert prometheus.value(f'sdfarm_upload_seconds_count{{model="{METRICS}"}}') == 5
    assert prometheus.value(f'sdfarm_queue_wait_seconds_count{{model="{METRICS}"}}') == chunks  # one per chunk taken
    assert prometheus.value(f'sum(sdfarm_swaps_total{{model="{METRICS}"}})') == 0  # no LoRA, the model's own VAE
    assert prometheus.value(f'sum(sdfarm_failures_total{{model="{METRICS}"}})') == 0
    assert prometheus.value(f'sdfarm_worker_blocked{{model="{METRICS}",worker="metered@tests"}}') == 0
    assert (prometheus.value(f'sdfarm_model_load_seconds{{model="{METRICS}",compiled="false"}}') or 0) > 0
    worker.stop()


def test_the_exporter_gives_queue_depth_per_model_and_the_batches(
        tmp_path: Path, env: dict[str, str], prometheus: Prometheus, redis_client: redis.Redis) -> None:
    path = batch_file(tmp_path, "queued", QUEUED, [f"a queued image {i}" for i in range(7)], steps=4)
    submitted = cli(["submit", str(path)], {**env, "SDFARM_CHUNK_SIZE": "2"})
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.split()[1].rstrip(":")
    # 7 jobs, 2 to a chunk: 4 chunks wait, no worker serves the model
    wait_for(lambda: prometheus.value(f'sdfarm_queue_depth{{model="{QUEUED}"}}') == 4, 30,
             "prometheus to see the 4 queued chunks")
    assert prometheus.value(f'sdfarm_workers{{model="{QUEUED}",state="serving"}}') == 0
    # the lists the chunks went to are the ones the exporter, and KEDA (infra/k8s/worker/scaledobject.yaml), watch
    pushed = {key.decode() for key in redis_client.scan_iter(f"{queue_name(QUEUED)}*")}
    assert pushed
    assert pushed <= set(queue_lists(QUEUED))
    assert (prometheus.value('sdfarm_batches{state="active"}') or 0) >= 1
    assert (prometheus.value('sdfarm_jobs{state="total"}') or 0) >= 7
    assert prometheus.value(f'sdfarm_batch_eta_seconds{{batch="{batch_id}"}}') is None  # nothing done: no rate
