"""A1111's txt2img and img2img requests (its v1.10 API schema: field names and defaults), and what
they become on the farm: batch items, one per image.

A request's render fields are named by the infotext keys A1111 records them under ("cfg_scale" is
"CFG scale", "override_settings.CLIP_stop_at_last_layers" is "Clip skip"), and sdfarm's A1111 import
(sdfarm/a1111.py) makes the item from them: one mapping for images in and requests in. Init images
and masks become inputs of the batch, uploaded with it (sdfarm/inputs.py). Every field the farm
cannot honour is refused unless it is at A1111's default, or at a value that renders the same.
"""

from __future__ import annotations

import base64
import binascii
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from sdfarm.a1111 import Registered, item_from_parameters, job_field
from sdfarm.errors import InvalidInput, Problem, brief
from sdfarm.inputs import Inputs
from sdfarm.samplers import BETA_ALPHA, BETA_BETA, SCHEDULE_TYPES, split_sampler_name

MAX_IMAGES: Final = 1000  # images of one call (batch_size x n_iter): it waits for them and answers them all
# pixels one call answers, over all its images: the response holds each PNG twice (bytes, base64) and
# its JSON once more, in memory (64 images of 1024x1024)
MAX_RESPONSE_PIXELS: Final = 64 * 1024 * 1024
RANDOM_SEED: Final = -1
SAMPLER_INDEX: Final = "Euler"  # A1111's default when a request names no sampler_name
# A1111's scheduler names (modules/sd_schedulers.py): its labels, lower case, spaces as underscores
SCHEDULER_NAMES: Final = {label.lower().replace(" ", "_"): label for label in SCHEDULE_TYPES}
RESIZE_MODES: Final = ("Just resize", "Crop and resize", "Resize and fill")
MASKED_CONTENT: Final = ("fill", "original", "latent noise", "latent nothing")  # A1111's inpainting_fill 0..3
# samplers whose eta A1111 reads (eta_ancestral, eta_ddim): sdfarm runs each at A1111's default
ETA_DEFAULTS: Final = {"Euler a": 1.0, "DPM2 a": 1.0, "DPM++ SDE": 1.0, "DPM++ 2M SDE": 1.0,
                       "DPM++ 2M SDE Heun": 1.0, "DPM++ 3M SDE": 1.0, "DDIM": 0.0}
_OVER_CAP: Final = "the cap is SDFARM_API_MAX_IMAGE_BYTES)"
SAME: Final = (None, "", "None", "none", "Use same sampler", "Use same scheduler", "Use same checkpoint")

# A1111 options as the farm runs them (GET /options; override_settings may repeat them). Those that
# choose what to render (the model, clip skip, the VAE) are per request, through override_settings.
FARM_OPTIONS: Final[dict[str, Any]] = {
    "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic", "randn_source": "CPU", "emphasis": "Original",
    "eta_noise_seed_delta": 0, "eta_ancestral": 1.0, "eta_ddim": 0.0, "s_churn": 0.0, "s_tmin": 0.0,
    "s_tmax": 0.0, "s_noise": 1.0, "s_min_uncond": 0.0, "initial_noise_multiplier": 1.0,
    "beta_dist_alpha": BETA_ALPHA, "beta_dist_beta": BETA_BETA, "pad_cond_uncond": False,
    "always_discard_next_to_last_sigma": False, "img2img_fix_steps": False, "img2img_color_correction": False,
    "use_old_hires_fix_width_height": False, "sd_vae_encode_method": "Full", "sd_vae_decode_method": "Full",
    "face_restoration": False, "tiling": False, "token_merging_ratio": 0.0, "samples_format": "png",
    "enable_pnginfo": True}
# override_settings that choose what to render: the infotext key each is recorded under
OVERRIDES: Final = {"sd_model_checkpoint": "Model", "CLIP_stop_at_last_layers": "Clip skip", "sd_vae": "VAE"}
_OVERRIDE_TYPES: Final = {"sd_model_checkpoint": str, "CLIP_stop_at_last_layers": int, "sd_vae": str}
# request fields -> the infotext keys A1111 records them under (modules/processing.py, create_infotext)
INFOTEXT_KEYS: Final = {
    "prompt": "Prompt", "negative_prompt": "Negative prompt", "steps": "Steps", "sampler_name": "Sampler",
    "scheduler": "Schedule type", "cfg_scale": "CFG scale", "seed": "Seed", "width": "Size-1", "height": "Size-2",
    "subseed": "Variation seed", "subseed_strength": "Variation seed strength",
    "seed_resize_from_w": "Seed resize from-1", "seed_resize_from_h": "Seed resize from-2",
    "hr_scale": "Hires upscale", "hr_second_pass_steps": "Hires steps", "hr_upscaler": "Hires upscaler",
    "denoising_strength": "Denoising strength", "hr_sampler_name": "Hires sampler",
    "hr_scheduler": "Hires schedule type", "hr_prompt": "Hires prompt", "hr_negative_prompt": "Hires negative prompt",
    "hr_resize_x": "Hires resize-1", "hr_resize_y": "Hires resize-2", "refiner_checkpoint": "Refiner",
    "refiner_switch_at": "Refiner switch at", **{f"override_settings.{k}": v for k, v in OVERRIDES.items()}}
_BY_KEY: Final = {key: fld for fld, key in INFOTEXT_KEYS.items()} | {
    "Model hash": "override_settings.sd_model_checkpoint"}
# job fields (as the planner names them) -> request fields
_BY_JOB_FIELD: Final = {
    **{f: fld for fld, key in INFOTEXT_KEYS.items() if (f := job_field(key)) is not None},
    "hires": "enable_hr", "loras": "prompt", "embeddings": "prompt", "init_image": "init_images",
    "strength": "denoising_strength", "resize_mode": "resize_mode", "mask_image": "mask", "mask_blur": "mask_blur",
    "inpaint_fill": "inpainting_fill", "inpaint_invert": "inpainting_mask_invert",
    "inpaint_full_res": "inpaint_full_res", "inpaint_full_res_padding": "inpaint_full_res_padding"}


def _off(v: Any) -> bool:
    return not v


def _one_of(*allowed: Any) -> Callable[[Any], bool]:
    return lambda v: v in allowed


# fields with no counterpart on the farm: (accepted when, why refused otherwise)
UNSUPPORTED: Final[dict[str, tuple[Callable[[Any], bool], str]]] = {
    "styles": (_off, "the farm keeps no prompt styles: put their text in the prompt"),
    "restore_faces": (_off, "the farm runs no face restoration"),
    "tiling": (_off, "the farm renders no tiling images"),
    "s_min_uncond": (_one_of(None, 0), "the farm runs A1111's default, 0"),
    "s_churn": (_one_of(None, 0), "the farm runs A1111's default, 0"),
    "s_tmin": (_one_of(None, 0), "the farm runs A1111's default, 0"),
    "s_tmax": (_one_of(None, 0), "the farm runs A1111's default, 0 (infinity)"),
    "s_noise": (_one_of(None, 1), "the farm runs A1111's default, 1"),
    "disable_extra_networks": (_off, "the farm always applies <lora:...> tags"),
    "script_name": (_off, "the farm runs no scripts"), "script_args": (_off, "the farm runs no scripts"),
    "alwayson_scripts": (_off, "the farm runs no scripts or extensions"),
    "infotext": (_off, "give the fields themselves"),
    "firstphase_width": (_one_of(0), "A1111's old hires fix: use hr_scale or hr_resize_x/y"),
    "firstphase_height": (_one_of(0), "A1111's old hires fix: use hr_scale or hr_resize_x/y"),
    "hr_checkpoint_name": (_one_of(*SAME), "the hires pass renders with the request's own model"),
    "latent_mask": (_one_of(None), "the farm takes one mask, `mask`"),
    "initial_noise_multiplier": (_one_of(None, 1), "the farm runs A1111's default, 1"),
    "mask_round": (_one_of(True), "the farm rounds the mask at latent size, as A1111 does by default"),
}


class Refused(InvalidInput):
    """Fields of a request the farm cannot honour: (field, why) each; `status` 413 for an image over
    the cap, else 422."""

    def __init__(self, problems: list[tuple[str, str]], status: int = 422) -> None:
        super().__init__("; ".join(f"{fld}: {why}" for fld, why in problems))
        self.problems = problems
        self.status = status


class _Request(BaseModel):
    """What txt2img and img2img share (A1111's StableDiffusionProcessing, as its API takes it)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int | None = RANDOM_SEED
    subseed: int | None = RANDOM_SEED
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = SAMPLER_INDEX  # used when sampler_name is not given, as in A1111
    scheduler: str | None = None
    batch_size: int = Field(default=1, ge=1)
    n_iter: int = Field(default=1, ge=1)
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False  # the farm keeps every image in its bucket, whatever these say
    do_not_save_grid: bool = False
    save_images: bool = False
    send_images: bool = True
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True  # nothing to restore: the farm's options never change
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] | None = Field(default_factory=list)
    alwayson_scripts: dict[str, Any] | None = Field(default_factory=dict)
    force_task_id: str | None = None  # A1111's id for its own progress page; recorded nowhere here
    infotext: str | None = None


class Txt2ImgRequest(_Request):
    enable_hr: bool = False
    denoising_strength: float | None = 0.75
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(_Request):
    init_images: list[str] | None = None
    resize_mode: Literal[0, 1, 2, 3] = 0
    denoising_strength: float | None = 0.75
    image_cfg_scale: float | None = None  # InstructPix2Pix models only: A1111 ignores it for any other
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: Literal[0, 1, 2, 3] = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: Literal[0, 1] = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False  # echo init_images and mask in the response's parameters


@dataclass(frozen=True)
class Plan:
    """A request as the farm renders it: the batch items (one per image) and the seeds A1111 reports."""

    items: list[dict[str, Any]]
    seeds: list[int]
    subseeds: list[int]


def plan_request(req: Txt2ImgRequest | Img2ImgRequest, known: Registered, default_model: str, inputs: Inputs,
                 max_image_bytes: int, max_images: int = MAX_IMAGES) -> Plan:
    """The request's batch items, its images held in `inputs`. Raises Refused naming every field the
    farm cannot honour."""
    problems = _unsupported(req)
    count = req.batch_size * req.n_iter
    if count > max_images:
        problems.append(("n_iter", f"batch_size x n_iter is {count} images (allowed: at most {max_images} in one"
                                   " call; submit larger batches to /v1/batches)"))
    elif count * _output_pixels(req) > MAX_RESPONSE_PIXELS:
        problems.append(("n_iter", f"batch_size x n_iter is {count} images of {_output_pixels(req)} pixels"
                                   f" (allowed: at most {MAX_RESPONSE_PIXELS} pixels in one answer; submit"
                                   " larger batches to /v1/batches)"))
    info = _parameters(req, default_model, problems)
    item, refused = item_from_parameters(info, known, cpu_noise=True)  # the farm's RNG is A1111's CPU source
    problems.extend((_BY_KEY.get(key, key), why) for key, why in refused)
    if isinstance(req, Img2ImgRequest):
        item.update(_img2img(req, inputs, max_image_bytes, problems))
    if problems:
        raise Refused(problems, 413 if any(why.endswith(_OVER_CAP) for _, why in problems) else 422)
    seed = _fixed(req.seed)
    subseed = _fixed(req.subseed)
    # A1111 (process_images_inner): seeds go seed, seed+1, ...; with a variation strength the seed
    # stays and the variation seeds go subseed, subseed+1, ...
    seeds = [seed + (k if not req.subseed_strength else 0) for k in range(count)]
    subseeds = [subseed + k for k in range(count)]
    variation = ({"subseed": s} for s in subseeds) if req.subseed_strength else ({} for _ in subseeds)
    items = [{**item, "seed": s, **v} for s, v in zip(seeds, variation, strict=True)]
    return Plan(items=items, seeds=seeds, subseeds=subseeds)


def _output_pixels(req: Txt2ImgRequest | Img2ImgRequest) -> int:
    """Pixels of one image the call answers: the hires pass's size when hires fix is on."""
    if not isinstance(req, Txt2ImgRequest) or not req.enable_hr:
        return req.width * req.height
    if req.hr_resize_x or req.hr_resize_y:
        x = req.hr_resize_x or round(req.hr_resize_y * req.width / req.height)
        y = req.hr_resize_y or round(req.hr_resize_x * req.height / req.width)
        return int(x * y)
    return int(req.width * req.hr_scale * req.height * req.hr_scale)


def _fixed(seed: int | None) -> int:
    """A1111's get_fixed_seed: -1 (or none) is a random seed, drawn here so the response reports it."""
    return random.randrange(4294967294) if seed in (None, RANDOM_SEED) else int(seed)


def _unsupported(req: _Request) -> list[tuple[str, str]]:
    problems = [(fld, f"{brief(getattr(req, fld))}: {why}") for fld, (accepted, why) in UNSUPPORTED.items()
                if fld in type(req).model_fields and not accepted(getattr(req, fld))]
    sampler = split_sampler_name(req.sampler_name or req.sampler_index or SAMPLER_INDEX)[0]
    expected = ETA_DEFAULTS.get(sampler)
    if req.eta is not None and expected is not None and req.eta != expected:
        problems.append(("eta", f"{req.eta:g}: the farm runs {sampler} at A1111's default eta, {expected:g}"))
    for key, value in (req.override_settings or {}).items():
        if key in OVERRIDES:
            if (value is not None and not isinstance(value, _OVERRIDE_TYPES[key])) or isinstance(value, bool):
                problems.append((f"override_settings.{key}", f"{brief(value)} is not a"
                                                             f" {_OVERRIDE_TYPES[key].__name__}"))
            continue
        if key not in FARM_OPTIONS:
            problems.append((f"override_settings.{key}", "not an option the farm takes (allowed: "
                                                         f"{', '.join([*OVERRIDES, *FARM_OPTIONS])})"))
        elif value != FARM_OPTIONS[key]:
            problems.append((f"override_settings.{key}", f"{brief(value)}: the farm runs {FARM_OPTIONS[key]!r}"))
    return problems


def model_parameters(checkpoint: str) -> dict[str, str]:
    """A1111's sd_model_checkpoint (a title "name [hash]", a file name, a model name) as the infotext
    keys sdfarm's import picks a registered model by."""
    name, bracket, short = checkpoint.rpartition(" [")
    if not bracket or not short.endswith("]"):
        name, short = checkpoint, ""
    stem, dot, ext = name.rpartition(".")
    name = stem if dot and ext.lower() in ("safetensors", "ckpt", "pt", "bin") else name
    return {"Model": name.strip(), "Model hash": short.removesuffix("]")} if short else {"Model": name.strip()}


def _parameters(req: Txt2ImgRequest | Img2ImgRequest, default_model: str, problems: list[tuple[str, str]]
                ) -> dict[str, Any]:
    """The request as the infotext A1111 would write for it (seed aside)."""
    sampler = req.sampler_name or req.sampler_index or SAMPLER_INDEX
    schedule = SCHEDULER_NAMES.get(req.scheduler or "automatic", req.scheduler)
    overrides = {k: v for k, v in (req.override_settings or {}).items()
                 if k in OVERRIDES and isinstance(v, _OVERRIDE_TYPES[k]) and not isinstance(v, bool)}
    info: dict[str, Any] = {"Prompt": req.prompt, "Negative prompt": req.negative_prompt, "Steps": req.steps,
                            "Sampler": sampler, "Schedule type": schedule, "CFG scale": req.cfg_scale,
                            "Seed": 0, "Size-1": req.width, "Size-2": req.height,
                            **model_parameters(str(overrides.get("sd_model_checkpoint") or default_model))}
    if overrides.get("CLIP_stop_at_last_layers") is not None:
        info["Clip skip"] = overrides["CLIP_stop_at_last_layers"]
    if overrides.get("sd_vae") not in (None, "Automatic", "None"):
        info["VAE"] = overrides["sd_vae"]
    if req.subseed_strength:
        info.update({"Variation seed": 0, "Variation seed strength": req.subseed_strength})
    if req.seed_resize_from_w > 0 and req.seed_resize_from_h > 0:
        info.update({"Seed resize from-1": req.seed_resize_from_w, "Seed resize from-2": req.seed_resize_from_h})
    if req.refiner_checkpoint not in SAME:
        info["Refiner"] = req.refiner_checkpoint
        if req.refiner_switch_at is not None:
            info["Refiner switch at"] = req.refiner_switch_at
    if isinstance(req, Txt2ImgRequest) and req.enable_hr:
        info.update(_hires(req, sampler, schedule, problems))
    return info


def _hires(req: Txt2ImgRequest, sampler: str, schedule: str | None, problems: list[tuple[str, str]]
           ) -> dict[str, Any]:
    if req.hr_upscaler == "None":
        problems.append(("hr_upscaler", "'None': name the upscaler (A1111's None resizes with Lanczos: use 'Lanczos')"))
    strength = 0.75 if req.denoising_strength is None else req.denoising_strength  # A1111's txt2img default
    hires: dict[str, Any] = {"Hires upscaler": req.hr_upscaler or "Latent", "Denoising strength": strength}
    if req.hr_resize_x or req.hr_resize_y:
        hires.update({"Hires resize-1": req.hr_resize_x, "Hires resize-2": req.hr_resize_y})
    else:
        hires["Hires upscale"] = req.hr_scale
    if req.hr_second_pass_steps:
        hires["Hires steps"] = req.hr_second_pass_steps
    hr_schedule = None if req.hr_scheduler in SAME else SCHEDULER_NAMES.get(str(req.hr_scheduler), req.hr_scheduler)
    if req.hr_sampler_name not in SAME and req.hr_sampler_name != sampler:
        hires["Hires sampler"] = req.hr_sampler_name
    if hr_schedule is not None and hr_schedule != schedule:  # the pass's own schedule goes with a sampler
        hires.update({"Hires sampler": hires.get("Hires sampler", sampler), "Hires schedule type": hr_schedule})
    if req.hr_prompt and req.hr_prompt != req.prompt:
        hires["Hires prompt"] = req.hr_prompt
    if req.hr_negative_prompt and req.hr_negative_prompt != req.negative_prompt:
        hires["Hires negative prompt"] = req.hr_negative_prompt
    return hires


def _img2img(req: Img2ImgRequest, inputs: Inputs, max_bytes: int, problems: list[tuple[str, str]]
             ) -> dict[str, Any]:
    item: dict[str, Any] = {"strength": 0.75 if req.denoising_strength is None else req.denoising_strength}
    images = req.init_images or []
    if len(images) != 1:
        problems.append(("init_images", f"{len(images)} images (allowed: exactly one; every image of the call is"
                                        " rendered from it)"))
    else:
        item["init_image"] = hold_image(images[0], "init_images.0", inputs, max_bytes, problems)
    if req.resize_mode == 3:
        problems.append(("resize_mode", "3 (Just resize, latent upscale) is not supported (allowed: 0, 1, 2)"))
    else:
        item["resize_mode"] = RESIZE_MODES[req.resize_mode]
    if req.mask is None:
        return item
    blur = req.mask_blur if req.mask_blur is not None else req.mask_blur_x
    if req.mask_blur is None and req.mask_blur_x != req.mask_blur_y:
        problems.append(("mask_blur_y", f"{req.mask_blur_y}: the farm blurs the mask alike both ways (give"
                                        " mask_blur, or mask_blur_x equal to mask_blur_y)"))
    return {**item, "mask_image": hold_image(req.mask, "mask", inputs, max_bytes, problems), "mask_blur": blur,
            "inpaint_fill": MASKED_CONTENT[req.inpainting_fill], "inpaint_invert": bool(req.inpainting_mask_invert),
            "inpaint_full_res": req.inpaint_full_res, "inpaint_full_res_padding": req.inpaint_full_res_padding}


def hold_image(text: str, fld: str, inputs: Inputs, max_bytes: int, problems: list[tuple[str, str]]) -> str | None:
    """A base64 image (a data: URL too, as A1111 takes it), checked and held for the batch: its
    reference, or None with the problem recorded. Its size is checked before it is decoded."""
    payload = text.split(",", 1)[1] if text.startswith("data:") else text
    payload = "".join(payload.split())
    size = len(payload) * 3 // 4 - payload[-2:].count("=")
    if size > max_bytes:
        problems.append((fld, f"an image of {size} bytes (allowed: at most {max_bytes}; {_OVER_CAP}"))
        return None
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        problems.append((fld, "is not base64 (allowed: a base64 PNG, JPEG or WEBP, or a data: URL of one)"))
        return None
    try:
        return inputs.hold(data, fld)
    except InvalidInput as e:
        problems.append((fld, str(e).removeprefix(f"{fld} ")))
        return None


def request_problems(problems: list[Problem]) -> list[tuple[str, str]]:
    """The planner's problems with a batch made from a request, by the request's own field names
    (each once, whatever the number of images it concerns)."""
    found: dict[tuple[str, str], None] = {}
    for p in problems:
        head, _, rest = p.field.partition(".")
        fld = _BY_JOB_FIELD.get(p.field) or _BY_JOB_FIELD.get(head, p.field)
        if head == "hires" and rest and p.field not in _BY_JOB_FIELD:
            fld = f"enable_hr ({rest})"
        found[(fld, p.message)] = None
    return list(found)
