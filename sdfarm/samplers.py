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
SCHEDULE_TYPES: Final = (AUTOMATIC, UNIFORM, KARRAS, EXPONENTIAL)

_SIGMA_SCHEDULES = (UNIFORM, KARRAS, EXPONENTIAL)

# sampler -> schedule types it can run with (what worker/samplers.py can build); the first is what
# "Automatic" resolves to
SAMPLERS: Final[dict[str, tuple[str, ...]]] = {
    "Euler": _SIGMA_SCHEDULES,
    "Euler a": (UNIFORM,),
    "DPM++ 2M": (KARRAS, EXPONENTIAL),
    "DPM++ 2M SDE": (EXPONENTIAL, KARRAS),
    "DPM++ SDE": (KARRAS, EXPONENTIAL),
    "DDIM": (AUTOMATIC,),
    "UniPC": (AUTOMATIC,),
    "LMS": (UNIFORM,),
    "Heun": _SIGMA_SCHEDULES,
    "DPM2": (KARRAS, UNIFORM, EXPONENTIAL),
    "DPM2 a": (KARRAS, UNIFORM, EXPONENTIAL),
    "PLMS": (AUTOMATIC,),
    "LCM": (AUTOMATIC,),
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
    if schedule_type not in allowed:
        names = allowed if AUTOMATIC in allowed else (AUTOMATIC, *allowed)
        raise ValueError(f"schedule_type {schedule_type!r} does not apply to sampler {sampler!r}"
                         f" (allowed: {', '.join(names)})")


def allowed_sampler_names() -> list[str]:
    """Every name a batch file may use, combined legacy names included."""
    names: list[str] = []
    for sampler, schedules in SAMPLERS.items():
        names.append(sampler)
        names.extend(f"{sampler} {s}" for s in (KARRAS, EXPONENTIAL) if s in schedules or sampler in OWN_SCHEDULE)
    return names
