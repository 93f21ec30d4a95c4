"""The unit of rendering (RenderJob), its derived id, and the chunk message that carries jobs.

A job's id is a hash of everything that affects its pixels, the model's identity (weights hash)
included. Names, priorities and batch membership do not enter it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from functools import cached_property
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from .extra_networks import lora_tag, lora_tags
from .prompt_schedule import may_vary
from .prompt_syntax import check_attention_weights, parse_prompt_attention
from .samplers import (
    AUTOMATIC,
    EXPONENTIAL,
    KARRAS,
    SCHEDULE_TYPES,
    UNIFORM,
    check_sampler,
    check_schedule,
    resolve_sampler,
)

# 1: the first. 2: upscaler models (hires/upscale `upscaler_sha256`). 3: renders as A1111 does:
# "Automatic" is the sampler's own schedule (and a job states it), the "Uniform" schedule, k-diffusion's
# sigmas whatever the model folder's spacing, A1111's img2img and hires step counts; a LoRA's
# `unet_weight` (A1111's <lora:name:te:unet>). 4: variation seeds, the hires pass's own size, sampler
# and CFG; A1111's other schedule types and the DPM++ 2M SDE Heun and 3M SDE samplers. Renders otherwise:
# cond and uncond at their own lengths, DPM++ 2M SDE's noise from a Brownian tree per image, embeddings
# found at token boundaries, prompt editing, alternation and AND (literal text before). 5: the refiner.
SCHEMA_VERSION: Final = 5
# Fields added after version 1, (section of a job, "" for the job itself, field): the version that
# added them; and values added to a field. A message names the oldest version that reads it: the
# highest of these that it sets, else RENDERS_SINCE.
FIELD_VERSIONS: Final[dict[tuple[str, str], int]] = {
    ("hires", "upscaler_sha256"): 2, ("upscale", "upscaler_sha256"): 2,
    **{("", f): 4 for f in ("subseed", "subseed_strength", "seed_resize_from", "resize_mode", "inpaint_fill",
                            "inpaint_invert", "inpaint_full_res", "inpaint_full_res_padding")},
    **{("hires", f): 4 for f in ("resize_x", "resize_y", "sampler", "schedule_type", "guidance_scale", "prompt",
                                 "negative_prompt")},
    ("", "refiner"): 5, ("", "refiner_switch_at"): 5}
VALUE_VERSIONS: Final[dict[tuple[str, str], dict[Any, int]]] = {
    ("", "sampler"): {"DPM++ 2M SDE Heun": 4, "DPM++ 3M SDE": 4},
    ("", "schedule_type"): {s: 4 for s in SCHEDULE_TYPES if s not in (AUTOMATIC, UNIFORM, KARRAS, EXPONENTIAL)}}
# The oldest version that renders any job as this one does: a worker older than it hands every
# message back. Versions that changed what a job renders, and how.
RENDER_CHANGES: Final[dict[int, str]] = {
    3: "A1111's schedules (Automatic resolved per sampler, Uniform, k-diffusion sigmas) and img2img/hires step counts",
    4: "cond and uncond at their own lengths; DPM++ 2M SDE's Brownian noise; embeddings at token boundaries;"
       " prompt editing, alternation and AND"}
RENDERS_SINCE: Final = max(RENDER_CHANGES)
MAX_PROMPT_CHARS: Final = 4000
# validation context for jobs read back (task messages, jobs.jsonl): submit-time bounds added later
# (attention weights) are not applied, so what was accepted before still reads; a job whose weights
# overflow fails alone, at render
RECORDED: Final = {"recorded": True}
MIN_SIZE: Final = 64
MAX_SIZE: Final = 2048
MAX_STEPS: Final = 150
MAX_GUIDANCE: Final = 30.0
MAX_SEED: Final = 2**32 - 1
MODEL_NAME_PATTERN: Final = r"^[a-z0-9][a-z0-9._-]{0,63}$"
ASSET_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # LoRAs, embeddings: as A1111 files are named
SHA256_PATTERN: Final = r"^[0-9a-f]{64}$"
INPUT_KEY_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,511}$"  # an input image's key in the bucket
MAX_LORA_WEIGHT: Final = 5.0
REFINER_SWITCH_AT: Final = 0.8  # A1111's default "Switch at"
MAX_LORAS: Final = 8
MAX_HIRES_SIZE: Final = 4096
MAX_UPSCALED_SIZE: Final = 8192
# A1111's names. Latent ones resize the latents (interpolation mode, antialias); the others the image.
LATENT_UPSCALERS: Final[dict[str, tuple[str, bool]]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
IMAGE_UPSCALERS: Final = ("Lanczos", "Nearest")
HIRES_UPSCALERS: Final = (*LATENT_UPSCALERS, *IMAGE_UPSCALERS)  # every built-in name; models are registered

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
    "vae",
    "loras",
    "hires",
    "upscale",
    "init_image",
    "strength",
    "mask_image",
    "mask_prompt",
    "mask_model",
    "mask_threshold",
    "mask_dilate",
    "mask_blur",
    "inpaint_fill",
    "inpaint_invert",
    "inpaint_full_res",
    "inpaint_full_res_padding",
    "resize_mode",
    "subseed",
    "subseed_strength",
    "seed_resize_from",
    "refiner",
    "refiner_switch_at",
)
MASK_FIELDS: Final = ("mask_threshold", "mask_dilate", "mask_blur", "inpaint_fill", "inpaint_invert",
                      "inpaint_full_res", "inpaint_full_res_padding")
_ID_LABELS: Final = ("model", "schema_version")  # recorded, not hashed: a name, and the format
_WIRE_JSON: Final[dict[str, Any]] = {}  # json.dumps' defaults, as kombu's JSON serialiser writes messages
_RECORD_JSON: Final[dict[str, Any]] = {"ensure_ascii": False}  # jobs.jsonl keeps UTF-8 as it is
DEFAULT_MASK_MODEL: Final = "clipseg"


# how the id's payload is written before it is hashed
_ID_JSON: Final[dict[str, Any]] = {"sort_keys": True, "separators": (",", ":"), "ensure_ascii": False}


def _id_of(payload: dict[str, Any]) -> str:
    return _hash_text(json.dumps(payload, **_ID_JSON))


def _hash_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _id_payload(wire: dict[str, Any]) -> dict[str, Any]:
    """What a job's id hashes: its wire form (model_hash, prompt and seed have no default, so they
    are always there) less the labels."""
    return {k: v for k, v in wire.items() if k not in _ID_LABELS}


def parse_loras(value: Any) -> Any:
    """Accept `[{name, weight}]`, `["name:0.8", ...]` or one string "a:0.8, b" (a CSV cell); a string
    may give the UNet's weight too, as A1111's tag does: "name:te:unet"."""
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple):
        return value  # pydantic reports the type
    items = []
    for item in value:
        if isinstance(item, str):
            name, *weights = item.strip().split(":")
            entry: dict[str, Any] = {"name": name.strip(), "weight": weights[0].strip() if weights else ""}
            if len(weights) == 2 and weights[1].strip():
                entry["unet_weight"] = weights[1].strip()
            elif len(weights) > 2:
                entry["weight"] = ":".join(weights)  # reported as not a number
            entry["weight"] = entry["weight"] or 1.0
            items.append(entry)
        else:
            items.append(item)
    return items


class LoraRef(BaseModel):
    """A registered LoRA at a weight. sha256 is filled in from the registry: it is the LoRA's identity."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=ASSET_NAME_PATTERN)
    weight: float = Field(default=1.0, ge=-MAX_LORA_WEIGHT, le=MAX_LORA_WEIGHT)  # text encoder (and UNet)
    sha256: str = Field(pattern=SHA256_PATTERN)
    # the UNet's multiplier where it differs from the text encoder's (A1111's <lora:name:te:unet>)
    unet_weight: float | None = Field(default=None, ge=-MAX_LORA_WEIGHT, le=MAX_LORA_WEIGHT)

    @model_validator(mode="before")
    @classmethod
    def _one_weight(cls, data: Any) -> Any:
        """A UNet weight equal to the weight is no second weight: one job, one id."""
        if isinstance(data, dict) and data.get("unet_weight") is not None:
            try:
                same = float(data["unet_weight"]) == float(data.get("weight", 1.0))
            except (TypeError, ValueError):
                return data  # the field's own validation says what is wrong
            if same:
                return {k: v for k, v in data.items() if k != "unet_weight"}
        return data


class AssetRef(BaseModel):
    """A registered file a job uses by name (an embedding its prompt names, a VAE, the mask model),
    with its sha256. Filled in by the planner."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=ASSET_NAME_PATTERN)
    sha256: str = Field(pattern=SHA256_PATTERN)


class ModelRef(BaseModel):
    """A registered model a job uses besides its own (its refiner), with its identity. Filled in by
    the planner."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    sha256: str = Field(pattern=SHA256_PATTERN)


class ImageRef(BaseModel):
    """An input image in the bucket: its key, and the sha256 and size read at planning."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str = Field(pattern=INPUT_KEY_PATTERN)
    sha256: str = Field(pattern=SHA256_PATTERN)
    width: int = Field(ge=1)
    height: int = Field(ge=1)


def _check_upscaler(name: str, sha256: str | None, builtin: tuple[str, ...]) -> None:
    """A built-in upscaler by its A1111 name, or a registered upscaler model by name + sha256 (the
    planner fills the sha256 in from the registry)."""
    if name in builtin:
        if sha256 is not None:
            raise ValueError(f"upscaler_sha256 goes with a registered upscaler model, not {name!r}")
    elif sha256 is None or not re.fullmatch(ASSET_NAME_PATTERN, name):
        raise ValueError(f"unknown upscaler {name!r} (allowed: {', '.join(builtin)}, or a registered upscaler model)")


def _check_prompt_text(v: str, info: ValidationInfo) -> None:
    """A prompt's length, its (word:weight) syntax (here rather than on a GPU) and, at submit, its
    weights' bounds (jobs read back keep what was accepted before)."""
    if len(v) > MAX_PROMPT_CHARS:
        raise ValueError(f"is {len(v)} characters long (allowed: at most {MAX_PROMPT_CHARS})")
    parse_prompt_attention(v)
    if not (info.context or {}).get("recorded"):
        check_attention_weights(v)


class HiresFix(BaseModel):
    """A1111's hires fix: render, upscale by `scale`, then an img2img pass at `denoising_strength`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scale: float = Field(default=2.0, gt=1.0, le=4.0)
    steps: int = Field(default=0, ge=0, le=MAX_STEPS)  # 0: as many as the first pass, as in A1111
    denoising_strength: float = Field(default=0.7, gt=0.0, le=1.0)
    upscaler: str = "Latent"
    upscaler_sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)  # a registered upscaler model's
    # A1111's "Resize width/height to" (0: from the other side, or from scale when both are 0)
    resize_x: int = Field(default=0, ge=0, le=MAX_HIRES_SIZE)
    resize_y: int = Field(default=0, ge=0, le=MAX_HIRES_SIZE)
    # the pass's own sampler (its schedule type resolved as a job's), and CFG scale; none: the first pass's
    sampler: str | None = None
    schedule_type: str | None = None
    guidance_scale: float | None = Field(default=None, ge=0.0, le=30.0)
    # A1111's "Hires prompt" and "Hires negative prompt"; none: the first pass's
    prompt: str | None = None
    negative_prompt: str | None = None

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _prompts(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        _check_prompt_text(v, info)
        if lora_tags(v):
            raise ValueError("a LoRA tag in a hires prompt is not supported (the hires pass renders with the"
                             " first pass's LoRAs)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _own_sampler(cls, data: Any) -> Any:
        """A sampler of its own is resolved as a job's: "X Karras" split, Automatic its default."""
        if isinstance(data, dict) and isinstance(data.get("sampler"), str):
            given = data.get("schedule_type") or AUTOMATIC
            if isinstance(given, str) and (resolved := resolve_sampler(data["sampler"], given)):
                data = {**data, "sampler": resolved[0], "schedule_type": resolved[1]}
        return data

    @model_validator(mode="before")
    @classmethod
    def _resize_or_scale(cls, data: Any) -> Any:
        """With a resize size, A1111 ignores the scale: left out, so it does not make another job."""
        if isinstance(data, dict) and (data.get("resize_x") or data.get("resize_y")):
            return {k: v for k, v in data.items() if k != "scale"}
        return data

    @model_validator(mode="after")
    def _upscaler(self) -> HiresFix:
        _check_upscaler(self.upscaler, self.upscaler_sha256, HIRES_UPSCALERS)
        if self.sampler is not None:
            check_sampler(self.sampler)
        if self.sampler is None and self.schedule_type is not None:
            raise ValueError("schedule_type goes with a hires sampler of its own; without one the pass runs the"
                             " first pass's sampler and schedule")
        if self.sampler is not None:
            check_schedule(self.sampler, str(self.schedule_type))
        return self

    def upscale_to(self, width: int, height: int) -> tuple[int, int]:
        """What the first pass is upscaled to (modules/processing.py, StableDiffusionProcessingTxt2Img.init):
        scaled; or resized to resize_x/resize_y keeping the aspect, covering both when both are given."""
        rx, ry = self.resize_x, self.resize_y
        if not rx and not ry:
            return int(width * self.scale), int(height * self.scale)
        if not ry or (rx and width / height < rx / ry):
            return rx, rx * height // width
        return ry * width // height, ry

    def truncation(self, width: int, height: int) -> tuple[int, int]:
        """Latent columns and rows cut off the upscaled first pass (half each side) so that it is
        resize_x x resize_y: A1111's truncate_x, truncate_y."""
        if not (self.resize_x and self.resize_y):
            return 0, 0
        ux, uy = self.upscale_to(width, height)
        return (ux - self.resize_x) // 8, (uy - self.resize_y) // 8

    def target(self, width: int, height: int) -> tuple[int, int]:
        """The second pass's size: the upscaled size in whole latents, less the truncation."""
        (ux, uy), (tx, ty) = self.upscale_to(width, height), self.truncation(width, height)
        return (ux // 8 - tx) * 8, (uy // 8 - ty) * 8


class Upscale(BaseModel):
    """A final upscale of the finished image (A1111's "Extras" postprocessing)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    factor: float = Field(gt=1.0, le=4.0)
    upscaler: str = "Lanczos"
    upscaler_sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)  # a registered upscaler model's

    @model_validator(mode="after")
    def _upscaler(self) -> Upscale:
        _check_upscaler(self.upscaler, self.upscaler_sha256, IMAGE_UPSCALERS)
        return self

    def target(self, width: int, height: int) -> tuple[int, int]:
        """The stored size: the scaled size, rounded down to a multiple of 8, as A1111's upscalers do."""
        return int(width * self.factor) // 8 * 8, int(height * self.factor) // 8 * 8


class RenderJob(BaseModel):
    """One image to render (txt2img). Frozen; its id is derived from its pixel-affecting fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = SCHEMA_VERSION
    model: str = Field(pattern=MODEL_NAME_PATTERN)  # registry name: recorded, not hashed
    model_hash: str = Field(pattern=SHA256_PATTERN)  # sha256 identity of the weights: hashed
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
    vae: AssetRef | None = None  # a registered VAE instead of the model's own; filled in by the planner
    loras: tuple[LoraRef, ...] = ()
    embeddings: tuple[AssetRef, ...] = ()
    hires: HiresFix | None = None
    upscale: Upscale | None = None
    init_image: ImageRef | None = None  # img2img: brought to width x height by resize_mode
    resize_mode: Literal["Just resize", "Crop and resize", "Resize and fill"] = "Just resize"  # A1111's
    strength: float = Field(default=0.75, gt=0.0, le=1.0)  # A1111's img2img "Denoising strength"
    mask_image: ImageRef | None = None  # inpainting: white is repainted
    mask_prompt: str | None = Field(default=None, min_length=1, max_length=200)  # a mask from text (CLIPSeg)
    mask_model: AssetRef | None = None  # the registered CLIPSeg model; filled in when mask_prompt is set
    mask_threshold: float = Field(default=0.4, ge=0.0, le=1.0)  # CLIPSeg probability that counts as masked
    mask_dilate: int = Field(default=0, ge=0, le=128)  # grow the mask by this many pixels
    mask_blur: int = Field(default=4, ge=0, le=64)  # A1111's "Mask blur"
    # A1111's "Masked content": what the masked area starts from (worker/masks.py)
    inpaint_fill: Literal["original", "fill", "latent noise", "latent nothing"] = "original"
    inpaint_invert: bool = False  # A1111's "Inpaint not masked": repaint what the mask keeps
    # A1111's "Only masked": render the region around the mask at width x height, then put it back
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = Field(default=32, ge=0, le=256)  # "Only masked padding, pixels"
    # A1111's variation seed: the start noise is the seed's, slerped toward the subseed's by strength
    subseed: int | None = None
    subseed_strength: float = Field(default=0.0, ge=0.0, le=1.0)
    # A1111's "resize seed from width/height": the noise of a (width, height) image, centred
    seed_resize_from: tuple[int, int] | None = None
    # A1111's refiner: another registered model takes over the render once the sampler has done this
    # share of the schedule (worker/refiner.py); with hires fix, in the hires pass (A1111's default)
    refiner: ModelRef | None = None
    refiner_switch_at: float = Field(default=REFINER_SWITCH_AT, gt=0.0, lt=1.0)

    @model_validator(mode="before")
    @classmethod
    def _split_legacy_sampler(cls, data: Any) -> Any:
        """Accept "DPM++ 2M Karras" as sampler "DPM++ 2M" with schedule type "Karras", and resolve
        "Automatic" (or no schedule type) to the sampler's own default, as A1111 does."""
        if isinstance(data, dict) and isinstance(data.get("sampler", ""), str):
            given = data.get("schedule_type", AUTOMATIC)
            if isinstance(given, str) and (
                    resolved := resolve_sampler(data.get("sampler", cls.model_fields["sampler"].default), given)):
                data = {**data, "sampler": resolved[0], "schedule_type": resolved[1]}
        return data

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str, info: ValidationInfo) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        lora_tags(v)  # a malformed or unsupported <...> tag is reported against the prompt
        _check_prompt_text(v, info)
        return v

    @field_validator("negative_prompt")
    @classmethod
    def _negative(cls, v: str, info: ValidationInfo) -> str:
        _check_prompt_text(v, info)
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if not 0 <= v <= MAX_SEED:
            raise ValueError(f"{v} is out of range (allowed: 0..{MAX_SEED})")
        return v

    @field_validator("subseed", mode="before")
    @classmethod
    def _subseed(cls, v: Any) -> Any:
        """An integer as a seed is one: not true/false, not 9.5 (digits from a CSV cell are)."""
        if v is None:
            return v
        if isinstance(v, bool | float) or (isinstance(v, int) and not 0 <= v <= MAX_SEED):
            raise ValueError(f"{v!r} is not allowed (allowed: an integer 0..{MAX_SEED})")
        return v

    @field_validator("seed_resize_from")
    @classmethod
    def _seed_resize_from(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not all(MIN_SIZE <= side <= MAX_SIZE and side % 8 == 0 for side in v):
            raise ValueError(f"{v[0]}x{v[1]} is not allowed (allowed: width and height, multiples of 8 from"
                             f" {MIN_SIZE} to {MAX_SIZE})")
        return v

    @model_validator(mode="before")
    @classmethod
    def _hires_prompts_same(cls, data: Any) -> Any:
        """A hires prompt or negative that is empty or the first pass's is no prompt of its own, as in
        A1111: left out, so the job is the one without it (one render, one id)."""
        if not (isinstance(data, dict) and isinstance(data.get("hires"), dict)):
            return data
        hires = dict(data["hires"])
        for fld, first in (("prompt", data.get("prompt")), ("negative_prompt", data.get("negative_prompt", ""))):
            if hires.get(fld) in ("", first):
                hires.pop(fld, None)
        return {**data, "hires": hires}

    @model_validator(mode="before")
    @classmethod
    def _variation_off(cls, data: Any) -> Any:
        """A variation seed at strength 0, or noise "resized" from the job's own size, changes nothing:
        left out, so the job is the one without it (one render, one id)."""
        if not isinstance(data, dict):
            return data
        out = data
        try:
            off = float(data.get("subseed_strength") or 0.0) == 0.0
        except (TypeError, ValueError):
            off = False  # the field's own validation says what is wrong
        if off and "subseed" in data:
            out = {k: v for k, v in out.items() if k not in ("subseed", "subseed_strength")}
        given = out.get("seed_resize_from")
        if isinstance(given, list | tuple) and list(given) == [out.get("width", 512), out.get("height", 512)]:
            out = {k: v for k, v in out.items() if k != "seed_resize_from"}
        return out

    @model_validator(mode="after")
    def _variation(self) -> RenderJob:
        if self.subseed_strength > 0 and self.subseed is None:
            raise ValueError("subseed_strength needs subseed (the variation seed), 0..4294967295")
        return self

    @model_validator(mode="after")
    def _refiner(self) -> RenderJob:
        if self.refiner is None:
            if self.refiner_switch_at != REFINER_SWITCH_AT:
                raise ValueError("refiner_switch_at goes with refiner (the model that takes over)")
            return self
        if self.refiner.sha256 == self.model_hash:
            raise ValueError(f"refiner {self.refiner.name!r} is the job's own model: nothing to switch to")
        for what, refs in (("LoRAs", self.loras), ("embeddings", self.embeddings)):
            if refs:
                raise ValueError(f"a refiner with {what} ({', '.join(r.name for r in refs)}) is not supported: the"
                                 f" refiner renders without them; leave out refiner or the {what}")
        return self

    @property
    def scheduled(self) -> bool:
        """Whether the prompts may edit, alternate or combine (AND) as they render: such jobs render on
        the worker's scheduled path (worker/scheduled.py). A cheap look, not a parse: a job it takes
        for one that is not renders the same there."""
        return any(may_vary(text) for text in (*self.texts(hires=False), *self.texts(hires=True)))

    def texts(self, hires: bool) -> tuple[str, str]:
        """(prompt, negative prompt) of a pass: the hires pass's own where it has them (A1111's Hires
        prompt and Hires negative prompt). LoRA tags stay in: the worker strips them."""
        if hires and self.hires is not None:
            return (self.hires.prompt if self.hires.prompt is not None else self.prompt,
                    self.hires.negative_prompt if self.hires.negative_prompt is not None else self.negative_prompt)
        return self.prompt, self.negative_prompt

    @property
    def varied(self) -> bool:
        """Whether the start noise is A1111's variation noise rather than the seed's plain draw."""
        return self.subseed_strength > 0 or self.seed_resize_from is not None

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
        check_sampler(v)
        return v

    @field_validator("clip_skip")
    @classmethod
    def _clip_skip(cls, v: int) -> int:
        if not 1 <= v <= 12:
            raise ValueError(f"{v} is out of range (allowed: 1..12)")
        return v

    @field_validator("loras", mode="before")
    @classmethod
    def _parse_loras(cls, v: Any) -> Any:
        return parse_loras(v)

    @field_validator("loras")
    @classmethod
    def _loras(cls, v: tuple[LoraRef, ...]) -> tuple[LoraRef, ...]:
        names = [lora.name for lora in v]
        if len(set(names)) != len(names):
            raise ValueError(f"names a LoRA twice: {', '.join(sorted(n for n in set(names) if names.count(n) > 1))}")
        if len(v) > MAX_LORAS:
            raise ValueError(f"has {len(v)} LoRAs (allowed: at most {MAX_LORAS})")
        return tuple(sorted(v, key=lambda lora: lora.name))  # order does not change the image

    @field_validator("embeddings")
    @classmethod
    def _embeddings(cls, v: tuple[AssetRef, ...]) -> tuple[AssetRef, ...]:
        return tuple(sorted(set(v), key=lambda e: e.name))

    @model_validator(mode="after")
    def _schedule(self) -> RenderJob:
        check_schedule(self.sampler, self.schedule_type)
        return self

    @model_validator(mode="after")
    def _tags_match_loras(self) -> RenderJob:
        weights = {lora.name: (lora.weight, lora.unet_weight) for lora in self.loras}
        for tag in lora_tags(self.prompt):
            if weights.get(tag.name) != (tag.weight, tag.unet_weight):
                raise ValueError(f"the prompt's tag {lora_tag(*tag)} is not in loras at that weight")
        return self

    @model_validator(mode="after")
    def _sizes(self) -> RenderJob:
        if self.hires is not None:
            w, h = self.hires.target(self.width, self.height)
            if max(w, h) > MAX_HIRES_SIZE or min(w, h) < MIN_SIZE:
                raise ValueError(f"hires.scale {self.hires.scale:g} makes {w}x{h} (allowed: sides up to"
                                 f" {MAX_HIRES_SIZE})")
        if self.upscale is not None:
            w, h = self.upscale.target(*self.rendered_size)
            if max(w, h) > MAX_UPSCALED_SIZE:
                raise ValueError(f"upscale.factor {self.upscale.factor:g} makes {w}x{h} (allowed: sides up to"
                                 f" {MAX_UPSCALED_SIZE})")
        return self

    @model_validator(mode="after")
    def _img2img(self) -> RenderJob:
        # set to something other than the default (a full dump round-trips every field as "set")
        given = {f for f, default in _IMG2IMG_DEFAULTS.items() if getattr(self, f) != default}
        if self.init_image is None:
            needs = [f for f in ("strength", "resize_mode", "mask_image", "mask_prompt", *MASK_FIELDS) if f in given]
            if needs:
                raise ValueError(f"{', '.join(needs)} needs init_image (img2img or inpainting)")
            return self
        if self.hires is not None:
            raise ValueError("hires applies to txt2img; with init_image, set width and height instead")
        if self.mask_image is not None and self.mask_prompt is not None:
            raise ValueError("set mask_image or mask_prompt, not both")
        if self.mask_image is not None and (self.mask_image.width, self.mask_image.height) != (
                self.init_image.width, self.init_image.height):
            raise ValueError(f"mask_image is {self.mask_image.width}x{self.mask_image.height}, init_image is"
                             f" {self.init_image.width}x{self.init_image.height}: they must be the same size")
        if (self.mask_prompt is None) != (self.mask_model is None):
            raise ValueError("mask_model goes with mask_prompt")
        if self.mask_image is None and self.mask_prompt is None and set(MASK_FIELDS) & given:
            raise ValueError(f"{', '.join(sorted(set(MASK_FIELDS) & given))} needs mask_image or mask_prompt")
        return self

    @property
    def mode(self) -> str:
        """txt2img, img2img or inpaint: which pipeline renders the job."""
        if self.init_image is None:
            return "txt2img"
        return "img2img" if self.mask_image is None and self.mask_prompt is None else "inpaint"

    @property
    def rendered_size(self) -> tuple[int, int]:
        """Width and height after the hires pass, before any upscale ("Only masked": the init image's)."""
        if self.inpaint_full_res and self.init_image is not None:
            return self.init_image.width, self.init_image.height
        return self.hires.target(self.width, self.height) if self.hires else (self.width, self.height)

    @property
    def output_size(self) -> tuple[int, int]:
        """Width and height of the stored image."""
        return self.upscale.target(*self.rendered_size) if self.upscale else self.rendered_size

    @cached_property
    def id(self) -> str:
        """Hash of what affects the pixels. Fields left at their defaults are omitted, so adding
        a new optional field later does not change the id of existing jobs."""
        return _id_of(_id_payload(self.wire))

    @cached_property
    def wire(self) -> dict[str, Any]:
        """The job as a task message carries it: JSON types, fields at their defaults left out.
        Computed once per job; read it, never change it."""
        return self.model_dump(mode="json", exclude_defaults=True)

    @cached_property
    def wire_json(self) -> str:
        """The wire form as JSON text, as the broker's JSON serialiser writes it (ASCII, ', ', ': ')."""
        return json.dumps(self.wire, **_WIRE_JSON)

    @cached_property
    def record_json(self) -> str:
        """Every field, JSON types, as JSON text (UTF-8 kept): the job as its batch's jobs.jsonl
        records it."""
        return json.dumps(self.model_dump(mode="json"), **_RECORD_JSON)

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
            self.vae,
            self.loras,  # adapters change between chunks, never inside one
            self.hires,
            self.upscale,
            self.mode,
            self.strength if self.init_image else None,
            self.varied,  # varied noise is drawn by the worker, plain noise by the pipeline
            self.scheduled,  # scheduled or combined prompts take over the UNet's conditioning call by call
            self.refiner,  # the second model takes over the whole batch at one model call
            self.refiner_switch_at,
        )


# the img2img fields and their defaults, read once (RenderJob.model_fields is slow to reach per job)
_IMG2IMG_DEFAULTS: Final = {f: RenderJob.model_fields[f].default
                            for f in ("strength", "resize_mode", "mask_image", "mask_prompt", *MASK_FIELDS)}


class SeedSweep:
    """The jobs of one batch item that differ only in their seed (`count:`, `seeds:`, seed, seed+1,
    ...): each is a copy of the first, validated job with the seed replaced. No validator reads the
    seed but its own range check, done here, so a copy is the job validation would give. Its wire
    form, JSON texts and id are the first job's with the seed's digits spliced in, instead of being
    dumped and hashed from scratch: a million-job batch is mostly such sweeps."""

    def __init__(self, first: RenderJob) -> None:
        self.first = first
        record = first.model_dump(mode="json")
        self._id = _around_seed(_id_payload(first.wire), _ID_JSON)
        self._wire = _around_seed(first.wire, _WIRE_JSON)
        self._record = _around_seed(record, _RECORD_JSON)

    def job(self, seed: int) -> RenderJob:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed {seed!r} is not an integer 0..{MAX_SEED}: validate such a job in full")
        job = self.first.model_copy(update={"seed": seed})  # it holds the first's cached values: replace them all
        digits = str(seed)
        job.__dict__.update(
            wire={**self.first.wire, "seed": seed},
            wire_json=self._wire[0] + digits + self._wire[1],
            record_json=self._record[0] + digits + self._record[1],
            id=_hash_text(self._id[0] + digits + self._id[1]),
        )
        return job


def _around_seed(fields: dict[str, Any], options: dict[str, Any]) -> tuple[str, str]:
    """`json.dumps(fields, **options)` cut where the seed's value goes: the text before it and after."""
    keys = sorted(fields) if options.get("sort_keys") else list(fields)
    at = keys.index("seed")
    before, after = {k: fields[k] for k in keys[:at]}, {k: fields[k] for k in keys[at + 1:]}
    item_sep, key_sep = options.get("separators") or (", ", ": ")
    head = json.dumps(before, **options)[:-1] + (item_sep if before else "") + '"seed"' + key_sep
    tail = item_sep + json.dumps(after, **options)[1:] if after else "}"
    return head, tail


def message_version(wires: Iterable[dict[str, Any]]) -> int:
    """The oldest schema version that reads jobs in these wire forms and renders them as this one
    does: the highest version of the fields and values they set (FIELD_VERSIONS, VALUE_VERSIONS), at
    least RENDERS_SINCE."""
    def versions(wire: dict[str, Any]) -> Iterator[int]:
        for (section, fld), version in FIELD_VERSIONS.items():
            if fld in (wire.get(section) or {} if section else wire):
                yield version
        for (section, fld), values in VALUE_VERSIONS.items():
            value = (wire.get(section) or {} if section else wire).get(fld)
            if isinstance(value, str) and value in values:
                yield values[value]

    return max([RENDERS_SINCE, *(v for wire in wires for v in versions(wire))])


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

    def message(self) -> dict[str, Any]:
        """The task message: fields at their defaults are left out, so a queued job costs Redis only
        what it sets. The message names the oldest schema version that reads it (a field added
        since appears only when a job sets it); a worker older than that hands the chunk back.
        Changing a default would mean a new SCHEMA_VERSION that every message names."""
        message = self.model_dump(mode="json", exclude_defaults=True)
        return {**message, "schema_version": message_version(e["job"] for e in message["entries"])}

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
