"""A1111 sampler names -> diffusers schedulers, built fresh from the pipeline's own config.

diffusers is imported where a scheduler is made, never at module level: importing it asks
torch.accelerator.is_available(), which initialises the CUDA driver, and the worker's prefork
parent imports this module. A parent that touched CUDA leaves its pool child unable to use it.
"""

from __future__ import annotations

import functools
from typing import Any

from sdfarm.samplers import EXPONENTIAL, KARRAS, SAMPLERS, resolve_schedule

# sampler -> (diffusers scheduler class name, extra config)
_TABLE: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
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
K_DIFFUSION = frozenset({"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE", "LMS", "Heun", "DPM2", "DPM2 a"})


def make_scheduler(sampler: str, schedule_type: str, base_config: Any, seeds: list[int] | None = None) -> Any:
    """A new scheduler (they keep per-run state) for one chunk. The k-diffusion samplers' sigmas
    span k-diffusion's whole range (14.61 down to 0 on SD's betas) whatever the model folder's
    `timestep_spacing` says: "linspace" is k-diffusion's uniform discretisation, and the Karras and
    exponential conversions take their ends from it. seeds: the chunk's, one per image: DPM++ SDE's
    Brownian noise comes from one tree per image seeded with it, as A1111 seeds them
    (sd_samplers_kdiffusion.py, create_noise_sampler), so an image does not depend on its chunk."""
    import diffusers

    class_name, extra = _TABLE[sampler]
    kwargs = dict(extra)
    if sampler in K_DIFFUSION:
        kwargs["timestep_spacing"] = "linspace"
    if class_name == "DPMSolverSDEScheduler":
        if not seeds:
            raise ValueError("DPM++ SDE needs the images' seeds for its Brownian noise")
        kwargs["noise_sampler_seed"] = list(seeds)
    schedule = resolve_schedule(sampler, schedule_type)
    if schedule == KARRAS:
        kwargs["use_karras_sigmas"] = True
    elif schedule == EXPONENTIAL:
        kwargs["use_exponential_sigmas"] = True
    cls = _a1111_ddim() if sampler == "DDIM" else getattr(diffusers, class_name)
    return cls.from_config(base_config, **kwargs)


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
