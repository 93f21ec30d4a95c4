"""A1111 sampler names -> diffusers schedulers, built fresh from the pipeline's own config.

diffusers is imported where a scheduler is made, never at module level: importing it asks
torch.accelerator.is_available(), which initialises the CUDA driver, and the worker's prefork
parent imports this module. A parent that touched CUDA leaves its pool child unable to use it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from sdfarm.samplers import DISCARD_PENULTIMATE, KL_OPTIMAL, OWN_SCHEDULE, SAMPLERS, resolve_schedule

from .schedules import a1111_sigmas, sigma_to_t, training_sigmas

# sampler -> (diffusers scheduler class name, extra config)
_TABLE: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "DPM++ 2M SDE Heun": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                                                          "solver_type": "heun"}),
    "DPM++ 3M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),  # stochastic, on a Brownian tree per image (torchsde)
    # A1111's DDIM timesteps: steps_offset 1, "leading" (1, 1 + c, ... with c = 1000 // steps)
    "DDIM": ("DDIMScheduler", {"timestep_spacing": "leading", "steps_offset": 1}),
    # A1111's UniPC options' defaults: variant bh1, order 3, lower order final, time-uniform steps
    # ending at discrete timestep 0 (sigma_min), not at sigma 0 (where bh1 divides by zero)
    "UniPC": ("UniPCMultistepScheduler", {"solver_type": "bh1", "solver_order": 3, "lower_order_final": True,
                                          "timestep_spacing": "linspace", "final_sigmas_type": "sigma_min"}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "LCM": ("LCMScheduler", {}),
}
assert set(_TABLE) == set(SAMPLERS), "worker and contract disagree on sampler names"

# A1111 runs these through k-diffusion, on k-diffusion's sigmas
K_DIFFUSION = frozenset(s for s in SAMPLERS if s not in OWN_SCHEDULE)
# stochastic samplers whose noise A1111 draws from a Brownian tree per image, seeded with its seed
BROWNIAN = frozenset({"DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"})
# the schedulers that take the final sigma as a setting (the others end at 0, or set it here)
_FINAL_SIGMA = frozenset({"EulerDiscreteScheduler", "DPMSolverMultistepScheduler"})


@dataclass(frozen=True)
class Sigmas:
    """The schedule a k-diffusion sampler's scheduler steps over, as A1111 builds it."""

    schedule: str
    sdxl: bool
    discard_penultimate: bool

    def build(self, steps: int, alphas_cumprod: Any) -> Any:
        return a1111_sigmas(self.schedule, steps, training_sigmas(alphas_cumprod), sdxl=self.sdxl,
                            discard_penultimate=self.discard_penultimate)


def make_scheduler(sampler: str, schedule_type: str, base_config: Any, seeds: list[int] | None = None, *,
                   sdxl: bool = False) -> Any:
    """A new scheduler (they keep per-run state) for one chunk. A k-diffusion sampler steps over
    A1111's sigmas for its schedule type (worker/schedules.py), whatever the model folder's
    `timestep_spacing` says. seeds: the chunk's, one per image: the SDE samplers' Brownian noise comes
    from one tree per image seeded with it, as A1111 seeds them (sd_samplers_kdiffusion.py,
    create_noise_sampler), so an image does not depend on its chunk. sdxl: Align Your Steps has a
    table per model family."""
    import diffusers

    class_name, extra = _TABLE[sampler]
    kwargs = dict(extra)
    if sampler in BROWNIAN and not seeds:
        raise ValueError(f"{sampler} needs the images' seeds for its Brownian noise")
    if class_name == "DPMSolverSDEScheduler":
        kwargs["noise_sampler_seed"] = list(seeds or ())
    if sampler == "DDIM":
        return _a1111_ddim().from_config(base_config, **kwargs)
    cls = getattr(diffusers, class_name)
    if sampler not in K_DIFFUSION:
        return cls.from_config(base_config, **kwargs)
    schedule = resolve_schedule(sampler, schedule_type)
    sigmas = Sigmas(schedule, sdxl, sampler in DISCARD_PENULTIMATE)
    kwargs["timestep_spacing"] = "linspace"
    if class_name in _FINAL_SIGMA:  # A1111's KL Optimal ends at sigma_min
        kwargs["final_sigmas_type"] = "sigma_min" if schedule == KL_OPTIMAL else "zero"
    if class_name == "DPMSolverMultistepScheduler":
        # k-diffusion keeps the full order to the end but for the step to sigma 0 (which diffusers makes
        # first order for the final sigma "zero"); diffusers' lower_order_final lowers the last steps'
        kwargs["lower_order_final"] = False
    if class_name == "EulerAncestralDiscreteScheduler":
        return _euler_ancestral(sigmas).from_config(base_config, **kwargs)
    # their Karras conversion is where A1111's sigmas go in: everything after follows from them
    made = _with_a1111_sigmas(cls, sigmas)
    if sampler in BROWNIAN and class_name == "DPMSolverMultistepScheduler":
        scheduler = _brownian(made).from_config(base_config, use_karras_sigmas=True, **kwargs)
        scheduler.seeds = list(seeds or ())
        return scheduler
    return made.from_config(base_config, use_karras_sigmas=True, **kwargs)


@functools.cache
def _with_a1111_sigmas(cls: type, sigmas: Sigmas) -> Any:
    """The scheduler class with its Karras conversion replaced by A1111's schedule: each k-diffusion
    scheduler of diffusers builds its sigmas, converts them (use_karras_sigmas), then derives its
    timesteps, second-order points and final sigma from what the conversion returned."""
    base: Any = cls

    class A1111Sigmas(base):  # type: ignore[misc]
        a1111_schedule = sigmas

        def _convert_to_karras(self, in_sigmas: Any, num_inference_steps: int | None = None) -> Any:
            # Euler, Heun, DPM2, LMS and DPM++ SDE pass the step count's interpolated sigmas; DPM-Solver
            # the whole training range, with the step count
            steps = num_inference_steps or len(in_sigmas)
            return self.a1111_schedule.build(steps, self.alphas_cumprod)[:-1]

    A1111Sigmas.__name__ = A1111Sigmas.__qualname__ = f"A1111{cls.__name__}"
    return A1111Sigmas


@functools.cache
def _brownian(cls: type) -> Any:
    """DPM-Solver++'s SDE variants with A1111's noise (k_diffusion/sampling.py, sample_dpmpp_2m_sde and
    sample_dpmpp_3m_sde): each step's noise is the increment of one Brownian tree per image, seeded
    with the image's seed and spanning the sigmas sampled over, drawn on the CPU, instead of a fresh
    draw from the image's generator. A step to sigma 0 adds no noise."""
    import torch
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    base: Any = cls

    class Brownian(base):  # type: ignore[misc]
        seeds: list[int]
        _noise: Any = None

        def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
            super().set_timesteps(*args, **kwargs)
            self._noise = None

        def step(self, model_output: Any, timestep: Any, sample: Any, generator: Any = None,
                 variance_noise: Any = None, return_dict: bool = True) -> Any:
            if self.step_index is None:
                self._init_step_index(timestep)
            sigma, sigma_next = (float(s) for s in self.sigmas[self.step_index:self.step_index + 2])
            if self._noise is None:  # over the whole schedule, as A1111's, where img2img starts late too
                whole = self.sigmas
                self._noise = BrownianTreeNoiseSampler(sample.float().cpu(), float(whole[whole > 0].min()),
                                                       float(whole.max()), seed=self.seeds)
            noise = self._noise(sigma, sigma_next) if sigma_next > 0 else torch.zeros(sample.shape)
            return super().step(model_output, timestep, sample, generator, noise.to(sample.device, sample.dtype),
                                return_dict)

        def multistep_dpm_solver_third_order_update(self, model_output_list: Any, *args: Any, sample: Any = None,
                                                    noise: Any = None, **kwargs: Any) -> Any:
            """DPM++ 3M SDE's step as k-diffusion's sample_dpmpp_3m_sde takes it: diffusers' SDE branch
            weighs the second difference D2 by ((1 - e^-2h - 2h) / (2h)^2 - 0.5) where k-diffusion's
            -phi_3 is the same fraction + 0.5, so alpha_t x D2 is added back."""
            x = super().multistep_dpm_solver_third_order_update(model_output_list, *args, sample=sample,
                                                                noise=noise, **kwargs)
            i = self.step_index
            alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[i + 1])
            lambdas = [torch.log(a) - torch.log(s) for a, s in
                       (self._sigma_to_alpha_sigma_t(self.sigmas[j]) for j in (i, i - 1, i - 2))]
            lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
            h, h_0, h_1 = lambda_t - lambdas[0], lambdas[0] - lambdas[1], lambdas[1] - lambdas[2]
            r0, r1 = h_0 / h, h_1 / h
            m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
            d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
            return x + alpha_t * (d1_0 - d1_1) / (r0 + r1)

    Brownian.__name__ = Brownian.__qualname__ = f"Brownian{cls.__name__}"
    return Brownian


@functools.cache
def _euler_ancestral(sigmas: Sigmas) -> Any:
    """Euler a on A1111's sigmas: diffusers' EulerAncestralDiscreteScheduler has no sigma conversion to
    hook, so its sigmas and timesteps are replaced once it has set its own."""
    import diffusers
    import torch

    base: Any = diffusers.EulerAncestralDiscreteScheduler

    class A1111EulerAncestralDiscreteScheduler(base):  # type: ignore[misc]
        a1111_schedule = sigmas

        def set_timesteps(self, num_inference_steps: int, device: Any = None) -> None:
            super().set_timesteps(num_inference_steps, device)
            sigmas = self.a1111_schedule.build(num_inference_steps, self.alphas_cumprod)
            train = training_sigmas(self.alphas_cumprod)
            timesteps = [sigma_to_t(float(s), train) for s in sigmas[:-1]]
            self.sigmas = torch.from_numpy(sigmas.astype("float32"))
            self.timesteps = torch.tensor(timesteps, dtype=torch.float32, device=device)
            self.num_inference_steps = len(timesteps)

    return A1111EulerAncestralDiscreteScheduler


@functools.cache
def _a1111_ddim() -> Any:
    """DDIM as A1111 runs it (modules/sd_samplers_timesteps.py, get_timesteps, and
    sd_samplers_timesteps_impl.py, ddim): over T = range(0, 1000, 1000 // steps) + 1 it calls the
    UNet at every T but the first, from the last down, each step going to the one below; the last
    goes to T[0] = 1. That is len(T) - 1 calls (19 for 20 steps, 30 for 30), where diffusers' own
    makes `steps` calls and ends past t = 1."""
    import diffusers

    ddim: Any = diffusers.DDIMScheduler

    class A1111DDIMScheduler(ddim):  # type: ignore[misc]
        def set_timesteps(self, num_inference_steps: int, device: Any = None) -> None:
            import torch

            super().set_timesteps(num_inference_steps, device)  # its step goes from t to t - 1000 // steps
            stride = self.config.num_train_timesteps // num_inference_steps
            t = torch.arange(0, self.config.num_train_timesteps, stride).add(1).clamp(0, 999)
            self.timesteps = t[1:].flip(0).to(device=device)

    return A1111DDIMScheduler


def img2img_call(steps: int, strength: float) -> tuple[int, float]:
    """(num_inference_steps, strength) for a diffusers img2img or inpaint call that runs what A1111's
    img2img runs (modules/sd_samplers_common.py, setup_img2img_steps, default options): a schedule of
    `steps`, of which the last int(min(strength, 0.999) * steps) + 1."""
    return steps, _last(steps, int(min(strength, 0.999) * steps) + 1)


def hires_call(steps: int, denoise: float, train_steps: int = 1000) -> tuple[int, float]:
    """(num_inference_steps, strength) for A1111's hires pass (setup_img2img_steps with the pass's
    steps given): a schedule of int(steps / min(denoise, 0.999)), of which the last `steps`. diffusers
    builds no schedule longer than the model's training timesteps: a longer one is capped there."""
    n = min(int(steps / min(denoise, 0.999)), train_steps)
    return n, _last(n, min(steps, n))


def _last(n: int, run: int) -> float:
    """The strength at which diffusers' img2img runs the last `run` steps of `n` (it runs
    int(n * strength); the half step keeps float rounding off the boundary)."""
    return min(1.0, (run + 0.5) / n)
