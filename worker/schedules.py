"""A1111's sigma schedules (v1.10, modules/sd_schedulers.py, on k-diffusion's discretisation of the
model's training sigmas), built here so that every k-diffusion sampler runs every schedule type on
the same sigmas as A1111, whatever the model folder's scheduler config says.

numpy and scipy only: this module is imported where schedulers are made, in the render child.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

import numpy as np
from numpy.typing import NDArray

from sdfarm.samplers import (
    ALIGN_YOUR_STEPS,
    BETA,
    BETA_ALPHA,
    BETA_BETA,
    DDIM_SCHEDULE,
    EXPONENTIAL,
    KARRAS,
    KL_OPTIMAL,
    NORMAL,
    POLYEXPONENTIAL,
    SGM_UNIFORM,
    SIMPLE,
    UNIFORM,
)

Array = NDArray[np.float64]

# NVIDIA's Align Your Steps sigmas for 10 steps (research.nvidia.com/labs/toronto-ai/AlignYourSteps)
AYS_SD15: Final = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL: Final = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)
KARRAS_RHO: Final = 7.0
POLYEXPONENTIAL_RHO: Final = 1.0


def training_sigmas(alphas_cumprod: object) -> Array:
    """The model's sigmas at its training timesteps 0..T-1, ascending: sqrt((1 - a) / a)."""
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.sqrt((1 - a) / a)


def t_to_sigma(t: Array, sigmas: Array) -> Array:
    """k-diffusion's DiscreteSchedule.t_to_sigma: log-sigma interpolated between integer timesteps."""
    low, high = np.floor(t).astype(int), np.ceil(t).astype(int)
    w = t - low
    logs = np.log(sigmas)
    interpolated: Array = np.exp((1 - w) * logs[low] + w * logs[high])
    return interpolated


def sigma_to_t(sigma: float, sigmas: Array) -> float:
    """k-diffusion's DiscreteSchedule.sigma_to_t: the (fractional) timestep of a sigma."""
    logs = np.log(sigmas)
    log_sigma = math.log(sigma)
    low = int(np.clip(np.count_nonzero(log_sigma - logs >= 0) - 1, 0, len(logs) - 2))
    w = float(np.clip((logs[low] - log_sigma) / (logs[low] - logs[low + 1]), 0, 1))
    return (1 - w) * low + w * (low + 1)


def _zero(body: Array) -> Array:
    return np.append(body, 0.0)


def _uniform(n: int, s: Array, _sdxl: bool) -> Array:
    # k-diffusion DiscreteSchedule.get_sigmas; A1111's Normal is the same (sigma_to_t of the model's
    # sigma_max and sigma_min are T-1 and 0)
    return _zero(t_to_sigma(np.linspace(len(s) - 1, 0, n), s))


def _sgm_uniform(n: int, s: Array, _sdxl: bool) -> Array:
    return _zero(t_to_sigma(np.linspace(len(s) - 1, 0, n + 1)[:-1], s))


def _karras(n: int, s: Array, _sdxl: bool) -> Array:
    # k_diffusion/sampling.py, get_sigmas_karras
    lo, hi = s[0] ** (1 / KARRAS_RHO), s[-1] ** (1 / KARRAS_RHO)
    return _zero((hi + np.linspace(0, 1, n) * (lo - hi)) ** KARRAS_RHO)


def _exponential(n: int, s: Array, _sdxl: bool) -> Array:
    # get_sigmas_exponential
    return _zero(np.exp(np.linspace(math.log(s[-1]), math.log(s[0]), n)))


def _polyexponential(n: int, s: Array, _sdxl: bool) -> Array:
    # get_sigmas_polyexponential, A1111's default rho 1
    ramp = np.linspace(1, 0, n) ** POLYEXPONENTIAL_RHO
    return _zero(np.exp(ramp * (math.log(s[-1]) - math.log(s[0])) + math.log(s[0])))


def _kl_optimal(n: int, s: Array, _sdxl: bool) -> Array:
    # sd_schedulers.py, kl_optimal: n + 1 sigmas, the last sigma_min (not 0)
    i = np.arange(n + 1) / n
    return np.tan(i * math.atan(s[0]) + (1 - i) * math.atan(s[-1]))


def _align_your_steps(n: int, _s: Array, sdxl: bool) -> Array:
    # get_align_your_steps_sigmas: the 11 published sigmas, log-linearly resampled to n
    table = np.array(AYS_SDXL if sdxl else AYS_SD15)
    if n == len(table):
        return _zero(table)
    ys = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(table)), np.log(table[::-1]))
    return _zero(np.exp(ys)[::-1])


def _simple(n: int, s: Array, _sdxl: bool) -> Array:
    step = len(s) / n
    return _zero(np.array([s[-(1 + int(x * step))] for x in range(n)]))


def _ddim(n: int, s: Array, _sdxl: bool) -> Array:
    # every (T // n)-th training sigma from index 1: more than n when n does not divide T (30 -> 31)
    return _zero(s[1::max(len(s) // n, 1)][::-1])


def _beta(n: int, s: Array, _sdxl: bool) -> Array:
    # beta_scheduler ("Beta Sampling is All You Need", arXiv:2407.12173)
    from scipy import stats

    x = stats.beta.ppf(1 - np.linspace(0, 1, n), BETA_ALPHA, BETA_BETA)
    return _zero(s[0] + x * (s[-1] - s[0]))


_FORMULAS: Final[dict[str, Callable[[int, Array, bool], Array]]] = {
    UNIFORM: _uniform, NORMAL: _uniform, SGM_UNIFORM: _sgm_uniform, KARRAS: _karras, EXPONENTIAL: _exponential,
    POLYEXPONENTIAL: _polyexponential, KL_OPTIMAL: _kl_optimal, ALIGN_YOUR_STEPS: _align_your_steps,
    SIMPLE: _simple, DDIM_SCHEDULE: _ddim, BETA: _beta}


def a1111_sigmas(schedule: str, steps: int, sigmas: Array, *, sdxl: bool = False,
                 discard_penultimate: bool = False) -> Array:
    """The sigmas A1111 samples `steps` steps over (sd_samplers_kdiffusion.py, KDiffusionSampler.get_sigmas),
    the last one included (0, or sigma_min for KL Optimal). discard_penultimate: the samplers that drop
    the next-to-last sigma of a schedule one step longer (DPM2, DPM2 a, DPM++ 3M SDE)."""
    full = _FORMULAS[schedule](steps + 1 if discard_penultimate else steps, sigmas, sdxl)
    if discard_penultimate:
        full = np.concatenate([full[:-2], full[-1:]])
    return full
