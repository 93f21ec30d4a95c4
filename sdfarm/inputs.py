"""Input images (img2img init images, inpainting masks): checked at submit, identified by sha256.

A batch names an input as a key in the bucket (`inputs/cat.png`, or `s3://BUCKET/inputs/cat.png`
for this farm's bucket), or as a file under SDFARM_INPUTS_DIR (`local:cat.png`). The producer
reads each one once, refuses what is missing, too large or not a readable image, and records its
key, sha256 and size in the job; a local file is uploaded to `inputs/<sha256>.<ext>` when the
batch is submitted. Workers fetch the key and render only if the bytes still have that sha256.

Every file a user names (an input, a batch file, a dataset spec) is opened with `open_regular`:
only a regular file is read, its size is checked before a byte is read, and the reading stops at
the cap. A FIFO would block, and /dev/zero (or a symlink to it: `st_size` 0) would never end.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import warnings
from pathlib import Path
from typing import BinaryIO, Final

from PIL import Image

from .errors import InvalidInput, brief
from .jobs import INPUT_KEY_PATTERN
from .layout import input_key
from .store import MissingObject, Store

MAX_INPUT_BYTES: Final = 32 * 1024 * 1024
MAX_INPUT_SIDE: Final = 4096
FORMATS: Final = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
LOCAL_PREFIX: Final = "local:"
_KEY_RE: Final = re.compile(INPUT_KEY_PATTERN)


_KINDS: Final = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                 (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def open_regular(path: Path, max_bytes: int) -> BinaryIO:
    """Open a file to read, if it is a regular file of at most max_bytes (symlinks followed; the
    checks are on the opened file, so it cannot be swapped in between). InvalidInput says why
    not, without the path: the caller names the file."""
    try:  # O_NONBLOCK: opening a FIFO without a writer returns at once, to be refused below
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidInput(e.strerror or type(e).__name__) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a file")
            raise InvalidInput(f"is {kind} (allowed: a regular file)")
        if info.st_size > max_bytes:
            raise InvalidInput(f"is {info.st_size} bytes (allowed: at most {max_bytes})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path, max_bytes: int) -> bytes:
    """A regular file's bytes, at most max_bytes of them (a file that grew past the cap while
    being read is refused too)."""
    with open_regular(path, max_bytes) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise InvalidInput(e.strerror or type(e).__name__) from None
    if len(data) > max_bytes:
        raise InvalidInput(f"is more than {max_bytes} bytes (allowed: at most {max_bytes})")
    return data


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
    """Resolves the input references of one batch; remembers local files, and images held as bytes
    (`hold`), to upload at submit."""

    def __init__(self, store: Store | None, local_dir: Path | None, remote: bool = False) -> None:
        self.store = store
        self.local_dir = local_dir
        self.remote = remote  # a batch from the network (the API): `local:` names no file of this host
        self.uploads: dict[str, bytes] = {}  # key -> bytes of local files
        self._seen: dict[str, dict[str, object]] = {}

    def resolve(self, ref: str) -> dict[str, object]:
        """{key, sha256, width, height} for a reference; InvalidInput says what is wrong."""
        if ref not in self._seen:
            self._seen[ref] = self._resolve(ref)
        return self._seen[ref]

    def hold(self, data: bytes, what: str) -> str:
        """An input given as bytes (the HTTP API's base64 images), checked now and uploaded to
        inputs/<sha256>.<ext> when the batch is submitted; returns the reference a batch item names
        it by. InvalidInput, naming it `what`, when it is not an image allowed as an input."""
        found = self._checked(data, None, what)
        self._seen[str(found["key"])] = found
        return str(found["key"])

    def _resolve(self, ref: str) -> dict[str, object]:
        if ref.startswith(LOCAL_PREFIX):
            data, key = self._local(ref.removeprefix(LOCAL_PREFIX))
        else:
            data, key = self._bucket(ref)
        return self._checked(data, key, brief(ref))

    def _checked(self, data: bytes, key: str | None, what: str) -> dict[str, object]:
        """{key, sha256, width, height} of an input's bytes; an input not yet in the bucket (key None)
        is uploaded at submit, named by its sha256."""
        image = open_image(data, what)
        sha = hashlib.sha256(data).hexdigest()
        if key is None:
            key = input_key(sha, FORMATS[str(image.format)])
            self.uploads[key] = data
        return {"key": key, "sha256": sha, "width": image.width, "height": image.height}

    def _local(self, name: str) -> tuple[bytes, None]:
        if self.remote:
            raise InvalidInput(f"{brief(LOCAL_PREFIX + name)}: local inputs are files of the machine that submits;"
                               " a batch sent to the API names inputs in the bucket (inputs/...)")
        if self.local_dir is None:
            raise InvalidInput(f"{brief(LOCAL_PREFIX + name)}: local inputs need SDFARM_INPUTS_DIR")
        root = self.local_dir.resolve()
        path = (root / name).resolve()
        if not path.is_relative_to(root):
            raise InvalidInput(f"{brief(LOCAL_PREFIX + name)} is outside SDFARM_INPUTS_DIR")
        try:  # stat before reading: a file over the cap is never read
            return read_regular(path, MAX_INPUT_BYTES), None
        except InvalidInput as e:
            raise InvalidInput(f"{brief(LOCAL_PREFIX + name)}: {e}") from None

    def _bucket(self, ref: str) -> tuple[bytes, str]:
        key = ref
        if ref.startswith("s3://"):
            bucket, _, key = ref.removeprefix("s3://").partition("/")
            if self.store is not None and bucket != self.store.bucket:
                raise InvalidInput(f"{brief(ref)} is in bucket {brief(bucket)};"
                                   f" inputs must be in {self.store.bucket!r}")
        if not _KEY_RE.match(key) or ".." in key.split("/"):
            raise InvalidInput(f"{brief(ref)} is not an input reference (allowed: a key in the bucket such as"
                               f" inputs/cat.png, s3://BUCKET/KEY, or {LOCAL_PREFIX}PATH under SDFARM_INPUTS_DIR)")
        if self.store is None:
            raise InvalidInput(f"{brief(ref)}: reading inputs needs the bucket (S3 settings)")
        try:
            return self.store.get(key, max_bytes=MAX_INPUT_BYTES), key
        except MissingObject:
            raise InvalidInput(f"{brief(ref)} does not exist in s3://{self.store.bucket}/") from None
        except InvalidInput as e:
            raise InvalidInput(f"{brief(ref)} {e}") from None
