"""The A1111 "parameters" text (infotext): written exactly as the web UI writes it, and read back
with the web UI's own parsing rules, so existing viewers show our images' settings."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from . import __version__
from .extra_networks import lora_tag, lora_tags
from .jobs import RenderJob
from .prompt_syntax import embedding_pattern
from .samplers import AUTOMATIC, BETA, BETA_ALPHA, BETA_BETA

# A1111's regex for "key: value" pairs on the last line (modules/infotext_utils.py)
_PARAM_RE = re.compile(r"\s*(\w[\w \-/]+):\s*(\"(?:\\.|[^\\\"])+\"|[^,]*)(?:,|$)")
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")


def _quote(value: str) -> str:
    if "," not in value and ":" not in value and "\n" not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def format_infotext(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """prompt, 'Negative prompt: ...' (omitted when empty), then 'Key: value, ...' in the given order."""
    line = ", ".join(f"{k}: {_quote(str(v))}" for k, v in params.items() if v is not None)
    parts = [prompt]
    if negative_prompt:
        parts.append(f"Negative prompt: {negative_prompt}")
    parts.append(line)
    return "\n".join(parts)


def _hashes(refs: Any, short: Mapping[str, str] | None = None) -> str | None:
    """A1111's "Lora hashes"/"TI hashes": name: short hash, in the order given. TI: the file's
    sha256[:12]; LoRA: A1111's short hash when the worker gives it (`short`, by sha256; the file's
    `sshs_model_hash` metadata, else its addnet hash), else the sha256[:12]."""
    return ", ".join(f"{r.name}: {(short or {}).get(r.sha256, r.sha256[:12])}" for r in refs) or None


def _loras_in_prompt_order(job: RenderJob) -> list[Any]:
    """The job's LoRAs in the order of the recorded prompt's <lora:...> tags, as A1111 lists them."""
    order = {tag.name: i for i, tag in reversed(list(enumerate(lora_tags(infotext_prompt(job)))))}
    return sorted(job.loras, key=lambda lora: order.get(lora.name, len(order)))


def _embeddings_in_prompt_order(job: RenderJob) -> list[Any]:
    """The job's embeddings by where their names first appear, at word boundaries, in the prompt and
    then the negative prompt (the order A1111 lists TI hashes in)."""
    joined = f"{job.prompt}\n{job.negative_prompt}"

    def first_use(ref: Any) -> int:
        found = embedding_pattern(ref.name).search(joined)
        return found.start() if found else len(joined)

    return sorted(job.embeddings, key=first_use)


def infotext_prompt(job: RenderJob) -> str:
    """The prompt as A1111 records it: LoRAs given in the loras field are added as <lora:...> tags."""
    tagged = {tag.name for tag in lora_tags(job.prompt)}
    extra = [lora_tag(lora.name, lora.weight, lora.unet_weight) for lora in job.loras if lora.name not in tagged]
    return " ".join([job.prompt, *extra])


def job_parameters(job: RenderJob, model_short_hash: str, lora_hashes: Mapping[str, str] | None = None, *,
                   model_name: str | None = None, vae_name: str | None = None,
                   refiner_name: str | None = None) -> dict[str, Any]:
    """The last line's parameters, in A1111's order. model_name: the checkpoint's file stem, as A1111
    names a model (default: the registry name); vae_name: the VAE's file name with its extension
    (default: the registry name); refiner_name: the refiner's, as model_name."""
    refiner = job.refiner
    hires, upscale = job.hires, job.upscale
    beta = BETA in (job.schedule_type, hires and hires.schedule_type)
    return {
        "Steps": job.steps,
        "Sampler": job.sampler,
        "Schedule type": job.schedule_type if job.schedule_type != AUTOMATIC else None,  # resolved by the job
        "CFG scale": _number(job.guidance_scale),
        "Seed": job.seed,
        "Size": f"{job.width}x{job.height}",
        "Model hash": model_short_hash,
        "Model": model_name or job.model,
        "VAE hash": job.vae.sha256[:10] if job.vae else None,
        "VAE": (vae_name or job.vae.name) if job.vae else None,
        "Variation seed": job.subseed if job.subseed_strength else None,
        "Variation seed strength": _number(job.subseed_strength) if job.subseed_strength else None,
        "Seed resize from": "x".join(map(str, job.seed_resize_from)) if job.seed_resize_from else None,
        "Denoising strength": _number(hires.denoising_strength) if hires else (
            _number(job.strength) if job.init_image else None),
        "Clip skip": job.clip_skip if job.clip_skip > 1 else None,
        "RNG": "CPU",  # each image's noise comes from its own CPU generator: A1111's CPU noise source
        "Mask blur": job.mask_blur if job.mode == "inpaint" and job.mask_blur else None,
        "Mask mode": "Inpaint not masked" if job.mode == "inpaint" and job.inpaint_invert else None,
        "Masked content": job.inpaint_fill if job.mode == "inpaint" and job.inpaint_fill != "original" else None,
        "Inpaint area": "Only masked" if job.mode == "inpaint" and job.inpaint_full_res else None,
        "Masked area padding": job.inpaint_full_res_padding if job.mode == "inpaint" and job.inpaint_full_res else None,
        "Hires upscale": _number(hires.scale) if hires and not (hires.resize_x or hires.resize_y) else None,
        "Hires resize": f"{hires.resize_x}x{hires.resize_y}" if hires and (hires.resize_x or hires.resize_y) else None,
        "Hires steps": hires.steps if hires and hires.steps else None,
        "Hires upscaler": hires.upscaler if hires else None,
        "Hires sampler": hires.sampler if hires else None,
        "Hires schedule type": hires.schedule_type if hires and hires.schedule_type != AUTOMATIC else None,
        "Hires CFG Scale": _number(hires.guidance_scale) if hires and hires.guidance_scale is not None else None,
        "Hires prompt": hires.prompt if hires else None,
        "Hires negative prompt": hires.negative_prompt if hires else None,
        # A1111 records the Beta schedule's distribution whichever pass runs it
        "Beta schedule alpha": _number(BETA_ALPHA) if beta else None,
        "Beta schedule beta": _number(BETA_BETA) if beta else None,
        "Lora hashes": _hashes(_loras_in_prompt_order(job), lora_hashes),
        "TI hashes": _hashes(_embeddings_in_prompt_order(job)),
        # A1111's checkpoint short_title: name [sha256[:10]]
        "Refiner": f"{refiner_name or refiner.name} [{refiner.sha256[:10]}]" if refiner else None,
        "Refiner switch at": _number(job.refiner_switch_at) if refiner else None,
        "Postprocess upscale by": _number(upscale.factor) if upscale else None,
        "Postprocess upscaler": upscale.upscaler if upscale else None,
        "Version": f"sdfarm {__version__}",
    }


def job_infotext(job: RenderJob, model_short_hash: str, lora_hashes: Mapping[str, str] | None = None, *,
                 model_name: str | None = None, vae_name: str | None = None, refiner_name: str | None = None) -> str:
    return format_infotext(infotext_prompt(job), job.negative_prompt,
                           job_parameters(job, model_short_hash, lora_hashes, model_name=model_name,
                                          vae_name=vae_name, refiner_name=refiner_name))


def is_parameters_line(line: str) -> bool:
    """Whether a line is an infotext's last, its parameters: `Steps: N, ...` with at least 3 of them."""
    return line.lstrip().startswith("Steps:") and len(_PARAM_RE.findall(line)) >= 3


def parse_infotext(text: str) -> dict[str, Any]:
    """Read infotext back as A1111 does: Prompt, Negative prompt, every key; Size split into
    Size-1/Size-2; quoted values JSON-decoded; a missing Clip skip means 1."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM_RE.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()  # as A1111's parse_generation_parameters
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    result: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM_RE.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        size = _SIZE_RE.match(value) if isinstance(value, str) else None
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    result.setdefault("Clip skip", "1")
    return result
