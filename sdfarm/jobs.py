"""The unit of rendering (RenderJob), its derived id, and the chunk message that carries jobs.

A job's id is a hash of everything that affects its pixels, the model's identity (weights hash)
included. Names, priorities and batch membership do not enter it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from functools import cached_property
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .samplers import AUTOMATIC, SAMPLERS, allowed_sampler_names, split_sampler_name

SCHEMA_VERSION: Final = 1
MAX_PROMPT_CHARS: Final = 4000
MIN_SIZE: Final = 64
MAX_SIZE: Final = 2048
MAX_STEPS: Final = 150
MAX_GUIDANCE: Final = 30.0
MAX_SEED: Final = 2**32 - 1
MODEL_NAME_PATTERN: Final = r"^[a-z0-9][a-z0-9._-]{0,63}$"

# Fields a batch file may set for a job. model_hash is filled in from the registry.
USER_FIELDS: Final = (
    "model",
    "prompt",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "sampler",
    "schedule_type",
    "clip_skip",
)


def _id_of(payload: dict[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class RenderJob(BaseModel):
    """One image to render (txt2img). Frozen; its id is derived from its pixel-affecting fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = SCHEMA_VERSION
    model: str = Field(pattern=MODEL_NAME_PATTERN)  # registry name: recorded, not hashed
    model_hash: str = Field(pattern=r"^[0-9a-f]{64}$")  # sha256 identity of the weights: hashed
    prompt: str
    negative_prompt: str = ""
    seed: int
    width: int = 512
    height: int = 512
    steps: int = 30
    guidance_scale: float = 7.0
    sampler: str = "DPM++ 2M"
    schedule_type: str = AUTOMATIC
    clip_skip: int = 1

    @model_validator(mode="before")
    @classmethod
    def _split_legacy_sampler(cls, data: Any) -> Any:
        """Accept "DPM++ 2M Karras" as sampler "DPM++ 2M" with schedule type "Karras"."""
        if isinstance(data, dict) and isinstance(data.get("sampler"), str):
            sampler, schedule = split_sampler_name(data["sampler"])
            if schedule is not None:
                given = data.get("schedule_type")
                if given not in (None, AUTOMATIC, schedule):
                    raise ValueError(
                        f"sampler {data['sampler']!r} names schedule type {schedule!r}"
                        f" but schedule_type is {given!r}"
                    )
                data = {**data, "sampler": sampler, "schedule_type": schedule}
        return data

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        if len(v) > MAX_PROMPT_CHARS:
            raise ValueError(f"is {len(v)} characters long (allowed: at most {MAX_PROMPT_CHARS})")
        return v

    @field_validator("negative_prompt")
    @classmethod
    def _negative(cls, v: str) -> str:
        if len(v) > MAX_PROMPT_CHARS:
            raise ValueError(f"is {len(v)} characters long (allowed: at most {MAX_PROMPT_CHARS})")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if not 0 <= v <= MAX_SEED:
            raise ValueError(f"{v} is out of range (allowed: 0..{MAX_SEED})")
        return v

    @field_validator("width", "height")
    @classmethod
    def _size(cls, v: int) -> int:
        if not MIN_SIZE <= v <= MAX_SIZE or v % 8:
            raise ValueError(f"{v} is not allowed (allowed: a multiple of 8 from {MIN_SIZE} to {MAX_SIZE})")
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if not 1 <= v <= MAX_STEPS:
            raise ValueError(f"{v} is out of range (allowed: 1..{MAX_STEPS})")
        return v

    @field_validator("guidance_scale")
    @classmethod
    def _guidance(cls, v: float) -> float:
        if not 0 <= v <= MAX_GUIDANCE:
            raise ValueError(f"{v:g} is out of range (allowed: 0..{MAX_GUIDANCE:g})")
        return v

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, v: str) -> str:
        if v not in SAMPLERS:
            raise ValueError(f"unknown sampler {v!r} (allowed: {', '.join(allowed_sampler_names())})")
        return v

    @field_validator("clip_skip")
    @classmethod
    def _clip_skip(cls, v: int) -> int:
        if not 1 <= v <= 12:
            raise ValueError(f"{v} is out of range (allowed: 1..12)")
        return v

    @model_validator(mode="after")
    def _schedule(self) -> RenderJob:
        allowed = SAMPLERS[self.sampler]
        if self.schedule_type not in allowed:
            raise ValueError(
                f"schedule_type {self.schedule_type!r} does not apply to sampler {self.sampler!r}"
                f" (allowed: {', '.join(allowed)})"
            )
        return self

    @cached_property
    def id(self) -> str:
        """Hash of what affects the pixels. Fields left at their defaults are omitted, so adding
        a new optional field later does not change the id of existing jobs."""
        payload = self.model_dump(mode="json", exclude_defaults=True, exclude={"model", "schema_version"})
        for required in ("model_hash", "prompt", "seed"):
            payload[required] = getattr(self, required)
        return _id_of(payload)

    def compat_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share one batched pipeline call."""
        return (
            self.model,
            self.model_hash,
            self.width,
            self.height,
            self.steps,
            self.sampler,
            self.schedule_type,
            self.guidance_scale,
            self.clip_skip,
        )


class ChunkEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(ge=0)  # position of the job in its batch's jobs.jsonl
    job: RenderJob


class Chunk(BaseModel):
    """The task message: up to N compatible jobs of one batch, rendered as one pipeline call."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = SCHEMA_VERSION
    batch_id: str = Field(pattern=r"^[0-9a-f]{16,64}$")
    entries: tuple[ChunkEntry, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _compatible(self) -> Chunk:
        keys = {e.job.compat_key() for e in self.entries}
        if len(keys) != 1:
            raise ValueError("chunk mixes jobs that cannot share one pipeline call")
        return self

    @property
    def model(self) -> str:
        return self.entries[0].job.model

    @cached_property
    def id(self) -> str:
        return _id_of({"batch": self.batch_id, "jobs": [e.job.id for e in self.entries]})[:16]


def make_chunks(batch_id: str, jobs: Iterable[tuple[int, RenderJob]], size: int) -> Iterator[Chunk]:
    """Group jobs by compatibility (keeping batch order inside each group) into chunks of <= size."""
    groups: dict[tuple[Any, ...], list[ChunkEntry]] = {}
    for index, job in jobs:
        group = groups.setdefault(job.compat_key(), [])
        group.append(ChunkEntry(index=index, job=job))
        if len(group) == size:
            yield Chunk(batch_id=batch_id, entries=tuple(group))
            group.clear()
    for group in groups.values():
        if group:
            yield Chunk(batch_id=batch_id, entries=tuple(group))
