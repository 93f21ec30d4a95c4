"""A worker's Prometheus metrics (prometheus-client), kept and served by its pool child: the renders
happen there, and the child lives as long as the worker (one per process, concurrency 1). With
SDFARM_METRICS_PORT set, the child serves /metrics on SDFARM_METRICS_ADDR:PORT; one port per worker
on a node.

    sdfarm_images_total{model, outcome}        jobs by outcome: rendered, rendered-existing, skipped,
                                               failed, paused, cancelled
    sdfarm_failures_total{model, kind}         failed jobs by class: render (NaN, a job that breaks the
                                               pipeline), asset (a file, a refused job at prepare),
                                               poison (its workers died each time), handback (no worker
                                               took a handed-back chunk)
    sdfarm_chunk_render_seconds{model, chunk_size, size}  one batched render (histogram; size: the
                                               images' megapixel bucket, "<=0.25MP" .. ">8MP")
    sdfarm_encode_seconds, sdfarm_upload_seconds{model}    per image (histograms)
    sdfarm_model_load_seconds{model, compiled}             loading (and compiling) the model
    sdfarm_model_compile_seconds{model}        of that, compiling at start-up (the compiled warm-up, its
                                               graphs from the shared cache included); compiled workers only
    sdfarm_queue_wait_seconds{model}           from the batch's latest enqueue (submit, reconcile, retry:
                                               ProgressBoard.enqueued) to this worker taking a chunk
                                               (histogram; per chunk delivered)
    sdfarm_swaps_total{model, kind}            between chunks: lora (the active LoRA set changed, to none
                                               included), lora-load (a LoRA file loaded), vae (the pipeline's
                                               VAE changed), vae-load (a registered VAE loaded)
    sdfarm_worker_up{model, worker}, sdfarm_worker_blocked{model, worker}
    sdfarm_gpu_memory_bytes{model, kind}       CUDA memory allocated now and at peak (CUDA workers)
"""

from __future__ import annotations

import logging
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("sdfarm.worker")

# render seconds of a chunk: from a tiny CPU chunk to minutes of a large one
RENDER_BUCKETS: Final = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
IMAGE_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# queue wait of a chunk: an idle farm's second to a nightly batch's hours
WAIT_BUCKETS: Final = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
SWAP_KINDS: Final = ("lora", "lora-load", "vae", "vae-load")
FAILURE_KINDS: Final = ("render", "asset", "poison", "handback")
OUTCOMES: Final = ("rendered", "rendered-existing", "skipped", "failed", "paused", "cancelled")
# image sizes by megapixels, an upper bound each: a label a user's width x height cannot multiply
SIZE_BUCKETS_MP: Final = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def size_bucket(width: int, height: int) -> str:
    """The size label of an image: the smallest bucket it fits, e.g. "<=1MP" for 1024x1024."""
    megapixels = width * height / 2**20  # 1024x1024 is 1MP
    return next((f"<={b:g}MP" for b in SIZE_BUCKETS_MP if megapixels <= b), f">{SIZE_BUCKETS_MP[-1]:g}MP")


class WorkerMetrics:
    """One worker's metrics, in a registry of their own (a test may make several in one process)."""

    def __init__(self, model: str, hostname: str) -> None:
        self.model, self.hostname = model, hostname
        self.registry = CollectorRegistry()
        r = self.registry
        self.images = Counter("sdfarm_images", "Jobs by outcome.", ["model", "outcome"], registry=r)
        self.failures = Counter("sdfarm_failures", "Failed jobs by class.", ["model", "kind"], registry=r)
        self.render_seconds = Histogram("sdfarm_chunk_render_seconds", "One chunk's batched render.",
                                        ["model", "chunk_size", "size"], buckets=RENDER_BUCKETS, registry=r)
        self.encode_seconds = Histogram("sdfarm_encode_seconds", "PNG encoding of one image.", ["model"],
                                        buckets=IMAGE_BUCKETS, registry=r)
        self.upload_seconds = Histogram("sdfarm_upload_seconds", "Storing one image and its sidecar.", ["model"],
                                        buckets=IMAGE_BUCKETS, registry=r)
        self.load_seconds = Gauge("sdfarm_model_load_seconds", "Loading (and compiling) the model.",
                                  ["model", "compiled"], registry=r)
        self.compile_seconds = Gauge("sdfarm_model_compile_seconds", "Compiling the model at start-up.", ["model"],
                                     registry=r)
        self.queue_wait = Histogram("sdfarm_queue_wait_seconds", "From the batch's latest enqueue to a chunk taken.",
                                    ["model"], buckets=WAIT_BUCKETS, registry=r)
        self.swaps = Counter("sdfarm_swaps", "LoRA and VAE switches and loads between chunks.", ["model", "kind"],
                             registry=r)
        self.up = Gauge("sdfarm_worker_up", "1 while the worker serves.", ["model", "worker"], registry=r)
        self.blocked = Gauge("sdfarm_worker_blocked", "1 once the worker stopped itself taking work.",
                             ["model", "worker"], registry=r)
        self.gpu_memory = Gauge("sdfarm_gpu_memory_bytes", "CUDA memory allocated.", ["model", "kind"], registry=r)
        # every outcome and class present from the start, at 0: rate() then sees a first increment too
        for kind in FAILURE_KINDS:
            self.failures.labels(model, kind)
        for outcome in OUTCOMES:
            self.images.labels(model, outcome)
        for swap in SWAP_KINDS:
            self.swaps.labels(model, swap)
        self.up.labels(model, hostname).set(1)
        self.blocked.labels(model, hostname).set(0)

    def serve(self, port: int, addr: str) -> None:
        start_http_server(port, addr=addr, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", addr, port)

    def outcome(self, outcome: str) -> None:
        self.images.labels(self.model, outcome).inc()

    def failed(self, kind: str, count: int = 1) -> None:
        self.failures.labels(self.model, kind).inc(count)

    def rendered(self, seconds: float, chunk_size: int, width: int, height: int) -> None:
        self.render_seconds.labels(self.model, str(chunk_size), size_bucket(width, height)).observe(seconds)

    def stored(self, encode_s: float, upload_s: float) -> None:
        self.encode_seconds.labels(self.model).observe(encode_s)
        self.upload_seconds.labels(self.model).observe(upload_s)

    def loaded(self, seconds: float, compiled: bool, compile_s: float = 0.0) -> None:
        self.load_seconds.labels(self.model, str(compiled).lower()).set(seconds)
        if compiled:
            self.compile_seconds.labels(self.model).set(compile_s)

    def waited(self, seconds: float) -> None:
        """A chunk's queue wait (the clocks of the producer and this node may differ: never below 0)."""
        self.queue_wait.labels(self.model).observe(max(seconds, 0.0))

    def swapped(self, kind: str) -> None:
        """A LoRA or VAE switch or load (SWAP_KINDS), as the model's Adapters and Vaes report them."""
        if kind not in SWAP_KINDS:
            raise ValueError(f"unknown swap kind {kind!r} (allowed: {', '.join(SWAP_KINDS)})")
        self.swaps.labels(self.model, kind).inc()

    def beat(self, blocked: bool, device: Any) -> None:
        """What the heartbeat refreshes: blocked, and CUDA memory."""
        self.blocked.labels(self.model, self.hostname).set(1 if blocked else 0)
        if getattr(device, "type", None) == "cuda":
            import torch

            self.gpu_memory.labels(self.model, "allocated").set(torch.cuda.memory_allocated(device))
            self.gpu_memory.labels(self.model, "peak").set(torch.cuda.max_memory_allocated(device))
