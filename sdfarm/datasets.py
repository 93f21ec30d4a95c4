"""Dataset specs: prompt templates with wildcards, expanded the same way every time for a given
spec and run date, so a run's batch id is a function of (spec content, date).

    name: animals
    templates: ["a photo of a {animal} in {place}", "a painting of a {animal}"]
    wildcards:
      animal: [cat, dog, fox]
      place: {file: places.txt}          # one entry per line, next to the spec
    images_per_run: 500
    quota: 200                           # optional cap per run
    seeds: per-run                       # per-run: new seeds each date; fixed: the same each date
    render: {model: sd15, width: 512, height: 512, steps: 25, sampler: DPM++ 2M Karras}
    output_prefix: datasets/animals      # where automatic exports go (s3://<bucket>/<prefix>/<date>/...)
    export: [imagefolder, parquet]       # optional: export when a run completes
    schedule: {cron: "0 3 * * *", timezone: Europe/Berlin}

A template names wildcards as `{name}` and nothing else: no format spec (`{animal:>100000000}`
would make a 100 MB prompt), conversion or attribute. The spec is read as a batch file is (a
regular file, at most MAX_SPEC_BYTES, YAML within the batch limits); a word file holds at most
MAX_WORDS entries in MAX_WORD_FILE_BYTES. A webhook's key is read from a variable named
SDFARM_WEBHOOK_*, never from any other (the S3 secret, say).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
import re
import string
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .batchfile import BatchPlan, RawItem, load_yaml, plan_items
from .errors import BatchInvalid, InvalidInput, brief
from .inputs import read_regular
from .jobs import MAX_SEED, MODEL_NAME_PATTERN, USER_FIELDS
from .models import Registry

EXPORT_FORMATS = ("imagefolder", "webdataset", "parquet")
MAX_IMAGES_PER_RUN = 1_000_000
MAX_SPEC_BYTES = 1024 * 1024
MAX_WORD_FILE_BYTES = 16 * 1024 * 1024
MAX_WORDS = 1_000_000
WEBHOOK_SECRET_PREFIX = "SDFARM_WEBHOOK_"


def webhook_secret_variable(name: str) -> bool:
    """Whether a spec may name this environment variable as its webhook's HMAC key."""
    return re.fullmatch(WEBHOOK_SECRET_PREFIX + "[A-Z0-9_]+", name) is not None


class WordFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    file: str


class Schedule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    cron: str
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        from croniter import croniter

        if not croniter.is_valid(v):
            raise ValueError(f"{v!r} is not a cron expression (e.g. '0 3 * * *')")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(f"unknown time zone {v!r} (e.g. UTC, Europe/Berlin)") from e
        return v

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        from croniter import croniter

        local = moment.astimezone(ZoneInfo(self.timezone))
        nxt: dt.datetime = croniter(self.cron, local).get_next(dt.datetime)
        return nxt

    def latest(self, moment: dt.datetime) -> dt.datetime:
        """The latest due time at or before `moment`, in the schedule's time zone."""
        from croniter import croniter

        local = moment.astimezone(ZoneInfo(self.timezone))
        prev: dt.datetime = croniter(self.cron, local).get_prev(dt.datetime)
        return prev

    def due_between(self, after: dt.datetime, before: dt.datetime, limit: int) -> list[dt.datetime]:
        """Due times strictly after `after` and strictly before `before`, the first `limit` of them."""
        from croniter import croniter

        times = croniter(self.cron, after.astimezone(ZoneInfo(self.timezone)))
        found: list[dt.datetime] = []
        while len(found) < limit:
            due: dt.datetime = times.get_next(dt.datetime)
            if due >= before:
                break
            found.append(due)
        return found

    @property
    def key(self) -> str:
        """The schedule as one string: its cron and time zone."""
        return f"{self.cron} {self.timezone}"

    def run_date(self, fired_at: dt.datetime) -> dt.date:
        """The date a firing belongs to, in the schedule's own time zone."""
        return fired_at.astimezone(ZoneInfo(self.timezone)).date()


class Webhook(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    url: str = Field(pattern=r"^https?://")
    secret_env: str = "SDFARM_WEBHOOK_SECRET"  # the HMAC key is read from this variable, never the spec

    @field_validator("secret_env")
    @classmethod
    def _secret_env(cls, v: str) -> str:
        """Only a variable meant for it: a spec must not have the scheduler sign with (and so
        reveal to whoever receives the webhook) another secret of its environment."""
        if not webhook_secret_variable(v):
            raise ValueError(f"{brief(v)} is not allowed (allowed: a variable named {WEBHOOK_SECRET_PREFIX}*,"
                             " e.g. SDFARM_WEBHOOK_SECRET)")
        return v


class DatasetSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    templates: list[str] = Field(min_length=1)
    wildcards: dict[str, list[str] | WordFile] = Field(default_factory=dict)
    images_per_run: int = Field(ge=1, le=MAX_IMAGES_PER_RUN)
    quota: int | None = Field(default=None, ge=1)
    seeds: Literal["per-run", "fixed"] = "per-run"
    render: dict[str, Any] = Field(default_factory=dict)
    output_prefix: str = ""
    export: list[Literal["imagefolder", "webdataset", "parquet"]] = Field(default_factory=list)
    schedule: Schedule | None = None
    webhook: Webhook | None = None

    @field_validator("render")
    @classmethod
    def _render(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in v if k not in USER_FIELDS or k in ("prompt", "seed")]
        if bad:
            allowed = ", ".join(f for f in USER_FIELDS if f not in ("prompt", "seed"))
            raise ValueError(f"unknown field {bad[0]!r} (allowed: {allowed})")
        return v

    @model_validator(mode="after")
    def _placeholders(self) -> DatasetSpec:
        for template in self.templates:
            for _, name, spec, conversion in string.Formatter().parse(template):
                if name is None or (name in self.wildcards and not spec and not conversion):
                    continue
                shown = brief("{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
                              + "}", 60)[1:-1]
                if spec or conversion:
                    raise ValueError(f"template {brief(template)} uses {shown} (allowed: {{name}} only, no format"
                                     " spec or conversion)")
                known = ", ".join(sorted(self.wildcards)) or "none defined"
                raise ValueError(f"template {brief(template)} uses {shown}, which is not a wildcard (have: {known})")
        return self

    @property
    def images(self) -> int:
        return min(self.images_per_run, self.quota or self.images_per_run)


class LoadedSpec(BaseModel):
    """A spec with its word files read: everything that decides a run's jobs."""

    model_config = ConfigDict(frozen=True)
    spec: DatasetSpec
    words: dict[str, list[str]]
    source: str

    @property
    def digest(self) -> str:
        payload = json.dumps({"spec": self.spec.model_dump(mode="json"), "words": self.words}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


def _read_text(path: Path, max_bytes: int, what: str) -> str:
    try:
        return read_regular(path, max_bytes).decode("utf-8-sig")
    except InvalidInput as e:
        raise InvalidInput(f"{what}: {'' if str(e).startswith('is ') else 'cannot read: '}{e}") from None
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{what}: not UTF-8 text: {e.reason} at byte {e.start}") from None


def _words(path: Path, what: str) -> list[str]:
    """A word file's entries: one a line, blank lines and # comments skipped."""
    values: list[str] = []
    text = _read_text(path, MAX_WORD_FILE_BYTES, what)
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        word = text[start:end].strip()
        start = end + 1
        if word and not word.startswith("#"):
            values.append(word)
            if len(values) > MAX_WORDS:
                raise InvalidInput(f"{what}: more than {MAX_WORDS} entries (allowed: at most {MAX_WORDS})")
    return values


def load_spec(path: Path) -> LoadedSpec:
    text = _read_text(path, MAX_SPEC_BYTES, str(path))
    try:
        data = load_yaml(text, str(path))
    except BatchInvalid as e:
        raise InvalidInput(str(e.problems[0])) from None
    try:
        spec = DatasetSpec.model_validate(data)
    except ValidationError as e:
        details = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'spec'}: {x['msg'].removeprefix('Value error, ')}"
                            for x in e.errors())
        raise InvalidInput(f"{path}: {details}") from e
    base = path.parent.resolve()
    words: dict[str, list[str]] = {}
    for name, source in spec.wildcards.items():
        if isinstance(source, WordFile):
            file = (base / source.file).resolve()
            if not file.is_relative_to(base):
                raise InvalidInput(f"{path}: wildcards.{name}: {source.file} is outside the spec's folder")
            values = _words(file, f"{path}: wildcards.{name}: {source.file}")
        else:
            values = list(source)
        if not values:
            raise InvalidInput(f"{path}: wildcards.{name}: no entries")
        words[name] = values
    return LoadedSpec(spec=spec, words=words, source=str(path))


def run_name(loaded: LoadedSpec, date: dt.date) -> str:
    """Batch name of a run: the spec's name, the date and the spec's digest (an edit is a new run)."""
    return f"{loaded.spec.name}-{date.isoformat()}-{loaded.digest[:8]}"


def expand(loaded: LoadedSpec, date: dt.date) -> list[dict[str, Any]]:
    """The run's items: templates filled and seeds drawn from a generator seeded by (spec, date)."""
    spec = loaded.spec
    rng = random.Random(int.from_bytes(hashlib.sha256(f"{loaded.digest}:{date.isoformat()}".encode()).digest()[:8]))
    seed_rng = random.Random(int.from_bytes(hashlib.sha256(loaded.digest.encode()).digest()[:8])) \
        if spec.seeds == "fixed" else rng
    items = []
    for _ in range(spec.images):
        template = rng.choice(spec.templates)
        fields = {name: rng.choice(loaded.words[name]) for _, name, _, _ in string.Formatter().parse(template) if name}
        items.append({"prompt": template.format(**fields), "seed": seed_rng.randint(0, MAX_SEED)})
    return items


def plan_run(loaded: LoadedSpec, date: dt.date, registry: Registry, max_jobs: int) -> BatchPlan:
    items = [RawItem(data, n) for n, data in enumerate(expand(loaded, date), start=1)]
    header = {"name": run_name(loaded, date), "defaults": dict(loaded.spec.render)}
    return plan_items(header, items, loaded.source, "dataset", registry, max_jobs)
