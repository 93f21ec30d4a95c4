"""Files a job needs on this worker: LoRAs, embeddings, VAEs and upscaler models (fetched once into
the local cache), the mask model, and input images (read from the bucket per job), each verified
before use.

A job names each file by registry name or bucket key, and by sha256 (filled in when the batch was
planned). The worker trusts neither the bucket nor the disk: a file is used only after its sha256
matches.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import uuid
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from sdfarm.errors import AssetError, InvalidInput
from sdfarm.inputs import open_image
from sdfarm.jobs import ImageRef, RenderJob
from sdfarm.models import AssetEntry, AssetKind, ModelEntry, Registry, a1111_lora_hash
from sdfarm.store import MissingObject, Store

log = logging.getLogger("sdfarm.worker")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class AssetFiles:
    """Registry name + expected sha256 -> a verified local file."""

    def __init__(self, registry: Registry, store: Store | None, cache_dir: Path) -> None:
        self.registry = registry
        self.store = store
        self.folder = cache_dir / "assets"
        self._verified: dict[str, Path] = {}  # sha256 -> fetched file, checked in this process
        self.lora_hashes: dict[str, str] = {}  # sha256 -> A1111's short LoRA hash, for infotexts

    def path(self, kind: AssetKind, name: str, sha256: str) -> Path:
        """The verified file (or folder, for path: sources) of a registered asset."""
        try:
            entry = self.registry.asset(kind, name)
        except InvalidInput as e:
            raise AssetError(f"{e} on this worker") from e
        if entry.path is not None:
            return self._folder(entry, sha256)
        if entry.file is not None:  # checked every time (the hash cache makes it cheap): it may be replaced
            return self._local(entry, sha256)
        if entry.sha256 != sha256:
            raise AssetError(f"{entry.kind} {entry.name!r}: this worker's registry says sha256 "
                             f"{(entry.sha256 or '?')[:12]}…, the job was planned with {sha256[:12]}…")
        return self.fetch(f"{entry.kind} {entry.name!r}", entry.s3_key, sha256)

    def checkpoint(self, entry: ModelEntry) -> Path:
        """A model's single-file checkpoint from the bucket (an s3: entry), fetched and verified."""
        assert entry.sha256 is not None
        return self.fetch(f"model {entry.name!r}", entry.s3_key, entry.sha256)

    def fetch(self, what: str, key: str, sha256: str) -> Path:
        """The bucket's `key`, as a file in the cache named by its sha256: downloaded once, checked
        against the sha256, and only then visible under its final name."""
        if sha256 not in self._verified:
            self._verified[sha256] = self._fetched(what, key, sha256)
        return self._verified[sha256]

    def for_jobs(self, jobs: Iterable[RenderJob]) -> dict[str, Path]:
        """Every LoRA, embedding, VAE and upscaler file the jobs use, by sha256."""
        files: dict[str, Path] = {}
        for job in jobs:
            if job.vae is not None:
                files[job.vae.sha256] = self.path("vae", job.vae.name, job.vae.sha256)
            for lora in job.loras:
                files[lora.sha256] = self.path("lora", lora.name, lora.sha256)
                if lora.sha256 not in self.lora_hashes:
                    self.lora_hashes[lora.sha256] = a1111_lora_hash(files[lora.sha256])
            for emb in job.embeddings:
                files[emb.sha256] = self.path("embedding", emb.name, emb.sha256)
            for spec in (job.hires, job.upscale):
                if spec is not None and spec.upscaler_sha256 is not None:
                    files[spec.upscaler_sha256] = self.path("upscaler", spec.upscaler, spec.upscaler_sha256)
        return files

    def _folder(self, entry: AssetEntry, sha256: str) -> Path:
        """A registered folder (CLIPSeg, a diffusers VAE), if it is still what the job was planned with."""
        try:
            actual = self.registry.asset_identity(entry.kind, entry.name)
        except InvalidInput as e:
            raise AssetError(f"{e} on this worker") from e
        if actual != sha256:
            raise AssetError(f"{entry.kind} {entry.name!r}: {entry.path} has identity {actual[:12]}…, the job was"
                             f" planned with {sha256[:12]}…")
        assert entry.path is not None
        return entry.path

    def image(self, ref: ImageRef, mask: bool = False) -> Image.Image:
        """An input image from the bucket, decoded, if its bytes still have the planned sha256: RGB; a
        mask in RGBA when it has transparency (A1111 reads a translucent mask's alpha), else grey."""
        if self.store is None:
            raise AssetError(f"input {ref.key} lives in S3, and this worker has no bucket")
        try:
            data = self.store.get(ref.key)
        except MissingObject as e:
            raise AssetError(f"input {e}") from e
        actual = hashlib.sha256(data).hexdigest()
        if actual != ref.sha256:
            raise AssetError(f"input s3://{self.store.bucket}/{ref.key} has sha256 {actual[:12]}…, the job was"
                             f" planned with {ref.sha256[:12]}…; it was replaced after submit")
        try:
            return as_input(open_image(data, ref.key), mask)
        except InvalidInput as e:
            raise AssetError(str(e)) from e

    def _local(self, entry: AssetEntry, sha256: str) -> Path:
        assert entry.file is not None
        if not entry.file.is_file():
            raise AssetError(f"{entry.kind} {entry.name!r}: {entry.file} does not exist on this worker")
        actual = self.registry.cache.file_sha256(entry.file)
        if actual != sha256:
            raise AssetError(f"{entry.kind} {entry.name!r}: {entry.file} has sha256 {actual[:12]}…, the job was"
                             f" planned with {sha256[:12]}…; resubmit to render with the file as it is now")
        return entry.file

    def _fetched(self, what: str, key: str, sha256: str) -> Path:
        if self.store is None:
            raise AssetError(f"{what} lives in S3, and this worker has no bucket")
        target = self.folder / f"{sha256}{Path(key).suffix}"
        self.folder.mkdir(parents=True, exist_ok=True)
        # one download per file at a time, across the processes (and containers) sharing this cache:
        # the lock is held for the whole download, so any .part found while holding it is stale
        with (self.folder / f"{sha256}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if target.is_file() and self.registry.cache.file_sha256(target) == sha256:
                return target  # a peer fetched it while we waited, or an earlier run did
            for stale in self.folder.glob(f"{target.name}.*.part"):  # left by a worker killed mid-download
                stale.unlink(missing_ok=True)
            partial = target.with_name(f"{target.name}.{uuid.uuid4().hex}.part")
            try:
                self.store.download(key, partial)
                actual = _sha256(partial)
                if actual != sha256:
                    raise AssetError(f"{what}: s3://{self.store.bucket}/{key} has sha256 {actual[:12]}…, the"
                                     f" registry says {sha256[:12]}…; not loaded")
                partial.replace(target)  # whole, verified files only ever appear under the final name
            except MissingObject as e:
                raise AssetError(f"{what}: {e}") from e
            finally:
                partial.unlink(missing_ok=True)
        log.info("%s fetched from s3://%s/%s (%s)", what.replace("'", ""), self.store.bucket, key, sha256[:12])
        return target


def as_input(image: Image.Image, mask: bool) -> Image.Image:
    """A decoded input image as the render takes it: RGB; a mask in RGBA when it has transparency
    (A1111 reads a translucent mask's alpha: masks.finish_mask), else grey levels."""
    if not mask:
        return image.convert("RGB")
    return image.convert("RGBA") if image.has_transparency_data else image.convert("L")
