"""Where everything lives in the bucket. Keys are pure functions of ids: no lookups needed.

    batches/<batch_id>/batch.json          the submitted spec, normalised
    batches/<batch_id>/jobs.jsonl          one {"index", "id", "job"} per line, in batch order
    batches/<batch_id>/control.json        the batch's state: active, paused or cancelled
    batches/<batch_id>/failed/<job_id>.json  why a job failed (the batch's failure record)
    renders/<job_id>.png                   the image, A1111 infotext + job JSON inside
    renders/<job_id>.json                  the sidecar, written after the PNG: the commit marker
    compile-cache/<model>/<torch>/<gpu>/<shape>.bin  compiled graphs workers share (signed; opt-in)
    dead-letters/<message_sha256>.json     a task message no worker will run, and why (as received)
"""

from __future__ import annotations

import re


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


def dead_letter_key(message_sha256: str) -> str:
    """A task message set aside (malformed, or from a newer producer that no worker read in time)."""
    return f"dead-letters/{message_sha256}.json"


def compile_artifacts_key(model_sha256: str, torch_version: str, device_name: str, shape: str) -> str:
    """torch.compile artifacts of one model, torch build, GPU type and warm-up shape."""
    parts = [model_sha256[:16], torch_version, device_name, shape]
    return "compile-cache/" + "/".join(re.sub(r"[^A-Za-z0-9._-]+", "-", p) for p in parts) + ".bin"
