"""Where everything lives, in the bucket and in Redis. Keys are pure functions of ids: no lookups needed.

The bucket:

    batches/<batch_id>/batch.json          the submitted spec, normalised
    batches/<batch_id>/jobs.jsonl          one {"index", "id", "job"} per line, in batch order
    batches/<batch_id>/control.json        the batch's state: active, paused or cancelled
    batches/<batch_id>/failed/<job_id>.json  why a job failed (the batch's failure record)
    renders/<job_id>.png                   the image, A1111 infotext + job JSON inside
    renders/<job_id>.json                  the sidecar, written after the PNG: the commit marker
    thumbs/<job_id>.webp                   the gallery's thumbnail (sdfarm/thumbnails.py), written
                                           after the PNG and before the sidecar
    compile-cache/<model>/<torch>/<gpu>/<shape>.bin  compiled graphs workers share (signed; opt-in)
    dead-letters/<message_sha256>.json     a task message no worker will run, and why (as received)
    inputs/<sha256>.<ext>                  an init image or mask uploaded at submit
    models/<key>                           checkpoints, LoRAs, ... of registry entries with `s3:` sources

Redis (besides Celery's own lists: render.<model>, render.<model>:<priority>, unacked, ...):

    sdfarm:batches                         zset: batch id -> first submit time
    sdfarm:batch:<batch_id>                hash: name, total, state, ... (sdfarm/progress.py)
    sdfarm:batch:<batch_id>:<part>         done and failed bitmaps, attempts, ...
    sdfarm:handbacks:<message digest>      how often a task message was handed back
    sdfarm:worker:<hostname>               a worker's heartbeat (sdfarm/workers.py), expiring
    sdfarm:datasets                        set: the datasets the scheduler watches (and the exporter exports)
    sdfarm:dataset:<name>                  a dataset's last run, when it was first seen, its schedule's
                                           ledger (due times accounted for, the next one) and its counts
                                           (runs fired and missed, webhook deliveries)
    sdfarm:dataset:<name>:runs             run date -> batch id
    sdfarm:dataset:<name>:fired:<due>      the claim on one due time: by the one scheduler that fires it,
                                           or by the tick that finds it missed
    sdfarm:redbeat:*                       the scheduler's beat schedule and lock (celery-redbeat)
"""

from __future__ import annotations

import re
from typing import Final

ASSETS_PREFIX: Final = "models/"  # where s3: sources of registry entries live in the bucket
REDIS_PREFIX: Final = "sdfarm"
BATCHES: Final = f"{REDIS_PREFIX}:batches"
DATASETS: Final = f"{REDIS_PREFIX}:datasets"  # the datasets the scheduler watches
WORKERS_PATTERN: Final = f"{REDIS_PREFIX}:worker:*"
REDBEAT_PREFIX: Final = f"{REDIS_PREFIX}:redbeat:"  # the scheduler's beat schedule (celery-redbeat)


def batch_key(batch_id: str) -> str:
    return f"batches/{batch_id}/batch.json"


def jobs_key(batch_id: str) -> str:
    return f"batches/{batch_id}/jobs.jsonl"


def control_key(batch_id: str) -> str:
    return f"batches/{batch_id}/control.json"


def failed_key(batch_id: str, job_id: str) -> str:
    return f"batches/{batch_id}/failed/{job_id}.json"


def failed_prefix(batch_id: str) -> str:
    return f"batches/{batch_id}/failed/"


def image_key(job_id: str) -> str:
    return f"renders/{job_id}.png"


def sidecar_key(job_id: str) -> str:
    return f"renders/{job_id}.json"


def thumbnail_key(job_id: str) -> str:
    """A small WebP of the image for the gallery, written by the worker beside the PNG (before the sidecar)."""
    return f"thumbs/{job_id}.webp"


def dead_letter_key(message_sha256: str) -> str:
    """A task message set aside (malformed, or from a newer producer that no worker read in time)."""
    return f"dead-letters/{message_sha256}.json"


def compile_artifacts_key(model_sha256: str, torch_version: str, device_name: str, shape: str) -> str:
    """torch.compile artifacts of one model, torch build, GPU type and warm-up shape."""
    parts = [model_sha256[:16], torch_version, device_name, shape]
    return "compile-cache/" + "/".join(re.sub(r"[^A-Za-z0-9._-]+", "-", p) for p in parts) + ".bin"


def input_key(sha256: str, ext: str) -> str:
    """An input image uploaded at submit, named by its content."""
    return f"inputs/{sha256}.{ext}"


def batch_state_key(batch_id: str, part: str = "") -> str:
    """A batch's live progress in Redis: its hash, or one of its parts (done, failed, attempts ...)."""
    return f"{REDIS_PREFIX}:batch:{batch_id}" + (f":{part}" if part else "")


def handbacks_key(message_digest: str) -> str:
    return f"{REDIS_PREFIX}:handbacks:{message_digest}"


def worker_key(hostname: str) -> str:
    """A worker's heartbeat hash: model, device, counters, health, the chunk in hand."""
    return f"{REDIS_PREFIX}:worker:{hostname}"


def dataset_key(name: str, part: str = "") -> str:
    """A dataset's state: its hash (last run, first seen, schedule ledger, counts), or `runs`."""
    return f"{REDIS_PREFIX}:dataset:{name}" + (f":{part}" if part else "")


def dataset_fired_key(name: str, due_at: str) -> str:
    """The claim on one due time of a dataset: set once, by the scheduler that fires it (or, for a due
    time that will never fire, by the tick that counts it missed: producer/ledger.py)."""
    return f"{REDIS_PREFIX}:dataset:{name}:fired:{due_at}"
