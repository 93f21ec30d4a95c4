"""The model registry: models are named by the operator, never by joining user text onto a path.

A registry is YAML (a file, or inline text in SDFARM_MODELS):

    models:
      tiny-sd15:
        path: models/tiny-sd15          # a diffusers folder (relative to the registry file)
      v1-5:
        file: /models/v1-5-pruned-emaonly.safetensors   # a single-file checkpoint
        config: /models/sd15-config     # diffusers-format folder with the configs (offline)
        sha256: 6ce0161689...           # optional: skips hashing a large file
      hub-model:
        hub: org/name
        revision: 0123abcd...           # pin a commit: it is the model's identity

Each model's identity is a sha256: of the file, of the folder's files, or of the hub id and revision.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InvalidInput, UnknownModel
from .jobs import MODEL_NAME_PATTERN
from .settings import Settings

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# weight and config files that make up a diffusers folder's identity
_FOLDER_SUFFIXES = (".safetensors", ".json", ".txt", ".model")


class ModelEntry(BaseModel):
    """One registered model. Exactly one of path, file and hub is set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    family: Literal["sd15"] = "sd15"
    path: Path | None = None
    file: Path | None = None
    config: Path | None = None
    hub: str | None = None
    revision: str = "main"
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    allow_pickle: bool = False  # an operator's explicit opt-in for .ckpt/.bin weights

    @model_validator(mode="after")
    def _one_source(self) -> ModelEntry:
        sources = [s for s in ("path", "file", "hub") if getattr(self, s) is not None]
        if len(sources) != 1:
            raise ValueError(f"set exactly one of path, file, hub (got {', '.join(sources) or 'none'})")
        if self.file is not None:
            if self.file.suffix.lower() in PICKLE_SUFFIXES and not self.allow_pickle:
                raise ValueError(
                    f"{self.file.name} is a pickle checkpoint, which can run code when loaded;"
                    " convert it to .safetensors, or set allow_pickle: true if you trust it"
                )
            if self.file.suffix.lower() not in (".safetensors", *PICKLE_SUFFIXES):
                raise ValueError(f"{self.file.name}: expected a .safetensors file")
        return self

    def identity(self, cache: HashCache) -> str:
        """The sha256 that names these weights. Reads the files when no sha256 is registered."""
        if self.sha256:
            return self.sha256
        if self.hub is not None:
            return hashlib.sha256(f"hub:{self.hub}@{self.revision}".encode()).hexdigest()
        if self.file is not None:
            if not self.file.is_file():
                raise UnknownModel(f"model {self.name!r}: file {self.file} does not exist")
            return cache.file_sha256(self.file)
        assert self.path is not None
        if not (self.path / "model_index.json").is_file():
            raise UnknownModel(f"model {self.name!r}: {self.path} is not a diffusers folder (no model_index.json)")
        return folder_sha256(self.path, cache)

    def short_hash(self, cache: HashCache) -> str:
        """A1111's "Model hash": the first 10 hex digits of the checkpoint's sha256."""
        return self.identity(cache)[:10]


class HashCache:
    """sha256 of files, cached by (path, size, mtime) as A1111 does: large checkpoints hash once."""

    def __init__(self, cache_dir: Path) -> None:
        self.path = cache_dir / "hashes.json"
        try:
            self._data: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self._data = {}

    def file_sha256(self, file: Path) -> str:
        st = file.stat()
        key = f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self._data:
            digest = hashlib.sha256()
            with file.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            self._data[key] = digest.hexdigest()
            self._save()
        return self._data[key]

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._data))
            tmp.replace(self.path)
        except OSError:
            pass  # a cache that cannot be written only costs time


def folder_sha256(folder: Path, cache: HashCache) -> str:
    """Identity of a diffusers folder: its weight and config files, by relative path and content."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _FOLDER_SUFFIXES)
    pickles = [p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise InvalidInput(f"{folder} holds pickle weights ({pickles[0].name}); use safetensors")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.relative_to(folder).as_posix()}\0{cache.file_sha256(f)}\n".encode())
    return digest.hexdigest()


class Registry:
    """Named models, loaded from settings. Lookups by name only."""

    def __init__(self, entries: dict[str, ModelEntry], cache: HashCache) -> None:
        self.entries = entries
        self.cache = cache
        self._identities: dict[str, str] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        entries: dict[str, ModelEntry] = {}
        if settings.models_file is not None:
            path = settings.models_file
            try:
                text = path.read_text()
            except OSError as e:
                raise InvalidInput(f"model registry {path}: {e.strerror}") from e
            entries.update(parse_registry(text, str(path), base=path.parent))
        if settings.models:
            entries.update(parse_registry(settings.models, "SDFARM_MODELS", base=Path.cwd()))
        return cls(entries, HashCache(settings.cache_dir))

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self.entries.values())

    def names(self) -> list[str]:
        return sorted(self.entries)

    def get(self, name: str) -> ModelEntry:
        if not isinstance(name, str) or not re.match(MODEL_NAME_PATTERN, name) or name not in self.entries:
            known = ", ".join(self.names()) or "none registered"
            raise UnknownModel(f"unknown model {name!r} (allowed: {known})")
        return self.entries[name]

    def identity(self, name: str) -> str:
        entry = self.get(name)  # refuses anything that is not a registered name first
        if name not in self._identities:
            self._identities[name] = entry.identity(self.cache)
        return self._identities[name]


def parse_registry(text: str, source: str, base: Path) -> dict[str, ModelEntry]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise InvalidInput(f"model registry {source}: not valid YAML: {e}") from e
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise InvalidInput(f"model registry {source}: expected a mapping 'models: {{name: {{...}}}}'")
    entries: dict[str, ModelEntry] = {}
    for name, spec in models.items():
        if not isinstance(spec, dict):
            raise InvalidInput(f"model registry {source}: model {name!r}: expected a mapping")
        spec = dict(spec)
        for key in ("path", "file", "config"):
            if spec.get(key) is not None:
                spec[key] = (base / Path(os.path.expanduser(str(spec[key])))).resolve()
        try:
            entries[str(name)] = ModelEntry(name=str(name), **spec)
        except ValidationError as e:
            details = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'entry'}: {x['msg']}" for x in e.errors())
            raise InvalidInput(f"model registry {source}: model {name!r}: {details}") from e
    return entries
