"""Completion notices: a JSON POST signed with HMAC-SHA256 (header X-Sdfarm-Signature: sha256=<hex>).

Receivers verify with: hmac.compare_digest(header, "sha256=" + hmac.new(secret, body, sha256).hexdigest()).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.error
import urllib.request
from typing import Any

from sdfarm.errors import TransientError

SIGNATURE_HEADER = "X-Sdfarm-Signature"


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def deliver(url: str, secret: bytes, notice: dict[str, Any], timeout_s: float = 10) -> int:
    """POST once. Raises TransientError on a network error or a non-2xx answer (the caller retries)."""
    body = json.dumps(notice, sort_keys=True).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, body), "User-Agent": "sdfarm"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        raise TransientError(f"webhook {url} answered {e.code}") from e
    except OSError as e:
        raise TransientError(f"webhook {url}: {e}") from e
