"""Every setting in one place: environment variables with the prefix SDFARM_.

Build it once (`Settings()`) at the edge (CLI, worker start, test fixture) and pass it down.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SDFARM_", extra="ignore", frozen=True)

    # Redis: Celery broker and live progress. Put the password in the URL: redis://:PASSWORD@host:6379/0
    redis_url: SecretStr = SecretStr("redis://localhost:6379/0")
    # Redis Sentinel (a sentinel://...;sentinel://... URL, sdfarm/redis_target.py): the monitored master's
    # name, and the sentinels' own password if they require one
    redis_sentinel_master: str = "mymaster"
    redis_sentinel_password: SecretStr | None = None

    # S3 / MinIO: the durable record (batch manifests, images, sidecars)
    s3_endpoint_url: str | None = None  # None: AWS S3
    s3_bucket: str = "sdfarm"
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None  # None: boto3's own chain (AWS_* env, files, roles)
    s3_secret_access_key: SecretStr | None = None
    s3_max_attempts: int = 10

    # Model registry: a YAML file, and/or inline YAML/JSON in SDFARM_MODELS
    models_file: Path | None = None
    models: str | None = None
    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "sdfarm")

    # Producer
    inputs_dir: Path | None = None  # local init images and masks (`local:NAME` in a batch), uploaded at submit
    datasets_dir: Path | None = None  # folder of dataset specs the scheduler runs
    scheduler_tick_s: float = Field(default=30.0, ge=1)  # how often the scheduler looks for due dataset runs
    chunk_size: int = Field(default=8, ge=1, le=64)  # jobs per task message (one batched pipeline call)
    max_jobs_per_batch: int = Field(default=1_000_000, ge=1)

    # Queue
    visibility_timeout: int = Field(default=3600, ge=5)  # seconds before an unacked chunk is redelivered
    unacked_restore_interval: int = Field(default=10, ge=1)  # seconds between sweeps for expired chunks
    task_time_limit: int = Field(default=1800, ge=10)  # hard kill of one chunk, seconds
    progress_ttl: int = Field(default=30 * 24 * 3600, ge=60)  # live progress kept in Redis, seconds

    # Prometheus metrics of a worker (worker/metrics.py): served on this port when set (one per worker
    # on a node), on this address
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_addr: str = "0.0.0.0"

    # Celery task events from workers (Flower, `celery events`): off by default, each costs a Redis publish
    task_events: bool = False

    # HTTP API and gallery (`sdfarm serve`, producer/api/): bearer tokens as NAME:TOKEN pairs, comma
    # separated (none set: every request but /healthz is refused); the name shows in logs, never the token
    api_tokens: SecretStr | None = None
    api_max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)  # a request's body, uploads included
    api_max_jobs: int = Field(default=100_000, ge=1)  # jobs in one batch submitted through the API
    api_max_image_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)  # one base64 image, decoded
    api_max_concurrent: int = Field(default=16, ge=1)  # requests in flight per token (429 beyond)
    api_sync_timeout_s: float = Field(default=600.0, gt=0)  # txt2img/img2img wait this long for the render
    api_cors_origins: str = ""  # comma-separated origins allowed by CORS (empty: CORS off)
    # signs the gallery's session cookies: the same on every replica of `sdfarm serve` (unset: each
    # process draws its own, and a user's session holds on that process only)
    api_session_key: SecretStr | None = None

    # Logs of the worker and the scheduler: text lines, or one JSON object a line (sdfarm/logs.py)
    log_format: Literal["text", "json"] = "text"

    # Worker
    retry_backoff_s: float = Field(default=5.0, gt=0)  # first delay after a transient failure (S3, Redis)
    retry_backoff_max_s: float = Field(default=300.0, gt=0)  # delays double up to this
    max_attempts: int = Field(default=3, ge=1, le=100)  # deliveries of a job whose worker died, before it fails
    block_after_failures: int = Field(default=5, ge=1)  # failures in a row, while peers succeed, block a worker
    heartbeat_interval: float = Field(default=10.0, gt=0)
    # a draining worker (SIGTERM, `sdfarm drain`) hands the chunk in hand back if it still renders this
    # long after the first SIGTERM: keep it below the pod's terminationGracePeriodSeconds (worker/drain.py)
    drain_timeout: float = Field(default=270.0, gt=0)
    upload_threads: int = Field(default=8, ge=1, le=64)  # PNG encoding and uploads, beside the render
    # torch's CPU threads per worker (None: torch's default, every core). Several CPU workers on one
    # node each taking every core thrash (measured: 20x slower); give each cores // workers.
    cpu_threads: int | None = Field(default=None, ge=1, le=256)
    # upscaler models run over images in tiles of this many pixels a side (0: the whole image at once)
    upscale_tile: int = Field(default=512, ge=0, le=8192)
    # torch.compile of the UNet and the VAE decoder (None: on for CUDA, off on the CPU). A compiled
    # worker renders every chunk at one static batch size, chunk_size, padding a short chunk, so no
    # chunk recompiles and a job's pixels never depend on its chunk. Graphs are cached under
    # cache_dir/compile, so a restarted worker (or a second one on the node) starts warm.
    compile: bool | None = None
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # set (the same on every worker, never on producers): workers share the warm-up's compiled graphs
    # through the bucket, signed with this key, so a new node starts warm. Unset: local cache only.
    compile_cache_secret: SecretStr | None = None

    # Reliability (issue 14): lost work found without anyone watching; messages no worker can take
    # the scheduler reconciles an active batch when for this long nothing moved (no job done or
    # failed) and none of its messages is queued or in flight (0: never)
    reconcile_after_s: float = Field(default=600.0, ge=0)
    # hand-backs of one message (a newer schema, a worker that cannot serve it) before it is set
    # aside: a newer-schema message is dead-lettered, a chunk no worker can serve fails its jobs
    max_handbacks: int = Field(default=10, ge=1, le=1000)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Settings from an explicit SDFARM_* mapping (what a child process would be given)."""
        values: dict[str, Any] = {k.removeprefix("SDFARM_").lower(): v for k, v in env.items()
                                  if k.startswith("SDFARM_")}
        return cls(**values)
