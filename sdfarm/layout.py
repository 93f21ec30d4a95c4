"""Where everything lives in the bucket. Keys are pure functions of ids: no lookups needed.

    batches/<batch_id>/batch.json          the submitted spec, normalised
    batches/<batch_id>/jobs.jsonl          one {"index", "id", "job"} per line, in batch order
    batches/<batch_id>/control.json        the batch's state: active, paused or cancelled
    batches/<batch_id>/failed/<job_id>.json  why a job failed (the batch's failure record)
    renders/<job_id>.png                   the image, A1111 infotext + job JSON inside
    renders/<job_id>.json                  the sidecar, written after the PNG: the commit marker
"""

from __future__ import annotations


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
