"""Input images (img2img init images, inpainting masks): checked at submit, identified by sha256.

A batch names an input as a key in the bucket (`inputs/cat.png`, or `s3://BUCKET/inputs/cat.png`
for this farm's bucket), or as a file under SDFARM_INPUTS_DIR (`local:cat.png`). The producer
reads each one once, refuses what is missing, too large or not a readable image, and records its
key, sha256 and size in the job; a local file is uploaded to `inputs/<sha256>.<ext>` when the
batch is submitted. Workers fetch the key and render only if the bytes still have that sha256.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from pathlib import Path
from typing import Final

from PIL import Image

from .errors import InvalidInput
from .jobs import INPUT_KEY_PATTERN
from .store import MissingObject, Store

MAX_INPUT_BYTES: Final = 32 * 1024 * 1024
MAX_INPUT_SIDE: Final = 4096
FORMATS: Final = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
LOCAL_PREFIX: Final = "local:"
_KEY_RE: Final = re.compile(INPUT_KEY_PATTERN)


def input_key(sha256: str, ext: str) -> str:
    return f"inputs/{sha256}.{ext}"


def open_image(data: bytes, what: str) -> Image.Image:
    """Decode fully (a truncated file fails here, not on a GPU) and check the size."""
    if len(data) > MAX_INPUT_BYTES:
        raise InvalidInput(f"{what} is {len(data)} bytes (allowed: at most {MAX_INPUT_BYTES})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in FORMATS:
                raise InvalidInput(f"{what} is {image.format or 'not an image'} (allowed: PNG, JPEG, WEBP)")
            if max(image.size) > MAX_INPUT_SIDE:
                raise InvalidInput(f"{what} is {image.width}x{image.height} (allowed: sides up to {MAX_INPUT_SIDE})")
            image.load()
    except InvalidInput:
        raise
    except Exception as e:
        raise InvalidInput(f"{what} is not a readable image: {e}") from None
    return image


class Inputs:
    """Resolves the input references of one batch; remembers local files to upload at submit."""

    def __init__(self, store: Store | None, local_dir: Path | None) -> None:
        self.store = store
        self.local_dir = local_dir
        self.uploads: dict[str, bytes] = {}  # key -> bytes of local files
        self._seen: dict[str, dict[str, object]] = {}

    def resolve(self, ref: str) -> dict[str, object]:
        """{key, sha256, width, height} for a reference; InvalidInput says what is wrong."""
        if ref not in self._seen:
            self._seen[ref] = self._resolve(ref)
        return self._seen[ref]

    def _resolve(self, ref: str) -> dict[str, object]:
        if ref.startswith(LOCAL_PREFIX):
            data, key = self._local(ref.removeprefix(LOCAL_PREFIX))
        else:
            data, key = self._bucket(ref)
        image = open_image(data, repr(ref))
        sha = hashlib.sha256(data).hexdigest()
        if key is None:
            key = input_key(sha, FORMATS[str(image.format)])
            self.uploads[key] = data
        return {"key": key, "sha256": sha, "width": image.width, "height": image.height}

    def _local(self, name: str) -> tuple[bytes, None]:
        if self.local_dir is None:
            raise InvalidInput(f"'{LOCAL_PREFIX}{name}': local inputs need SDFARM_INPUTS_DIR")
        root = self.local_dir.resolve()
        path = (root / name).resolve()
        if not path.is_relative_to(root):
            raise InvalidInput(f"'{LOCAL_PREFIX}{name}' is outside SDFARM_INPUTS_DIR")
        try:
            return path.read_bytes(), None
        except OSError as e:
            raise InvalidInput(f"'{LOCAL_PREFIX}{name}': {e.strerror}") from None

    def _bucket(self, ref: str) -> tuple[bytes, str]:
        key = ref
        if ref.startswith("s3://"):
            bucket, _, key = ref.removeprefix("s3://").partition("/")
            if self.store is not None and bucket != self.store.bucket:
                raise InvalidInput(f"{ref!r} is in bucket {bucket!r}; inputs must be in {self.store.bucket!r}")
        if not _KEY_RE.match(key) or ".." in key.split("/"):
            raise InvalidInput(f"{ref!r} is not an input reference (allowed: a key in the bucket such as"
                               f" inputs/cat.png, s3://BUCKET/KEY, or {LOCAL_PREFIX}PATH under SDFARM_INPUTS_DIR)")
        if self.store is None:
            raise InvalidInput(f"{ref!r}: reading inputs needs the bucket (S3 settings)")
        try:
            return self.store.get(key), key
        except MissingObject:
            raise InvalidInput(f"{ref!r} does not exist in s3://{self.store.bucket}/") from None
