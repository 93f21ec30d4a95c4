"""LoRA and embedding files on this worker: fetched once into the local cache, verified, then used.

A job names each file by registry name and sha256 (filled in when the batch was planned). The
worker trusts neither the bucket nor the disk: a file is loaded only after its sha256 matches.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from sdfarm.errors import AssetError, InvalidInput
from sdfarm.jobs import RenderJob
from sdfarm.models import AssetEntry, AssetKind, Registry
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
        self._verified: dict[str, Path] = {}  # sha256 -> file, checked in this process

    def path(self, kind: AssetKind, name: str, sha256: str) -> Path:
        if sha256 in self._verified:
            return self._verified[sha256]
        try:
            entry = self.registry.asset(kind, name)
        except InvalidInput as e:
            raise AssetError(f"{e} on this worker") from e
        path = self._local(entry, sha256) if entry.file is not None else self._fetched(entry, sha256)
        self._verified[sha256] = path
        return path

    def for_jobs(self, jobs: Iterable[RenderJob]) -> dict[str, Path]:
        """Every LoRA and embedding file the jobs use, by sha256."""
        files: dict[str, Path] = {}
        for job in jobs:
            for lora in job.loras:
                files[lora.sha256] = self.path("lora", lora.name, lora.sha256)
            for emb in job.embeddings:
                files[emb.sha256] = self.path("embedding", emb.name, emb.sha256)
        return files

    def _local(self, entry: AssetEntry, sha256: str) -> Path:
        assert entry.file is not None
        if not entry.file.is_file():
            raise AssetError(f"{entry.kind} {entry.name!r}: {entry.file} does not exist on this worker")
        actual = self.registry.cache.file_sha256(entry.file)
        if actual != sha256:
            raise AssetError(f"{entry.kind} {entry.name!r}: {entry.file} has sha256 {actual[:12]}…, the job was"
                             f" planned with {sha256[:12]}…; resubmit to render with the file as it is now")
        return entry.file

    def _fetched(self, entry: AssetEntry, sha256: str) -> Path:
        if entry.sha256 != sha256:
            raise AssetError(f"{entry.kind} {entry.name!r}: this worker's registry says sha256 "
                             f"{(entry.sha256 or '?')[:12]}…, the job was planned with {sha256[:12]}…")
        if self.store is None:
            raise AssetError(f"{entry.kind} {entry.name!r} lives in S3, and this worker has no bucket")
        target = self.folder / f"{sha256}{Path(entry.s3_key).suffix}"
        if target.is_file() and self.registry.cache.file_sha256(target) == sha256:
            return target
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.part")
        try:
            self.store.download(entry.s3_key, partial)
            actual = _sha256(partial)
            if actual != sha256:
                raise AssetError(f"{entry.kind} {entry.name!r}: s3://{self.store.bucket}/{entry.s3_key} has sha256"
                                 f" {actual[:12]}…, the registry says {sha256[:12]}…; not loaded")
            partial.replace(target)  # whole, verified files only ever appear under the final name
        except MissingObject as e:
            raise AssetError(f"{entry.kind} {entry.name!r}: {e}") from e
        finally:
            partial.unlink(missing_ok=True)
        log.info("%s %s fetched from s3://%s/%s (%s)", entry.kind, entry.name, self.store.bucket, entry.s3_key,
                 sha256[:12])
        return target
