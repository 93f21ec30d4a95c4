"""Schedules as A1111 v1.10.1 runs them: what "Automatic" means per sampler, the sigma arrays, and how
many steps img2img and the hires pass run from which sigma. The expected values are computed here
from A1111's and k-diffusion's formulas (file and function cited at each), not taken from sdfarm."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sdfarm.infotext import job_infotext, parse_infotext
from sdfarm.jobs import RenderJob
from sdfarm.models import Registry
from worker.pipeline import LoadedModel, load_model
from worker.render import render
from worker.samplers import hires_call, img2img_call, make_scheduler
from worker.testing import SD_SCHEDULER

BASE = {"model": "tiny-sd15", "model_hash": "0" * 64, "prompt": "a lighthouse", "seed": 5, "width": 64, "height": 64}

# modules/sd_samplers_kdiffusion.py, samplers_k_diffusion: each sampler's `scheduler` option
# (absent: k-diffusion's own discretisation, "Uniform")
A1111_AUTOMATIC = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM++ 2M SDE": "Exponential", "DPM2": "Karras",
                   "DPM2 a": "Karras", "Euler a": "Uniform", "Euler": "Uniform", "LMS": "Uniform", "Heun": "Uniform"}


def job(**changes: Any) -> RenderJob:
    return RenderJob.model_validate({**BASE, **changes})


@pytest.mark.parametrize("sampler", sorted(A1111_AUTOMATIC))
def test_automatic_is_the_samplers_own_default_and_the_infotext_says_which(sampler: str) -> None:
    resolved = A1111_AUTOMATIC[sampler]
    for given in ({}, {"schedule_type": "Automatic"}, {"schedule_type": resolved}):
        j = job(sampler=sampler, **given)
        assert j.schedule_type == resolved
        assert j.id == job(sampler=sampler).id  # one render, one job
        info = parse_infotext(job_infotext(j, "0" * 10))
        assert (info["Sampler"], info["Schedule type"]) == (sampler, resolved)


def test_the_default_job_is_dpmpp_2m_karras_and_a_schedule_the_sampler_cannot_run_is_refused() -> None:
    assert job().id == job(sampler="DPM++ 2M Karras").id
    with pytest.raises(ValueError, match=r"schedule_type 'KL Optimal' does not apply to sampler 'Heun': it ends at"
                                         r" sigma_min, and diffusers' Heun always ends at 0"):
        job(sampler="Heun", schedule_type="KL Optimal")
    assert job(sampler="DDIM").schedule_type == "Automatic"  # not a k-diffusion sampler: no schedule type
    assert "Schedule type" not in job_infotext(job(sampler="DDIM"), "0" * 10)


def test_every_infotext_says_rng_cpu_where_a1111_puts_it() -> None:
    # modules/processing.py, create_infotext: "RNG" (opts.randn_source, omitted only when "GPU") comes
    # after "Clip skip" and before the extra parameters; sdfarm draws each image's noise on the CPU
    text = job_infotext(job(clip_skip=2, sampler="Euler a"), "0" * 10)
    assert "Clip skip: 2, RNG: CPU, Version: " in text
    assert parse_infotext(text)["RNG"] == "CPU"


@pytest.mark.parametrize("sampler", ["DDIM", "UniPC", "PLMS", "LCM"])
def test_a_schedule_type_given_to_a_sampler_with_its_own_is_ignored(sampler: str) -> None:
    for given in ({"schedule_type": "Karras"}, {"schedule_type": "Exponential"}, {"sampler": f"{sampler} Karras"}):
        assert job(**{"sampler": sampler, **given}).id == job(sampler=sampler).id
    with pytest.raises(ValueError, match="schedule_type 'Bogus' does not apply"):
        job(sampler=sampler, schedule_type="Bogus")


def test_unipc_runs_a1111s_defaults() -> None:
    # modules/shared_options.py: uni_pc_variant bh1, uni_pc_order 3, uni_pc_lower_order_final, skip type
    # time_uniform (modules/models/diffusion/uni_pc: t evenly from 1 to 1/1000, the model at
    # (t - 1/1000) * 1000, the last point not evaluated)
    scheduler = make_scheduler("UniPC", "Automatic", SD_SCHEDULER, [1])
    assert (scheduler.config.solver_type, scheduler.config.solver_order) == ("bh1", 3)
    assert scheduler.config.final_sigmas_type == "sigma_min"  # uni_pc ends at t_0 = 1/N, not at sigma 0
    assert scheduler.config.lower_order_final
    scheduler.set_timesteps(10)
    assert [int(t) for t in scheduler.timesteps] == [round(float(t)) for t in torch.linspace(999, 0, 11)[:-1]]


# --- sigma arrays: k_diffusion/external.py (DiscreteSchedule.get_sigmas, t_to_sigma) and
# k_diffusion/sampling.py (get_sigmas_karras, get_sigmas_exponential); A1111 takes sigma_min and
# sigma_max from the model's own sigmas (sd_samplers_kdiffusion.py, KDiffusionSampler.get_sigmas) ---

def _model_sigmas() -> torch.Tensor:
    """SD's training sigmas: scaled_linear betas 0.00085..0.012 over 1000 steps."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    return ((1 - alphas) / alphas) ** 0.5


SIGMAS = _model_sigmas()
ZERO = torch.zeros(1, dtype=torch.float64)


def uniform(n: int) -> torch.Tensor:
    t = torch.linspace(999, 0, n, dtype=torch.float64)
    low, high = t.floor().long(), t.ceil().long()
    w = t - low
    return torch.cat([((1 - w) * SIGMAS.log()[low] + w * SIGMAS.log()[high]).exp(), ZERO])


def karras(n: int) -> torch.Tensor:
    rho, ramp = 7.0, torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = SIGMAS[0] ** (1 / rho), SIGMAS[-1] ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, ZERO])


def exponential(n: int) -> torch.Tensor:
    return torch.cat([torch.linspace(math.log(SIGMAS[-1]), math.log(SIGMAS[0]), n, dtype=torch.float64).exp(), ZERO])


EXPECTED = {"Uniform": uniform, "Karras": karras, "Exponential": exponential}


@pytest.mark.parametrize(("sampler", "schedule"), [
    ("Euler", "Automatic"), ("Euler a", "Automatic"), ("LMS", "Automatic"), ("Heun", "Automatic"),
    ("DPM++ 2M", "Automatic"), ("DPM++ 2M SDE", "Automatic"), ("DPM++ SDE", "Automatic"),
    ("Euler", "Karras"), ("Euler", "Exponential"), ("Heun", "Karras"), ("DPM++ 2M", "Exponential")])
@pytest.mark.parametrize("steps", [7, 20, 30])
def test_sigmas_are_k_diffusions_whatever_the_folder_says(sampler: str, schedule: str, steps: int) -> None:
    assert SD_SCHEDULER["timestep_spacing"] == "leading"  # the tiny model's folder says "leading", as SDXL's does
    scheduler = make_scheduler(sampler, job(sampler=sampler, schedule_type=schedule).schedule_type, SD_SCHEDULER,
                               [1])
    scheduler.set_timesteps(steps)
    got = torch.unique_consecutive(scheduler.sigmas.double())  # second-order samplers list inner sigmas twice
    want = EXPECTED[job(sampler=sampler, schedule_type=schedule).schedule_type](steps)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=5e-5, atol=0)  # float32 in diffusers
    assert abs(float(got[0]) - 14.6146) < 1e-3  # not "leading"'s ~11


def test_dpmpp_sde_is_stochastic_on_one_brownian_tree_per_image_seeded_with_its_seed() -> None:
    # A1111 (sd_samplers_kdiffusion.py, create_noise_sampler): BrownianTreeNoiseSampler(x, sigma_min,
    # sigma_max, seed=the batch's seeds): one tree per image, so an image's noise is its seed's alone
    scheduler = make_scheduler("DPM++ SDE", "Karras", SD_SCHEDULER, [7, 9])
    scheduler.set_timesteps(6)
    sample = torch.zeros((2, 4, 8, 8))
    scheduler.step(torch.zeros_like(sample), scheduler.timesteps[0], sample)
    trees = scheduler.noise_sampler.tree.trees
    assert [t._entropy for t in trees] == [7, 9]
    with pytest.raises(ValueError, match="DPM\\+\\+ SDE needs the images' seeds"):
        make_scheduler("DPM++ SDE", "Karras", SD_SCHEDULER)


# --- step counts: modules/sd_samplers_common.py, setup_img2img_steps, and sd_samplers_kdiffusion.py,
# sample_img2img: sigma_sched = sigmas[steps - t_enc - 1:] ---

def a1111_img2img(steps: int, strength: float) -> tuple[int, int]:
    """(schedule length, steps run) of plain img2img: t_enc = int(min(strength, 0.999) * steps)."""
    return steps, int(min(strength, 0.999) * steps) + 1


def a1111_hires(steps: int, denoise: float) -> tuple[int, int]:
    """The hires pass gives its steps: schedule int(steps / min(denoise, 0.999)), t_enc = steps - 1."""
    return int(steps / min(denoise, 0.999)), steps


def runs(n: int, strength: float) -> int:
    """What diffusers' img2img runs of an n-step schedule (pipeline get_timesteps)."""
    return min(int(n * strength), n)


@pytest.mark.parametrize("steps", [1, 2, 6, 20, 30, 150])
@pytest.mark.parametrize("strength", [0.01, 0.3, 0.5, 0.7, 0.75, 0.999, 1.0])
def test_img2img_and_hires_run_a1111s_step_counts(steps: int, strength: float) -> None:
    n, s = img2img_call(steps, strength)
    assert (n, runs(n, s)) == a1111_img2img(steps, strength)
    n, s = hires_call(steps, strength)
    want_n, want_run = a1111_hires(steps, strength)
    assert (n, runs(n, s)) == (min(want_n, 1000), min(want_run, n))


@pytest.fixture(scope="module")
def loaded(registry: Registry) -> LoadedModel:
    return load_model(registry, "tiny-sd15", "cpu")


def unet_timesteps(loaded: LoadedModel, jobs: list[RenderJob], inputs: Any = None) -> list[float]:
    """The timestep of every UNet call while the jobs render."""
    seen: list[float] = []
    hook = loaded.pipe.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(float((args[1] if len(args) > 1 else kwargs["timestep"]).flatten()[0])),
        with_kwargs=True)
    try:
        render(loaded, jobs, inputs)
    finally:
        hook.remove()
    return seen


def timesteps(sampler: str, n: int) -> list[float]:
    s = make_scheduler(sampler, job(sampler=sampler).schedule_type, SD_SCHEDULER, [1])
    s.set_timesteps(n)
    return [float(t) for t in s.timesteps]


@pytest.mark.parametrize("steps", [20, 30])
def test_ddim_calls_the_unet_where_a1111s_does(loaded: LoadedModel, steps: int) -> None:
    # modules/sd_samplers_timesteps.py get_timesteps: T = range(0, 1000, 1000 // steps) + 1;
    # sd_samplers_timesteps_impl.py ddim: the UNet at T[len - 1] down to T[1], never at T[0]
    t = [x + 1 for x in range(0, 1000, 1000 // steps)]
    seen = unet_timesteps(loaded, [job(model_hash=loaded.identity, steps=steps, sampler="DDIM")])
    assert seen == [float(x) for x in reversed(t[1:])]
    assert len(seen) == {20: 19, 30: 30}[steps]


def test_img2img_renders_int_strength_times_steps_plus_one_steps_from_a1111s_sigma(loaded: LoadedModel) -> None:
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    ref = {"key": "inputs/red.png", "sha256": hashlib.sha256(init.tobytes()).hexdigest(), "width": 64, "height": 64}
    j = job(model_hash=loaded.identity, steps=20, strength=0.75, sampler="Euler", init_image=ref)
    seen = unet_timesteps(loaded, [j], {j.id: (init, None)})
    assert len(seen) == 16  # A1111: int(0.75 * 20) + 1; diffusers alone would run 15
    assert seen == pytest.approx(timesteps("Euler", 20)[20 - 15 - 1:], abs=1e-3)  # from sigmas[steps - t_enc - 1]


def test_the_hires_pass_runs_its_steps_at_the_end_of_a1111s_longer_schedule(loaded: LoadedModel) -> None:
    j = job(model_hash=loaded.identity, steps=3, sampler="Euler",
            hires={"scale": 2, "steps": 10, "denoising_strength": 0.7, "upscaler": "Latent"})
    seen = unet_timesteps(loaded, [j])
    n = int(10 / 0.7)  # 14
    assert len(seen) == 3 + 10
    assert seen[3:] == pytest.approx(timesteps("Euler", n)[n - 10:], abs=1e-3)


# --- hires "Resize width/height to": modules/processing.py, StableDiffusionProcessingTxt2Img.init
# (hr_upscale_to_x/y, truncate_x/y) and sample_hr_pass (the latents cut by truncate // 2 each side) ---

@pytest.mark.parametrize(("size", "resize", "upscale_to", "truncate", "target"), [
    ((512, 768), (1024, 1024), (1024, 1536), (0, 64), (1024, 1024)),  # taller than wide: cut rows
    ((768, 512), (1024, 1024), (1536, 1024), (64, 0), (1024, 1024)),
    ((512, 512), (1024, 0), (1024, 1024), (0, 0), (1024, 1024)),  # one side: the other keeps the aspect
    ((512, 768), (0, 1152), (768, 1152), (0, 0), (768, 1152)),
    ((64, 64), (128, 96), (128, 128), (0, 4), (128, 96)),
])
def test_hires_resize_to_is_a1111s(size: tuple[int, int], resize: tuple[int, int], upscale_to: tuple[int, int],
                                   truncate: tuple[int, int], target: tuple[int, int]) -> None:
    w, h = size
    hires = job(width=w, height=h, hires={"resize_x": resize[0], "resize_y": resize[1], "scale": 3}).hires
    assert hires is not None
    assert (hires.upscale_to(w, h), hires.truncation(w, h), hires.target(w, h)) == (upscale_to, truncate, target)
    assert hires.scale == 2  # ignored with a resize size, as A1111 does: not part of the job


def test_a_hires_pass_resized_to_a_size_renders_that_size_and_records_it(loaded: LoadedModel) -> None:
    for upscaler in ("Latent", "Lanczos"):
        j = job(model_hash=loaded.identity, steps=3, hires={"resize_x": 128, "resize_y": 96, "steps": 2,
                                                            "denoising_strength": 0.5, "upscaler": upscaler})
        image, = render(loaded, [j])
        assert image.size == (128, 96)
    info = parse_infotext(job_infotext(j, "0" * 10))
    assert (info["Hires resize-1"], info["Hires resize-2"]) == ("128", "96")
    assert "Hires upscale" not in info


def test_the_hires_pass_runs_its_own_sampler_and_cfg_and_records_them(loaded: LoadedModel) -> None:
    base = {"scale": 2, "steps": 3, "denoising_strength": 0.5}
    plain = job(model_hash=loaded.identity, steps=3, sampler="Euler", hires=base)
    own = job(model_hash=loaded.identity, steps=3, sampler="Euler",
              hires={**base, "sampler": "DPM++ 2M", "guidance_scale": 3.5})
    assert own.hires is not None
    assert (own.hires.sampler, own.hires.schedule_type) == ("DPM++ 2M", "Karras")  # Automatic, resolved
    seen = unet_timesteps(loaded, [own])
    n = int(3 / 0.5)
    assert seen[3:] == pytest.approx(timesteps("DPM++ 2M", n)[n - 3:], abs=1e-3)  # the pass's sampler's schedule
    a, b = (np.asarray(render(loaded, [j])[0], dtype=np.int16) for j in (plain, own))
    assert np.abs(a - b).max() > 0
    info = parse_infotext(job_infotext(own, "0" * 10))
    assert (info["Hires sampler"], info["Hires schedule type"], info["Hires CFG Scale"]) == ("DPM++ 2M", "Karras",
                                                                                             "3.5")
    with pytest.raises(ValueError, match="schedule_type goes with a hires sampler of its own"):
        job(hires={**base, "schedule_type": "Karras"})
    with pytest.raises(ValueError, match="unknown sampler 'Nope'"):
        job(hires={**base, "sampler": "Nope"})
