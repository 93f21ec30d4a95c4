"""Sampler names as A1111 users type them, and the schedule types each one accepts.

The mapping to diffusers scheduler classes lives in worker/samplers.py; this table is what the
producer validates against and what the infotext records.
"""

from __future__ import annotations

from typing import Final

AUTOMATIC: Final = "Automatic"
KARRAS: Final = "Karras"
EXPONENTIAL: Final = "Exponential"
SCHEDULE_TYPES: Final = (AUTOMATIC, KARRAS, EXPONENTIAL)

_SIGMA_SCHEDULES = (AUTOMATIC, KARRAS, EXPONENTIAL)

# sampler -> schedule types it can run with (what worker/samplers.py can build)
SAMPLERS: Final[dict[str, tuple[str, ...]]] = {
    "Euler": _SIGMA_SCHEDULES,
    "Euler a": (AUTOMATIC,),
    "DPM++ 2M": _SIGMA_SCHEDULES,
    "DPM++ 2M SDE": _SIGMA_SCHEDULES,
    "DPM++ SDE": _SIGMA_SCHEDULES,
    "DDIM": (AUTOMATIC,),
    "UniPC": _SIGMA_SCHEDULES,
    "LMS": (AUTOMATIC,),
    "Heun": _SIGMA_SCHEDULES,
    "DPM2": _SIGMA_SCHEDULES,
    "DPM2 a": _SIGMA_SCHEDULES,
    "PLMS": (AUTOMATIC,),
    "LCM": (AUTOMATIC,),
}


def split_sampler_name(name: str) -> tuple[str, str | None]:
    """Split a legacy combined name ("DPM++ 2M Karras") into (sampler, schedule type).

    Returns the schedule type as None when the name carries none.
    """
    for schedule in (KARRAS, EXPONENTIAL):
        suffix = " " + schedule
        if name.endswith(suffix) and name[: -len(suffix)] in SAMPLERS:
            return name[: -len(suffix)], schedule
    return name, None


def allowed_sampler_names() -> list[str]:
    """Every name a batch file may use, combined legacy names included."""
    names: list[str] = []
    for sampler, schedules in SAMPLERS.items():
        names.append(sampler)
        names.extend(f"{sampler} {s}" for s in schedules if s != AUTOMATIC)
    return names
