"""Sampler names as A1111 users type them, and the schedule types each one accepts.

The mapping to diffusers scheduler classes lives in worker/samplers.py; this table is what the
producer validates against and what the infotext records.

"Automatic" means what it means in A1111 (v1.10, modules/sd_samplers_kdiffusion.py, the
`scheduler` option of each k-diffusion sampler): the sampler's own default schedule. A job states
the resolved type, so "DPM++ 2M" and "DPM++ 2M Karras" are one job, and the infotext always
records the schedule that ran. Samplers outside k-diffusion (DDIM, UniPC, PLMS, LCM) keep
"Automatic": their schedule is their own.
"""

from __future__ import annotations

from typing import Final

AUTOMATIC: Final = "Automatic"
UNIFORM: Final = "Uniform"  # k-diffusion's own discretisation: t evenly from 999 to 0, sigma(t) interpolated
KARRAS: Final = "Karras"
EXPONENTIAL: Final = "Exponential"
POLYEXPONENTIAL: Final = "Polyexponential"
SGM_UNIFORM: Final = "SGM Uniform"
KL_OPTIMAL: Final = "KL Optimal"
ALIGN_YOUR_STEPS: Final = "Align Your Steps"
SIMPLE: Final = "Simple"
NORMAL: Final = "Normal"
DDIM_SCHEDULE: Final = "DDIM"
BETA: Final = "Beta"
# the Beta schedule's distribution: A1111's options beta_dist_alpha and beta_dist_beta, at their defaults
# (its infotext records them as "Beta schedule alpha" and "Beta schedule beta")
BETA_ALPHA: Final = 0.6
BETA_BETA: Final = 0.6
# A1111's labels (modules/sd_schedulers.py, schedulers), in its order
SCHEDULE_TYPES: Final = (AUTOMATIC, UNIFORM, KARRAS, EXPONENTIAL, POLYEXPONENTIAL, SGM_UNIFORM, KL_OPTIMAL,
                         ALIGN_YOUR_STEPS, SIMPLE, NORMAL, DDIM_SCHEDULE, BETA)
_SIGMA_SCHEDULES = SCHEDULE_TYPES[1:]
# KL Optimal ends at sigma_min, not 0: diffusers' Heun, DPM2 and DPM++ SDE schedulers (and LMS) always
# end at 0 and step there their own way, so they cannot run it as A1111 does
_ENDING_AT_ZERO = tuple(s for s in _SIGMA_SCHEDULES if s != KL_OPTIMAL)


def _first(default: str, schedules: tuple[str, ...]) -> tuple[str, ...]:
    return (default, *(s for s in schedules if s != default))


# sampler -> schedule types it can run with (what worker/samplers.py can build); the first is what
# "Automatic" resolves to (sd_samplers_kdiffusion.py, samplers_k_diffusion: each one's `scheduler`)
SAMPLERS: Final[dict[str, tuple[str, ...]]] = {
    "Euler": _first(UNIFORM, _SIGMA_SCHEDULES),
    "Euler a": _first(UNIFORM, _SIGMA_SCHEDULES),
    "DPM++ 2M": _first(KARRAS, _SIGMA_SCHEDULES),
    "DPM++ 2M SDE": _first(EXPONENTIAL, _SIGMA_SCHEDULES),
    "DPM++ 2M SDE Heun": _first(EXPONENTIAL, _SIGMA_SCHEDULES),
    "DPM++ 3M SDE": _first(EXPONENTIAL, _SIGMA_SCHEDULES),
    "DPM++ SDE": _first(KARRAS, _ENDING_AT_ZERO),
    "DDIM": (AUTOMATIC,),
    "UniPC": (AUTOMATIC,),
    "LMS": _first(UNIFORM, _ENDING_AT_ZERO),
    "Heun": _first(UNIFORM, _ENDING_AT_ZERO),
    "DPM2": _first(KARRAS, _ENDING_AT_ZERO),
    "DPM2 a": _first(KARRAS, _ENDING_AT_ZERO),
    "PLMS": (AUTOMATIC,),
    "LCM": (AUTOMATIC,),
}
# samplers that run a schedule one step longer and drop its next-to-last sigma (A1111's
# discard_next_to_last_sigma option of each)
DISCARD_PENULTIMATE: Final = frozenset({"DPM2", "DPM2 a", "DPM++ 3M SDE"})
# samplers that call the model twice a step (A1111's second_order option: prompts are scheduled over
# 2 x steps)
SECOND_ORDER: Final = frozenset({"Heun", "DPM2", "DPM2 a", "DPM++ SDE"})
# A1111 samplers sdfarm refuses, and why
REFUSED_SAMPLERS: Final[dict[str, str]] = {
    "DPM++ 2S a": "diffusers has no single-step ancestral DPM-Solver++",
    "DPM fast": "k-diffusion's fixed-order DPM-Solver has no diffusers scheduler",
    "DPM adaptive": "an adaptive step count has no diffusers scheduler",
    "Restart": "diffusers has no Restart sampler",
    "DDIM CFG++": "diffusers has no CFG++ guidance",
}


# samplers outside k-diffusion: A1111 ignores the schedule type they are given
OWN_SCHEDULE: Final = frozenset(s for s, schedules in SAMPLERS.items() if schedules == (AUTOMATIC,))


def resolve_schedule(sampler: str, schedule_type: str) -> str:
    """The schedule a sampler runs when asked for `schedule_type` ("Automatic": its default; any
    schedule type, for a sampler with its own: Automatic, as A1111 ignores it)."""
    if sampler in OWN_SCHEDULE and schedule_type in SCHEDULE_TYPES:
        return AUTOMATIC
    return SAMPLERS[sampler][0] if schedule_type == AUTOMATIC else schedule_type


def split_sampler_name(name: str) -> tuple[str, str | None]:
    """Split a legacy combined name ("DPM++ 2M Karras") into (sampler, schedule type).

    Returns the schedule type as None when the name carries none.
    """
    for schedule in (KARRAS, EXPONENTIAL):
        suffix = " " + schedule
        if name.endswith(suffix) and name[: -len(suffix)] in SAMPLERS:
            return name[: -len(suffix)], schedule
    return name, None


def resolve_sampler(name: str, schedule_type: str) -> tuple[str, str] | None:
    """(sampler, the schedule it runs) for a sampler name as users write it ("DPM++ 2M Karras" too)
    and a schedule type ("Automatic" resolved); None for a name or type that is not known, which
    validation reports. A combined name whose schedule contradicts schedule_type raises ValueError."""
    sampler, named = split_sampler_name(name)
    if named is not None and schedule_type not in (AUTOMATIC, named):
        raise ValueError(f"sampler {name!r} names schedule type {named!r} but schedule_type is {schedule_type!r}")
    wanted = named or schedule_type
    if sampler not in SAMPLERS or wanted not in SCHEDULE_TYPES:
        return None
    return sampler, resolve_schedule(sampler, wanted)


def check_schedule(sampler: str, schedule_type: str) -> None:
    """ValueError, with what is allowed, when the (resolved) schedule type does not apply to the sampler."""
    allowed = SAMPLERS[sampler]
    if schedule_type == KL_OPTIMAL and schedule_type not in allowed:
        raise ValueError(f"schedule_type {schedule_type!r} does not apply to sampler {sampler!r}: it ends at"
                         f" sigma_min, and diffusers' {sampler} always ends at 0")
    if schedule_type not in allowed:
        names = allowed if AUTOMATIC in allowed else (AUTOMATIC, *allowed)
        raise ValueError(f"schedule_type {schedule_type!r} does not apply to sampler {sampler!r}"
                         f" (allowed: {', '.join(names)})")


def check_sampler(name: str) -> None:
    """ValueError naming what is allowed, or why an A1111 sampler is refused, for an unknown sampler."""
    if name in SAMPLERS:
        return
    base = name.removesuffix(" " + KARRAS).removesuffix(" " + EXPONENTIAL)
    if (reason := REFUSED_SAMPLERS.get(name) or REFUSED_SAMPLERS.get(base)) is not None:
        raise ValueError(f"sampler {name!r} is not supported: {reason}")
    raise ValueError(f"unknown sampler {name!r} (allowed: {', '.join(allowed_sampler_names())})")


def allowed_sampler_names() -> list[str]:
    """Every name a batch file may use, combined legacy names included."""
    names: list[str] = []
    for sampler, schedules in SAMPLERS.items():
        names.append(sampler)
        names.extend(f"{sampler} {s}" for s in (KARRAS, EXPONENTIAL) if s in schedules or sampler in OWN_SCHEDULE)
    return names
