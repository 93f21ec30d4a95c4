"""The model registry: models are named by the operator, never by joining user text onto a path.

A registry is YAML (a file, or inline text in SDFARM_MODELS):

    models:
      tiny-sd15:
        path: models/tiny-sd15          # a diffusers folder (relative to the registry file)
      sdxl-base:
        path: models/sdxl-base-1.0
        family: sdxl                    # sd15 (the default), sdxl or sdxl-refiner: which pipeline renders it
      sdxl-refiner:
        path: models/sdxl-refiner-1.0
        family: sdxl-refiner            # renders only as a job's `refiner:`, never as its model
      v1-5:
        file: /models/v1-5-pruned-emaonly.safetensors   # a single-file checkpoint
        config: /models/sd15-config     # diffusers-format folder with the configs (offline)
        sha256: 6ce0161689...           # optional: skips hashing a large file
      v1-5-from-bucket:
        s3: checkpoints/v1-5-pruned-emaonly.safetensors   # the key models/checkpoints/... in the bucket
        sha256: 6ce0161689...           # required: workers download once, verify, then load
        config: /models/sd15-config
      hub-model:
        hub: org/name
        revision: 0123abcd...           # pin a commit: it is the model's identity
    loras:
      add_detail:
        file: loras/add_detail.safetensors   # a local file (A1111/kohya or diffusers layout)
      film-grain:
        s3: loras/film_grain.safetensors     # a key under the bucket's models/ prefix
        sha256: 7c6bad76eb54...             # required for s3: workers verify the download
    embeddings:
      EasyNegative:
        file: embeddings/easynegative.safetensors   # used by writing its name in a prompt
    vaes:
      sdxl-vae-fp16-fix:
        path: vaes/sdxl-vae-fp16-fix        # a diffusers AutoencoderKL folder, or file:/s3: single file
        family: sdxl                        # LoRAs, embeddings and VAEs name the family they fit (sd15)
    upscalers:
      4x-UltraSharp:
        file: upscalers/4x-UltraSharp.safetensors   # ESRGAN-family files, anything spandrel reads
      RealESRGAN_x4plus:
        file: upscalers/RealESRGAN_x4plus.pth       # a pickle: loaded with spandrel's restricted
        allow_pickle: true                          # unpickler, and only when the operator opts in
    mask_models:
      clipseg:
        path: models/clipseg-rd64-refined   # a transformers CLIPSeg folder: text -> inpainting mask

Each model's identity is a sha256: of the file, of the folder's files, or of the hub id and revision.
LoRAs and embeddings are identified by the sha256 of their file; A1111 records the first 12 digits.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InvalidInput, UnknownModel
from .jobs import ASSET_NAME_PATTERN, HIRES_UPSCALERS, MODEL_NAME_PATTERN, SHA256_PATTERN
from .layout import ASSETS_PREFIX
from .settings import Settings

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
SAFETENSORS_HEADER_MAX: Final = 100_000_000  # the safetensors format's own bound on its JSON header
ASSET_KEY_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,255}$"
AssetKind = Literal["lora", "embedding", "vae", "upscaler", "mask_model"]
Family = Literal["sd15", "sdxl"]  # SD 1.x; SDXL base
ModelFamily = Literal["sd15", "sdxl", "sdxl-refiner"]  # a model's: SDXL's refiner only takes over a render
REFINER: Final = "sdxl-refiner"
# a job's model family -> the families of models that may take over its render as its refiner (A1111
# switches to any checkpoint whose latents are the same: the same family, or SDXL's refiner for SDXL)
REFINES: Final[dict[str, tuple[str, ...]]] = {"sd15": ("sd15",), "sdxl": ("sdxl", REFINER)}
ASSET_SECTIONS: Final[dict[str, AssetKind]] = {"loras": "lora", "embeddings": "embedding", "vaes": "vae",
                                               "upscalers": "upscaler", "mask_models": "mask_model"}
FAMILY_FREE: Final[tuple[AssetKind, ...]] = ("upscaler", "mask_model")  # fit any model family
# weight and config files that make up a diffusers folder's identity
_FOLDER_SUFFIXES = (".safetensors", ".json", ".txt", ".model")


class ModelEntry(BaseModel):
    """One registered model. Exactly one of path, file, s3 and hub is set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    family: ModelFamily = "sd15"
    path: Path | None = None
    file: Path | None = None
    s3: str | None = Field(default=None, pattern=ASSET_KEY_PATTERN)  # a single file under the bucket's models/
    config: Path | None = None
    hub: str | None = None
    revision: str = "main"
    sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    allow_pickle: bool = False  # an operator's explicit opt-in for .ckpt/.bin weights

    @model_validator(mode="after")
    def _one_source(self) -> ModelEntry:
        sources = [s for s in ("path", "file", "s3", "hub") if getattr(self, s) is not None]
        if len(sources) != 1:
            raise ValueError(f"set exactly one of path, file, s3, hub (got {', '.join(sources) or 'none'})")
        if self.file is not None:
            _check_weights_file(self.file, self.allow_pickle)
        if self.s3 is not None:
            if ".." in self.s3.split("/"):
                raise ValueError(f"s3 key {self.s3!r} must not contain '..'")
            if self.sha256 is None or self.config is None:
                raise ValueError("an s3 checkpoint needs its sha256 (workers verify the download) and config:"
                                 " (a diffusers-format folder with the configs, to load it offline)")
            _check_weights_file(self.s3, self.allow_pickle)
        return self

    @property
    def s3_key(self) -> str:
        assert self.s3 is not None
        return ASSETS_PREFIX + self.s3

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

    @property
    def infotext_name(self) -> str:
        """A1111's "Model": the checkpoint file's stem; the registry name where there is no file."""
        single = self.file if self.file is not None else self.s3
        return Path(single).stem if single is not None else self.name


def _check_weights_file(file: Path | str, allow_pickle: bool) -> None:
    name = Path(file).name
    suffix = Path(file).suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ValueError(f"{name} is a pickle file, which can run code when loaded; convert it to"
                         " .safetensors, or set allow_pickle: true if you trust it")
    if suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise ValueError(f"{name}: expected a .safetensors file")


class AssetEntry(BaseModel):
    """A LoRA, a textual-inversion embedding, a VAE or an upscaler model: one weights file, local
    (file) or in the bucket (s3). A VAE may also be a diffusers AutoencoderKL folder (path); a mask
    model (CLIPSeg) is a local transformers folder (path)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: AssetKind
    name: str = Field(pattern=ASSET_NAME_PATTERN)
    family: Family = "sd15"  # the model family a LoRA, embedding or VAE fits
    file: Path | None = None
    path: Path | None = None
    s3: str | None = Field(default=None, pattern=ASSET_KEY_PATTERN)
    sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    allow_pickle: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> AssetEntry:
        allowed = {"mask_model": ("path",), "vae": ("file", "s3", "path")}.get(self.kind, ("file", "s3"))
        sources = [s for s in ("file", "path", "s3") if getattr(self, s) is not None]
        if len(sources) != 1 or sources[0] not in allowed:
            raise ValueError(f"set exactly one of {', '.join(allowed)} (got {', '.join(sources) or 'none'})")
        if self.path is not None:
            return self
        if self.s3 is not None:
            if ".." in self.s3.split("/"):
                raise ValueError(f"s3 key {self.s3!r} must not contain '..'")
            if self.sha256 is None:
                raise ValueError("an s3 source needs its sha256, so that workers can verify the download")
        _check_weights_file(self.file or self.s3 or "", self.allow_pickle)
        suffix = Path(self.file or self.s3 or "").suffix.lower()
        if self.kind == "vae" and suffix in PICKLE_SUFFIXES:
            raise ValueError("a VAE loads from a .safetensors file or a diffusers folder only")
        if self.kind == "upscaler" and suffix not in (".safetensors", ".pth", ".ckpt"):
            raise ValueError("an upscaler loads from a .safetensors file, or a .pth/.ckpt with allow_pickle: true")
        if self.kind == "upscaler" and self.name in HIRES_UPSCALERS:
            raise ValueError(f"{self.name!r} is a built-in upscaler's name; register the model under another")
        return self

    @property
    def s3_key(self) -> str:
        assert self.s3 is not None
        return ASSETS_PREFIX + self.s3

    @property
    def file_name(self) -> str:
        """The registered file's name with its extension (a folder's name), as A1111 records a VAE."""
        return Path(str(self.file if self.file is not None else self.path if self.path is not None else self.s3)).name

    def identity(self, cache: HashCache) -> str:
        """The file's sha256; a registered sha256 is checked against a local file when it differs."""
        if self.path is not None:
            if not (self.path / "config.json").is_file():
                raise UnknownModel(f"{self.kind} {self.name!r}: {self.path} is not a model folder (no config.json)")
            return self.sha256 or folder_sha256(self.path, cache)
        if self.file is None:
            assert self.sha256 is not None
            return self.sha256
        if not self.file.is_file():
            raise UnknownModel(f"{self.kind} {self.name!r}: file {self.file} does not exist")
        actual = cache.file_sha256(self.file)
        if self.sha256 is not None and actual != self.sha256:
            raise InvalidInput(f"{self.kind} {self.name!r}: {self.file} has sha256 {actual[:12]}…, the registry"
                               f" says {self.sha256[:12]}…")
        return actual


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


def safetensors_header(path: Path) -> dict[str, Any]:
    """A .safetensors file's JSON header (tensor names, `__metadata__`); {} for another file or a
    damaged header, which is refused where the file is loaded, with its reason."""
    if path.suffix.lower() != ".safetensors":
        return {}
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(size)) if 0 < size <= SAFETENSORS_HEADER_MAX else {}
        except ValueError:
            return {}
    return header if isinstance(header, dict) else {}


def a1111_lora_hash(path: Path) -> str:
    """The short hash A1111 records for a LoRA (extensions-builtin/Lora/network.py, NetworkOnDisk):
    the file's `sshs_model_hash` metadata when it has one, else its addnet hash; 12 hex digits."""
    metadata = safetensors_header(path).get("__metadata__")
    given = metadata.get("sshs_model_hash") if isinstance(metadata, dict) else None
    if isinstance(given, str) and given:
        return given[:12]
    return addnet_hash(path)[:12]


# LyCORIS network types diffusers cannot load, by the end of a tensor name only they use (LoRA and
# LoCon, lora_down/lora_up on linear and conv layers, load)
_LYCORIS: Final = ((re.compile(r"\.hada_w1_a$"), "LoHa"), (re.compile(r"\.lokr_w1(_a)?$"), "LoKr"),
                   (re.compile(r"\.oft_(blocks|diag)$"), "OFT"), (re.compile(r"\.on_input$"), "(IA)^3"),
                   (re.compile(r"\.a1\.weight$"), "GLoRA"), (re.compile(r"\.diff(_b)?$"), "Full"),
                   (re.compile(r"\.lora_mid\.weight$"), "LoCon with a Tucker (CP) decomposition"))


def lora_refusal(path: Path) -> str | None:
    """Why a LoRA file cannot be rendered (a LyCORIS type diffusers cannot load), or None."""
    for name in safetensors_header(path):
        for pattern, kind in _LYCORIS:
            if pattern.search(name):
                return (f"{path.name} is a LyCORIS {kind} ({name!r}): diffusers loads LoRA and LoCon networks,"
                        f" not {kind}")
    return None


def addnet_hash(path: Path) -> str:
    """A1111's LoRA hash (its "Lora hashes", Civitai's AutoV3): the sha256 of a .safetensors file
    after its JSON header, so editing metadata keeps it. Other files: the whole file's sha256."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if path.suffix.lower() == ".safetensors":
            header = int.from_bytes(f.read(8), "little")
            f.seek(8 + header)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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

    def __init__(self, entries: dict[str, ModelEntry], cache: HashCache,
                 assets: dict[tuple[AssetKind, str], AssetEntry] | None = None) -> None:
        self.entries = entries
        self.cache = cache
        self.assets = assets or {}
        self._identities: dict[str, str] = {}
        self._asset_identities: dict[tuple[AssetKind, str], str] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        entries: dict[str, ModelEntry] = {}
        assets: dict[tuple[AssetKind, str], AssetEntry] = {}
        if settings.models_file is not None:
            path = settings.models_file
            try:
                text = path.read_text()
            except OSError as e:
                raise InvalidInput(f"model registry {path}: {e.strerror}") from e
            entries.update(parse_registry(text, str(path), base=path.parent))
            assets.update(parse_assets(text, str(path), base=path.parent))
        if settings.models:
            entries.update(parse_registry(settings.models, "SDFARM_MODELS", base=Path.cwd()))
            assets.update(parse_assets(settings.models, "SDFARM_MODELS", base=Path.cwd()))
        return cls(entries, HashCache(settings.cache_dir), assets)

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

    def renderable(self, name: str) -> ModelEntry:
        """A model a job may name as its model: an SDXL refiner only ever takes over another's render."""
        entry = self.get(name)
        if entry.family == REFINER:
            others = ", ".join(n for n in self.names() if self.entries[n].family != REFINER) or "none registered"
            raise InvalidInput(f"model {name!r} is an SDXL refiner: it renders only as a job's refiner, after an"
                               f" sdxl model (allowed: {others})")
        return entry

    def refiner_names(self, family: str) -> list[str]:
        return [n for n in self.names() if self.entries[n].family in REFINES.get(family, ())]

    def refiner_identity(self, name: str, family: str) -> str:
        """The sha256 of a model that takes over a render of a `family` model (REFINES)."""
        entry = self.get(name)
        if entry.family not in REFINES.get(family, ()):
            raise InvalidInput(f"refiner {name!r} is a {entry.family} model; this job's model is {family}"
                               f" (allowed: {', '.join(self.refiner_names(family)) or 'none registered'})")
        return self.identity(name)


    def asset_names(self, kind: AssetKind, family: str | None = None) -> list[str]:
        """Registered names of a kind; with a family, only the files made for it."""
        return sorted(name for (k, name), entry in self.assets.items()
                      if k == kind and (family is None or entry.family == family))

    def asset(self, kind: AssetKind, name: str) -> AssetEntry:
        if not isinstance(name, str) or (kind, name) not in self.assets:
            known = ", ".join(self.asset_names(kind)) or "none registered"
            raise UnknownModel(f"unknown {kind} {name!r} (allowed: {known})")
        return self.assets[(kind, name)]

    def asset_identity(self, kind: AssetKind, name: str, family: str | None = None) -> str:
        """The asset's sha256. With a family (the job's model's), a LoRA or VAE made for another
        family is refused: its layers do not fit."""
        entry = self.asset(kind, name)
        if family is not None and kind not in FAMILY_FREE and entry.family != family:
            raise InvalidInput(f"{kind} {name!r} is for {entry.family} models; this job's model is {family}"
                               f" (allowed: {', '.join(self.asset_names(kind, family)) or 'none registered'})")
        if (kind, name) not in self._asset_identities:
            if kind == "lora" and entry.file is not None and (refusal := lora_refusal(entry.file)):
                raise InvalidInput(f"lora {name!r}: {refusal}")
            self._asset_identities[(kind, name)] = entry.identity(self.cache)
        return self._asset_identities[(kind, name)]


def _load_yaml(text: str, source: str) -> dict[str, object]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise InvalidInput(f"model registry {source}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise InvalidInput(f"model registry {source}: expected a mapping with 'models:'")
    unknown = set(data) - {"models", *ASSET_SECTIONS}
    if unknown:
        raise InvalidInput(f"model registry {source}: unknown section {sorted(unknown)[0]!r}"
                           f" (allowed: models, {', '.join(ASSET_SECTIONS)})")
    return data


def _details(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, x['loc'])) or 'entry'}: {x['msg']}" for x in e.errors())


def parse_assets(text: str, source: str, base: Path) -> dict[tuple[AssetKind, str], AssetEntry]:
    """The asset sections of a registry: loras, embeddings, vaes, upscalers, mask_models."""
    data = _load_yaml(text, source)
    assets: dict[tuple[AssetKind, str], AssetEntry] = {}
    for section, kind in ASSET_SECTIONS.items():
        specs = data.get(section) or {}
        if not isinstance(specs, dict):
            raise InvalidInput(f"model registry {source}: expected a mapping '{section}: {{name: {{...}}}}'")
        for name, spec in specs.items():
            if not isinstance(spec, dict):
                raise InvalidInput(f"model registry {source}: {kind} {name!r}: expected a mapping")
            spec = dict(spec)
            for key in ("file", "path"):
                if spec.get(key) is not None:
                    spec[key] = (base / Path(os.path.expanduser(str(spec[key])))).resolve()
            try:
                assets[(kind, str(name))] = AssetEntry(kind=kind, name=str(name), **spec)
            except ValidationError as e:
                raise InvalidInput(f"model registry {source}: {kind} {name!r}: {_details(e)}") from e
        lowered = [name.lower() for k, name in assets if k == kind]
        if len(set(lowered)) != len(lowered):  # prompts are lower-cased before embeddings are found
            raise InvalidInput(f"model registry {source}: two {section} differ only in case")
    return assets


def parse_registry(text: str, source: str, base: Path) -> dict[str, ModelEntry]:
    data = _load_yaml(text, source)
    models = data.get("models")
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
            raise InvalidInput(f"model registry {source}: model {name!r}: {_details(e)}") from e
    return entries
