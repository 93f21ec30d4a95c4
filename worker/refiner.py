"""A1111's refiner: a second registered model takes over a render partway through its schedule.

A1111 (modules/sd_samplers_common.py, apply_refiner) checks at every model call how far the sampler
has come: the training timestep nearest to the call's sigma (a timestep sampler's own timestep, for
DDIM, PLMS and UniPC) gives `completed = (999 - timestep) / 1000`, and from the first call with
`completed >= refiner_switch_at` on it loads the refiner, encodes the prompts again with the
refiner's text encoder, and lets the sampler go on with it: the same sigmas, the same sampler state
(a multistep sampler's history included), the same noise.

Here the pipeline call runs as usual on the job's model; after the last call before the switch, a
step-end callback puts the refiner's UNet in the pipeline and hands it the refiner's conditioning
(SDXL's refiner: its OpenCLIP-G embeddings and aesthetic-score time ids), so the scheduler and the
latents carry on untouched. A pass that starts past the switch (an img2img or hires pass at low
denoising) runs on the refiner's own pipeline from its first call. With hires fix the refiner takes
over in the hires pass only (A1111's default "Hires fix: which pass to enable refiner for").

The refiner renders without the job's LoRAs and embeddings (RenderJob refuses them together) and
decodes through the job's model's VAE: both models must share a latent space (the registry pairs
a model only with one of its family, or SDXL with SDXL's refiner).
"""

from __future__ import annotations

import gc
import itertools
import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch

from sdfarm.errors import AssetError, InvalidInput, SdfarmError, WorkerFatal
from sdfarm.jobs import RenderJob
from sdfarm.models import REFINER
from sdfarm.samplers import SECOND_ORDER

from .assets import AssetFiles
from .pipeline import LoadedModel, load_refiner
from .samplers import K_DIFFUSION, hires_call, img2img_call, make_scheduler
from .scheduled import Encodings, conditioned
from .schedules import training_sigmas

# A1111's SDXL options sdxl_refiner_high_aesthetic_score and sdxl_refiner_low_aesthetic_score (the
# refiner's cond and uncond), which are diffusers' defaults too
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


def use_refiner(loaded: LoadedModel, job: RenderJob, files: AssetFiles) -> LoadedModel | None:
    """The refiner a chunk's jobs name, loaded beside the worker's model on first use and kept for the
    chunks after; one at a time (another one is let go first). A refiner that cannot be loaded, whose
    weights are not the ones the job was planned with, or that cannot take over from the model's UNet
    (an inpainting model's 9 input channels) fails the chunk's jobs (AssetError), as a job it would never
    take over, or not from its first call (check_handover, InvalidInput); the worker serves on."""
    ref = job.refiner
    if ref is None:
        return None
    held = loaded.refiner
    if held is not None and (held.entry.name, held.identity) == (ref.name, ref.sha256):
        _check_takes_over(loaded, held, job)
        return held
    del held
    release_refiner(loaded)
    try:
        identity = files.registry.identity(ref.name)
        entry = files.registry.get(ref.name)
    except SdfarmError as e:
        raise AssetError(f"refiner {ref.name!r}: {e}") from e
    if identity != ref.sha256:
        raise AssetError(f"refiner {ref.name!r} has weights {identity[:10]} here; the job was planned with"
                         f" {ref.sha256[:10]}")
    if entry.s3 is not None:
        files.checkpoint(entry)  # fetched and verified first: an S3 blink is retried, a bad file fails the job
    try:
        loaded.refiner = load_refiner(files.registry, ref.name, loaded.device, files)
    except WorkerFatal as e:
        raise AssetError(f"refiner {ref.name!r}: {e}") from e
    _check_takes_over(loaded, loaded.refiner, job)
    return loaded.refiner


def release_refiner(loaded: LoadedModel) -> bool:
    """Let go of the refiner held beside the model (its memory back to the device); whether one was held."""
    if loaded.refiner is None:
        return False
    loaded.refiner = None
    gc.collect()
    if loaded.device.type == "cuda":
        torch.cuda.empty_cache()
    return True


def _check_takes_over(loaded: LoadedModel, refiner: LoadedModel, job: RenderJob) -> None:
    ours, theirs = loaded.pipe.unet.config.in_channels, refiner.pipe.unet.config.in_channels
    if ours != theirs:
        raise AssetError(f"refiner {refiner.entry.name!r} takes {theirs} input channels and model"
                         f" {loaded.entry.name!r} {ours} (an inpainting model and a plain one): it cannot take over")
    check_handover(loaded, refiner, job)


def refiner_of(loaded: LoadedModel, job: RenderJob, hires: bool) -> LoadedModel | None:
    """The refiner that takes over this pass of the job: with hires fix the hires pass's (A1111's
    default), else the first pass's; None for the other pass, or without one."""
    if job.refiner is None or (job.hires is not None) != hires:
        return None
    held = loaded.refiner
    assert held is not None, "use_refiner loads a chunk's refiner first"
    assert held.identity == job.refiner.sha256, "use_refiner loads a chunk's refiner first"
    return held


def eval_sigmas(sampler: str, sigmas: Any) -> list[float]:
    """The sigma of each model call a k-diffusion sampler makes over `sigmas` (k_diffusion/sampling.py):
    one per step, and a second-order sampler's second call (Heun at the next sigma; DPM2 and DPM++ SDE
    halfway in log sigma; DPM2 a halfway to its ancestral step's sigma_down) on every step but one to 0."""
    out: list[float] = []
    for s, following in itertools.pairwise(sigmas):
        s, following = float(s), float(following)
        out.append(s)
        if sampler not in SECOND_ORDER or following == 0:
            continue
        if sampler == "Heun":
            out.append(following)
            continue
        target = following
        if sampler == "DPM2 a":  # get_ancestral_step at eta 1
            up = min(following, math.sqrt(following**2 * (s**2 - following**2) / s**2))
            target = math.sqrt(following**2 - up**2)
        out.append(math.exp((math.log(s) + math.log(target)) / 2))
    return out


def pass_start(steps: int, strength: float | None) -> int:
    """The step a diffusers pipeline call starts at (its img2img get_timesteps; 0 without strength)."""
    if strength is None:
        return 0
    return max(steps - min(int(steps * strength), steps), 0)


def call_timesteps(scheduler: Any, sampler: str, steps: int, strength: float | None) -> list[int]:
    """The training timestep A1111 gives each model call of a pass (diffusers' `num_inference_steps` and
    img2img `strength`, as worker/samplers.py computes them). k-diffusion samplers: the nearest to each
    call's sigma, from A1111's sigmas for the pass (the scheduler's, built by worker/samplers.py) and the
    sampler's calls on them; timestep samplers: the pass's own timesteps."""
    start = pass_start(steps, strength)
    if sampler in K_DIFFUSION:
        full = scheduler.a1111_schedule.build(steps, scheduler.alphas_cumprod)
        train = training_sigmas(scheduler.alphas_cumprod)
        return [int(np.argmin(np.abs(train - sigma))) for sigma in eval_sigmas(sampler, full[start:])]
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps[start * scheduler.order:]]


def completed(timestep: int) -> float:
    """A1111's share of the schedule done at a model call: (999 - timestep) / 1000."""
    return (999 - timestep) / 1000


def switch_call(timesteps: list[int], switch_at: float) -> int:
    """How many of the pass's model calls run before the refiner takes over (all of them if it never does)."""
    return next((i for i, timestep in enumerate(timesteps) if completed(timestep) >= switch_at), len(timesteps))


def check_handover(loaded: LoadedModel, refiner: LoadedModel, job: RenderJob) -> None:
    """Refuse, with the reason, a job whose refiner would never take over (A1111 would render it without
    one, and record none), or would have to render a text-to-image pass from its first call on SDXL's
    refiner, which has no text-to-image pipeline."""
    sdxl = loaded.entry.family == "sdxl"
    hires = job.hires
    strength: float | None = None
    if hires is not None:
        sampler, schedule = (hires.sampler, hires.schedule_type) if hires.sampler else (job.sampler, job.schedule_type)
        steps, strength = hires_call(hires.steps or job.steps, hires.denoising_strength,
                                     loaded.base_scheduler_config["num_train_timesteps"])
        where = "the hires pass"
    else:
        sampler, schedule = job.sampler, job.schedule_type
        steps = job.steps
        if job.mode != "txt2img":
            steps, strength = img2img_call(job.steps, job.strength)
        where = "the render"
    assert schedule is not None
    at = call_timesteps(make_scheduler(sampler, schedule, loaded.base_scheduler_config, [job.seed], sdxl=sdxl),
                        sampler, steps, strength)
    first, switch_at = switch_call(at, job.refiner_switch_at), job.refiner_switch_at
    if first == len(at):
        raise InvalidInput(f"refiner_switch_at {switch_at:g} is past the last model call of {where} (timestep"
                           f" {at[-1]}, completed {completed(at[-1]):g}): the refiner would never take over; lower it")
    if first == 0 and hires is None and job.mode == "txt2img" and refiner.entry.family == REFINER:
        raise InvalidInput(f"refiner_switch_at {switch_at:g} is already reached at the first model call (timestep"
                           f" {at[0]}, completed {completed(at[0]):g}): SDXL's refiner cannot render a text-to-image"
                           " pass from its start; raise it")


def denoise(pipe: Any, jobs: list[RenderJob], call: dict[str, Any], *, sampler: str, steps: int,
            guidance_scale: float, encodings: Encodings, refiner: LoadedModel | None, mode: str,
            hires_of: int | None = None) -> torch.Tensor:
    """One pass's pipeline call (`call`: its other arguments; `steps`: the sampler's steps, for prompt
    schedules), to latents; with a refiner, handed over to it at A1111's switch. The pipeline's
    scheduler is the pass's."""
    def run(target: Any, prompts: dict[str, torch.Tensor], **extra: Any) -> torch.Tensor:
        latents: torch.Tensor = target(output_type="latent", guidance_scale=guidance_scale, **call, **prompts,
                                       **extra).images
        return latents

    if refiner is None:
        with conditioned(pipe, jobs, sampler, steps, guidance_scale, encodings, hires_of) as prompts:
            return run(pipe, prompts)
    at = call_timesteps(pipe.scheduler, sampler, call["num_inference_steps"], call.get("strength"))
    first = switch_call(at, jobs[0].refiner_switch_at)
    if first == len(at):  # never reached (check_handover refuses such jobs)
        return denoise(pipe, jobs, call, sampler=sampler, steps=steps, guidance_scale=guidance_scale,
                       encodings=encodings, refiner=None, mode=mode, hires_of=hires_of)
    if first == 0:  # the pass starts past the switch: the refiner renders all of it
        own = refiner.variant(mode)
        own.scheduler = pipe.scheduler
        with conditioned(own, jobs, sampler, steps, guidance_scale, {}, hires_of) as prompts:
            return run(own, prompts)
    with ExitStack() as stack:
        prompts = stack.enter_context(conditioned(pipe, jobs, sampler, steps, guidance_scale, encodings, hires_of))
        taking = stack.enter_context(conditioned(refiner.pipe, jobs, sampler, steps, guidance_scale, {}, hires_of,
                                                 first_call=first))
        stack.enter_context(_restored(pipe))
        handover = _Handover(refiner.pipe, first, taking, _pass_size(pipe, call, jobs[0]))
        return run(pipe, prompts, callback_on_step_end=handover, callback_on_step_end_tensor_inputs=["latents"])


def _pass_size(pipe: Any, call: dict[str, Any], job: RenderJob) -> tuple[int, int]:
    """(height, width) in pixels of the pass's latents: SDXL's size conditioning."""
    image = call.get("image")
    if isinstance(image, torch.Tensor):
        return image.shape[-2] * pipe.vae_scale_factor, image.shape[-1] * pipe.vae_scale_factor
    return call.get("height", job.height), call.get("width", job.width)


@contextmanager
def _restored(pipe: Any) -> Iterator[None]:
    """The pipeline's own UNet back after the call, however it ended."""
    unet = pipe.unet
    try:
        yield
    finally:
        if pipe.unet is not unet:
            pipe.unet = unet


class _Handover:
    """The step-end callback that hands the pipeline to the refiner after call `first - 1`: its UNet,
    and its conditioning in the layout the pipeline's loop uses ([uncond; cond] with guidance)."""

    def __init__(self, refiner: Any, first: int, prompts: dict[str, torch.Tensor], size: tuple[int, int]) -> None:
        self.refiner, self.first, self.prompts, self.size = refiner, first, prompts, size

    def __call__(self, pipe: Any, i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if i != self.first - 1:
            return {}
        latents = tensors["latents"]
        unet = self.refiner.unet
        pipe.unet = unet

        def sides(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
            both = torch.cat([uncond, cond]) if pipe.do_classifier_free_guidance else cond
            return both.to(device=latents.device, dtype=unet.dtype)

        p = self.prompts
        out = {"prompt_embeds": sides(p["prompt_embeds"], p["negative_prompt_embeds"])}
        if "pooled_prompt_embeds" in p:
            out["add_text_embeds"] = sides(p["pooled_prompt_embeds"], p["negative_pooled_prompt_embeds"])
        if getattr(self.refiner.config, "requires_aesthetics_score", False):
            rows = len(latents)
            cond, uncond = self.refiner._get_add_time_ids(
                self.size, (0, 0), self.size, AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE, self.size, (0, 0),
                self.size, dtype=unet.dtype, text_encoder_projection_dim=int(p["pooled_prompt_embeds"].shape[-1]))
            out["add_time_ids"] = sides(cond.repeat(rows, 1), uncond.repeat(rows, 1))
        return out
