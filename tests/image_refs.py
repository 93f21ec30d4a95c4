"""A test image's ImageRef fields, as the planner would record it."""

from __future__ import annotations

import hashlib
from typing import Any

from PIL import Image


def image_ref(image: Image.Image, key: str = "inputs/x.png") -> dict[str, Any]:
    return {"key": key, "sha256": hashlib.sha256(image.tobytes()).hexdigest(), "width": image.width,
            "height": image.height}
