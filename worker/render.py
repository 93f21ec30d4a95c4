"""Render compatible jobs as one batched pipeline call, one generator per image.

An image that comes out NaN fails alone: render_each gives its RenderError in its place and the
chunk-mates' images beside it (each op of the pipeline is per image). render() is the all-or-nothing
form, for callers that want images only."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from PIL import Image

from sdfarm.errors import RenderError
from sdfarm.extra_networks import strip_tags
from sdfarm.jobs import RenderJob, Upscale

from .adapters import embedding_tokens
from .assets import AssetFiles
from .hires import second_pass
from .masks import Inputs, JobInput, MaskModels, encode_input, job_inputs, masked_content, overlay
from .noise import give_noise, start_noise
from .only_masked import uncrop
from .pipeline import LoadedModel
from .prompts import chunk_counts
from .refiner import denoise, refiner_of, release_refiner, use_refiner
from .samplers import img2img_call, make_scheduler
from .scheduled import Encodings
from .vae import decode_each, encode, or_raise

log = logging.getLogger("sdfarm.worker")

Rendered = Image.Image | RenderError
"""A job's image, or why it has none (NaN), in its place in the chunk."""
T = TypeVar("T")


def generators(jobs: list[RenderJob]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with the job's seed: a job's noise does not depend on
    its chunk, its position in the chunk, or the worker's device."""
    return [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]


def prepare(loaded: LoadedModel, assets: AssetFiles, masks: MaskModels, jobs: list[RenderJob]) -> Inputs:
    """Put in place what render_each needs for compatible jobs: their files fetched and verified,
    their LoRAs and embeddings active, their VAE and upscalers loaded; returns their init images and
    masks."""
    first = jobs[0]
    files = assets.for_jobs(jobs)
    loaded.adapters.activate(first.loras, tuple({e for j in jobs for e in j.embeddings}), files)
    loaded.use_vae(first.vae, files)
    loaded.upscalers.prepare(first, files)
    use_refiner(loaded, first, assets)
    return job_inputs(assets, masks, jobs)


def render(loaded: LoadedModel, jobs: list[RenderJob], inputs: Inputs | None = None) -> list[Image.Image]:
    """render_each, all or nothing: the first failed image's RenderError is raised."""
    return [or_raise(image) for image in render_each(loaded, jobs, inputs)]


def render_each(loaded: LoadedModel, jobs: list[RenderJob], inputs: Inputs | None = None) -> list[Rendered]:
    """All jobs must share RenderJob.compat_key() (a Chunk guarantees it), and the pipeline must
    already hold their LoRAs and embeddings (Adapters.activate). img2img and inpaint jobs take their
    init image and mask from `inputs` (masks.job_inputs), and the upscaler models they name must be
    loaded (Upscalers.prepare). A job whose image is NaN gets its RenderError in its place. Where
    the batched call raises one for all (a hires first pass decoded for an upscaler model), the jobs
    are rendered again in halves, down to the one at fault."""
    try:
        return _render_batch(loaded, jobs, inputs)
    except RenderError as e:
        if len(jobs) == 1:
            return [e]
        log.warning("%s (rendering %d images together): rendering them in halves to find the job at fault", e,
                    len(jobs))
        half = len(jobs) // 2
        return render_each(loaded, jobs[:half], inputs) + render_each(loaded, jobs[half:], inputs)


def _render_batch(loaded: LoadedModel, jobs: list[RenderJob], inputs: Inputs | None) -> list[Rendered]:
    """render_each without the halving: a RenderError raised for the whole batch propagates (the
    halving is render_each's alone, so a padded static batch is never split)."""
    pipe = loaded.variant(jobs[0].mode)
    counts = chunk_counts(pipe, [strip_tags(j.prompt) for j in jobs], [j.negative_prompt for j in jobs],
                          [embedding_tokens(j) for j in jobs])
    if len(set(counts)) > 1:  # one call per prompt length: an image must not depend on its chunk-mates
        images_by_index: dict[int, Rendered] = {}
        for count in sorted(set(counts)):
            group = [i for i, c in enumerate(counts) if c == count]
            for i, image in zip(group, _render_batch(loaded, [jobs[i] for i in group], inputs), strict=True):
                images_by_index[i] = image
        return [images_by_index[i] for i in range(len(jobs))]
    if loaded.static_batch is not None and len(jobs) != loaded.static_batch:
        images = _static(loaded, jobs, inputs)
    else:
        images = _generate(loaded, jobs, inputs)
    return _finish(loaded, jobs, images, inputs)


def _generate(loaded: LoadedModel, jobs: list[RenderJob], inputs: Inputs | None) -> list[Rendered]:
    """One pipeline call (and its hires pass) for jobs of one prompt length, decoded image by image."""
    first = jobs[0]
    pipe = loaded.variant(first.mode)
    pipe.scheduler = make_scheduler(first.sampler, first.schedule_type, loaded.base_scheduler_config,
                                    [j.seed for j in jobs], sdxl=loaded.entry.family == "sdxl")
    gens = generators(jobs)
    call: dict[str, Any] = {"num_inference_steps": first.steps, "generator": gens}
    if first.mode == "txt2img":
        call.update(width=first.width, height=first.height)
        if first.varied:  # A1111's variation noise, drawn from the generators the pipeline goes on with
            noise = start_noise(jobs, gens, pipe.unet.config.in_channels, pipe.vae_scale_factor)
            call.update(latents=noise.to(device=pipe.unet.device, dtype=pipe.unet.dtype))
    else:
        assert inputs is not None, "img2img and inpaint jobs need their inputs"
        steps, strength = img2img_call(first.steps, first.strength)
        with torch.inference_mode():
            init = encode(pipe, [encode_input(j, *inputs[j.id][:2]) for j in jobs], first.width, first.height)
            init = torch.stack([masked_content(j, latents, inputs[j.id][1]) for j, latents in zip(jobs, init,
                                                                                                     strict=True)])
        call.update(image=init, strength=strength, num_inference_steps=steps)
        if first.varied and strength >= 1.0 and first.mode == "inpaint":
            # at full strength the inpaint pipeline starts from pure noise and never adds any: it takes the
            # variation noise as its latents, drawn from the jobs' generators as txt2img's is
            noise = start_noise(jobs, gens, pipe.vae.config.latent_channels, pipe.vae_scale_factor)
            call.update(latents=noise.to(device=pipe.unet.device, dtype=pipe.unet.dtype))
        elif first.varied:
            give_noise(pipe.scheduler, jobs, pipe.vae.config.latent_channels, pipe.vae_scale_factor,
                       (first.width, first.height))
        if first.mode == "inpaint":  # the masked image's latents only feed 9-channel inpainting UNets
            call.update(mask_image=[inputs[j.id][1] for j in jobs], masked_image_latents=init, width=first.width,
                        height=first.height)
    with torch.inference_mode():
        encodings: Encodings = {}
        latents = denoise(pipe, jobs, call, sampler=first.sampler, steps=first.steps,
                          guidance_scale=first.guidance_scale, encodings=encodings,
                          refiner=refiner_of(loaded, first, hires=False), mode=first.mode)
        if first.hires is not None:
            latents = second_pass(loaded, jobs, latents, generators(jobs), encodings)
        return decode_each(pipe, latents)


def _finish(loaded: LoadedModel, jobs: list[RenderJob], images: list[Rendered], inputs: Inputs | None
            ) -> list[Rendered]:
    """Per image, after the pipeline: the inpaint overlay and the final upscale (never on padding)."""
    first = jobs[0]
    if first.mode == "inpaint":
        assert inputs is not None
        images = [image if isinstance(image, RenderError) else _overlaid(image, inputs[j.id])
                  for j, image in zip(jobs, images, strict=True)]
    if (spec := first.upscale) is not None:
        images = [_upscaled(loaded, spec, image) for image in images]
    return images


def _overlaid(image: Image.Image, given: tuple[Image.Image, Image.Image | None] | JobInput) -> Image.Image:
    """The inpainted image with the init image kept where the mask keeps it ("Only masked": put back
    into the whole image)."""
    init, mask = given[0], given[1]
    assert mask is not None, "an inpaint job has its mask (masks.job_inputs)"
    back = given[2] if len(given) > 2 else None
    return uncrop(image, back) if back is not None else overlay(init, image, mask)


def _upscaled(loaded: LoadedModel, spec: Upscale, image: Rendered) -> Rendered:
    """The final upscale of one image; an upscaler model's NaN (RenderError) fails that image only."""
    if isinstance(image, RenderError):
        return image
    try:
        resized: Image.Image = loaded.upscalers.resize(image, spec.target(*image.size), spec.upscaler,
                                                       spec.upscaler_sha256)
    except RenderError as e:
        return e
    return resized


def _static(loaded: LoadedModel, jobs: list[RenderJob], inputs: Inputs | None) -> list[Rendered]:
    """A compiled pipeline renders exactly static_batch images per call (one graph, no recompile):
    slices of that size, the last one padded with copies of its last job, whose images are dropped
    before any per-image work (overlay, upscale).
    Every job then renders in a call of the same size, so its pixels depend neither on its
    chunk-mates nor on the padding."""
    size = loaded.static_batch
    assert size is not None
    images: list[Rendered] = []
    for start in range(0, len(jobs), size):
        part = jobs[start:start + size]
        padded = part + [part[-1]] * (size - len(part))
        images += _generate(loaded, padded, inputs)[:len(part)]
    return images


def render_split(loaded: LoadedModel, jobs: list[RenderJob],
                 render_fn: Callable[[LoadedModel, list[RenderJob]], list[T]]) -> list[T]:
    """Render; on out-of-memory, split the chunk in halves down to single images. Each image's own
    generator makes the halves give the same images as the whole. OOM on one image is raised.
    A compiled pipeline's static batch is halved instead, for this chunk and the ones after it."""
    try:
        return render_fn(loaded, jobs)
    except torch.OutOfMemoryError:
        # a refiner held for earlier chunks goes first: this chunk, without one, is tried again whole
        retry = jobs[0].refiner is None and loaded.refiner is not None
        if not retry and (loaded.static_batch if loaded.static_batch is not None else len(jobs)) == 1:
            raise
    # split only after the except block: its traceback keeps the failed call's tensors alive, so
    # inside it empty_cache() frees nothing and the halves would run out of memory too
    if retry:
        release_refiner(loaded)
        log.warning("out of memory rendering %d images at %dx%d: the refiner held beside the model let go",
                    len(jobs), jobs[0].width, jobs[0].height)
        return render_split(loaded, jobs, render_fn)
    if loaded.device.type == "cuda":
        torch.cuda.empty_cache()
    if loaded.static_batch is not None:
        loaded.static_batch //= 2
        log.warning("out of memory rendering %d images at %dx%d: static batch reduced to %d (a recompile)",
                    len(jobs), jobs[0].width, jobs[0].height, loaded.static_batch)
        return render_split(loaded, jobs, render_fn)
    log.warning("out of memory rendering %d images at %dx%d: splitting in halves", len(jobs), jobs[0].width,
                jobs[0].height)
    half = len(jobs) // 2
    return render_split(loaded, jobs[:half], render_fn) + render_split(loaded, jobs[half:], render_fn)
