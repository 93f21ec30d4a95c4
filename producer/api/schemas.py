"""What the native API (/v1) takes and answers: typed models, so that /openapi.json and /docs say it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from sdfarm.jobs import USER_FIELDS
from sdfarm.workers import WorkerBeat

from ..batch_pages import Failure, Image

BATCH_ID_PATTERN = r"^[0-9a-f]{16,64}$"
Status = Literal["running", "done", "failed", "paused", "cancelled"]


class BatchDocument(BaseModel):
    """The batch-file schema (what a YAML or JSON batch file holds): documents the JSON body. The
    body is read and validated as the command line reads a .json file, with the same messages."""

    name: str | None = Field(None, description="the batch's name (the `name` query overrides it; default: 'request')")
    seed: int | None = Field(None, description="the batch seed: seeds not given derive from it")
    defaults: dict[str, Any] | None = Field(None, description="fields every item gets unless it sets them")
    matrix: dict[str, list[Any]] | None = Field(None, description="field -> values: every item in each combination")
    items: list[dict[str, Any] | str] = Field(
        description="each item a prompt, or a mapping of job fields (" + ", ".join(USER_FIELDS)
        + ") plus count, seeds and matrix")


class Problem(BaseModel):
    source: str
    line: int | None
    item: int | None
    field: str
    message: str


class Problems(BaseModel):
    """A refused batch: every problem found (unless validation `stopped` after 1000); nothing enqueued."""

    detail: str
    problems: list[Problem]
    stopped: bool


class Detail(BaseModel):
    detail: str


class Submitted(BaseModel):
    batch_id: str
    name: str
    jobs: int
    chunks_enqueued: int
    already_done: int = Field(description="jobs with an image already (from this batch or an identical job)")
    priority: int
    state: str = Field(description="active; paused or cancelled when the same batch was before (resume it)")


class DryRun(BaseModel):
    dry_run: Literal[True] = True
    batch_id: str
    name: str
    jobs: int
    plan: str = Field(description="what `sdfarm submit --dry-run` prints: jobs per model and size, chunks")


class BatchView(BaseModel):
    batch_id: str
    name: str
    state: str = Field(description="active, paused or cancelled (what workers obey)")
    status: Status = Field(description="running, done, failed (finished with failures), paused or cancelled")
    total: int
    done: int
    failed: int
    queued: int = Field(description="jobs neither done nor failed")
    rendered: int = Field(description="images this batch rendered (not found done already)")
    submitted_at: float = Field(description="unix time of the first submit")
    finished: bool


class BatchProgress(BatchView):
    images_per_s: float = Field(description="over the last 30 s this server saw; before that, the mean since the"
                                            " batch's chunks were last enqueued; 0 unless running")
    eta_s: float | None = Field(description="seconds to go at that rate; null when unknown (no rate yet)")


class BatchDetail(BatchProgress):
    failures: list[Failure] = Field(description="failed jobs with their reasons, by index (at most `failures`)")


class BatchPage(BaseModel):
    batches: list[BatchView]
    limit: int
    offset: int
    next_offset: int | None = Field(description="the next page's offset; null when this page is short")


class ImagePage(BaseModel):
    batch_id: str
    total: int = Field(description="images the batch has so far")
    limit: int
    offset: int
    next_offset: int | None
    images: list[Image]


class StateChange(BaseModel):
    batch_id: str
    state: str


class Reconciled(StateChange):
    total: int
    done: int
    failed: int
    enqueued_jobs: int
    chunks: int


class Retried(BaseModel):
    batch_id: str
    retried: int = Field(description="failed jobs enqueued again")


class Workers(BaseModel):
    workers: list[WorkerBeat]


class Registered(BaseModel):
    kind: str = Field(description="model, lora, embedding, vae, upscaler or mask_model")
    name: str
    family: str | None = Field(description="the model family it is or fits; null: any (upscalers, mask models)")
    sha256: str | None = Field(description="its identity; null when it cannot be read here (see `problem`)")
    source: str
    problem: str | None = None


class Models(BaseModel):
    models: list[Registered]
    assets: list[Registered]


class Heartbeat(BaseModel):
    at: float


class End(BaseModel):
    reason: Literal["finished", "cancelled", "timeout"]
    batch: BatchProgress
