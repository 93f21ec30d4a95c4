"""A1111 sampler names -> diffusers schedulers, built fresh from the pipeline's own config.

diffusers is imported where a scheduler is made, never at module level: importing it asks
torch.accelerator.is_available(), which initialises the CUDA driver, and the worker's prefork
parent imports this module. A parent that touched CUDA leaves its pool child unable to use it.
"""

from __future__ import annotations

from typing import Any

from sdfarm.samplers import EXPONENTIAL, KARRAS, SAMPLERS

# sampler -> (diffusers scheduler class name, extra config)
_TABLE: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "DPM++ SDE": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "lower_order_final": True}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "LCM": ("LCMScheduler", {}),
}
assert set(_TABLE) == set(SAMPLERS), "worker and contract disagree on sampler names"


def make_scheduler(sampler: str, schedule_type: str, base_config: Any) -> Any:
    """A new scheduler (they keep per-run state) for one chunk."""
    import diffusers

    class_name, extra = _TABLE[sampler]
    kwargs = dict(extra)
    if schedule_type == KARRAS:
        kwargs["use_karras_sigmas"] = True
    elif schedule_type == EXPONENTIAL:
        kwargs["use_exponential_sigmas"] = True
    return getattr(diffusers, class_name).from_config(base_config, **kwargs)
