"""A1111's hires fix.

The first pass stops at latents; they are resized (a "Latent" upscaler) or decoded, resized as
pixels (Lanczos, Nearest, or an upscaler model) and encoded again; then an img2img pass at the
denoising strength adds detail at the new size. As in A1111, the second pass runs exactly
`hires.steps` denoising steps (the first pass's count when 0), the last of a schedule of
int(steps / denoising_strength), and draws its noise from the job's own seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdfarm.jobs import LATENT_UPSCALERS, RenderJob

from .noise import give_noise
from .pipeline import LoadedModel
from .refiner import denoise, refiner_of
from .samplers import hires_call, make_scheduler
from .scheduled import Encodings, model_calls
from .vae import decode, encode


def second_pass(loaded: LoadedModel, jobs: list[RenderJob], first_pass: torch.Tensor,
                generators: list[torch.Generator], encodings: Encodings) -> torch.Tensor:
    """first_pass: the first pass's latents; encodings: the first pass's prompts, reused where the pass
    renders the same. Returns the second pass's latents."""
    job = jobs[0]
    hires = job.hires
    assert hires is not None
    width, height = hires.upscale_to(job.width, job.height)
    pipe = loaded.variant("img2img")
    scale = pipe.vae_scale_factor
    if hires.upscaler in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[hires.upscaler]
        image = F.interpolate(first_pass, size=(height // scale, width // scale), mode=mode, antialias=antialias)
    else:  # encoded here (the posterior's mean), so the pass's noise is the seed's first draw, as in A1111
        pixels = [loaded.upscalers.resize(img, (width, height), hires.upscaler, hires.upscaler_sha256)
                  for img in decode(pipe, first_pass)]
        image = encode(pipe, pixels, width // scale * scale, height // scale * scale)
    tx, ty = hires.truncation(job.width, job.height)
    image = image[:, :, ty // 2:image.shape[2] - (ty + 1) // 2, tx // 2:image.shape[3] - (tx + 1) // 2]
    sampler, schedule = (hires.sampler, hires.schedule_type) if hires.sampler else (job.sampler, job.schedule_type)
    assert schedule is not None
    pipe.scheduler = make_scheduler(sampler, schedule, loaded.base_scheduler_config, [j.seed for j in jobs],
                                    sdxl=loaded.entry.family == "sdxl")
    if job.varied:  # A1111 varies the hires pass's noise as the first pass's, at its size
        give_noise(pipe.scheduler, jobs, pipe.vae.config.latent_channels, scale, hires.target(job.width, job.height))
    guidance = hires.guidance_scale if hires.guidance_scale is not None else job.guidance_scale
    steps = hires.steps or job.steps
    n, strength = hires_call(steps, hires.denoising_strength, loaded.base_scheduler_config["num_train_timesteps"])
    # prompts scheduled over the pass's model calls, edit times counting on from the first pass's
    call = {"image": image, "strength": strength, "num_inference_steps": n, "generator": generators}
    return denoise(pipe, jobs, call, sampler=sampler, steps=steps, guidance_scale=guidance, encodings=encodings,
                   refiner=refiner_of(loaded, job, hires=True), mode="img2img",
                   hires_of=model_calls(job.sampler, job.steps))
