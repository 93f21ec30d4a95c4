"""A1111's start noise for variation seeds (modules/rng.py, ImageRNG.first; modules/rng.py, slerp).

Plain jobs leave their noise to the pipeline, which draws it from the job's generator as A1111 does.
A job with a variation seed (`subseed`, `subseed_strength`) or `seed_resize_from` gets its noise
here, drawn as A1111 draws it, from the same generator the pipeline then keeps drawing from (an
ancestral sampler's step noise comes after it, as in A1111). An img2img pass (img2img, inpainting,
the hires pass, whose noise A1111 varies too) takes it through its scheduler (give_noise):

- the noise is the seed's draw at the job's latent shape, or at `seed_resize_from`'s;
- with a variation seed it is slerped toward the subseed's draw by `subseed_strength`;
- noise of another size is pasted, centred, into the seed's draw at the job's shape.
"""

from __future__ import annotations

from typing import Any

import torch

from sdfarm.jobs import RenderJob


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's slerp of two (C, H, W) noises, along their dimension 1, as A1111 computes it."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)  # A1111's own (reversed) weights for nearly equal noises
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def seed_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A seed's first draw of noise, on the CPU: A1111's create_random_tensors for one image."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def job_noise(job: RenderJob, generator: torch.Generator, channels: int, scale: int,
              size: tuple[int, int] | None = None) -> torch.Tensor:
    """One job's (C, H, W) start noise in float32 on the CPU, for an image of `size` (width, height;
    default the job's); `generator` is the job's own, and has drawn it."""
    width, height = size or (job.width, job.height)
    shape = (channels, height // scale, width // scale)
    resized = job.seed_resize_from
    noise_shape = shape if resized is None else (channels, resized[1] // scale, resized[0] // scale)
    sub = seed_noise(noise_shape, job.subseed) if job.subseed is not None and job.subseed_strength > 0 else None
    noise = seed_noise(noise_shape, job.seed) if noise_shape != shape else torch.randn(shape, generator=generator)
    if sub is not None:
        noise = slerp(job.subseed_strength, noise, sub)
    if noise_shape == shape:
        return noise
    x = torch.randn(shape, generator=generator)
    dx, dy = (shape[2] - noise_shape[2]) // 2, (shape[1] - noise_shape[1]) // 2
    w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
    h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
    tx, ty, sx, sy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
    x[:, ty:ty + h, tx:tx + w] = noise[:, sy:sy + h, sx:sx + w]
    return x


def start_noise(jobs: list[RenderJob], generators: list[torch.Generator], channels: int, scale: int,
                size: tuple[int, int] | None = None) -> torch.Tensor:
    """The chunk's (N, C, H, W) start noise, float32 on the CPU: the pipeline's `latents`."""
    return torch.stack([job_noise(j, g, channels, scale, size) for j, g in zip(jobs, generators, strict=True)])


def give_noise(scheduler: Any, jobs: list[RenderJob], channels: int, scale: int, size: tuple[int, int]) -> None:
    """Make an img2img pass (img2img, inpainting, the hires pass) noise its init latents with the
    jobs' variation noise for an image of `size`. Its pipeline draws the start noise itself, once,
    from each job's generator: that draw is A1111's draw from the image's generator, so the variation
    noise is computed from generators of its own and put in place of the drawn noise wherever the
    scheduler adds noise (the start, and an inpainting pass's re-noised init)."""
    noise = start_noise(jobs, [torch.Generator("cpu").manual_seed(j.seed) for j in jobs], channels, scale, size)
    add_noise = scheduler.add_noise

    def varied(original: torch.Tensor, drawn: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if drawn.shape != noise.shape:
            raise RuntimeError(f"the pass drew noise of shape {tuple(drawn.shape)}, not the jobs' {tuple(noise.shape)}")
        return add_noise(original, noise.to(drawn), timesteps)  # type: ignore[no-any-return]

    scheduler.add_noise = varied
