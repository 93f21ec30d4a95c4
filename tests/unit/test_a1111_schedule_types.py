"""A1111's schedule types on every k-diffusion sampler, the samplers that drop the next-to-last sigma,
the DPM++ SDE variants, and the A1111 samplers refused by name. The expected sigma arrays are
computed here from A1111's formulas (modules/sd_schedulers.py, v1.10; k_diffusion/sampling.py and
external.py), not taken from sdfarm."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from scipy import stats

from sdfarm.batchfile import stream_file
from sdfarm.errors import BatchInvalid
from sdfarm.infotext import job_infotext, parse_infotext
from sdfarm.models import Registry
from sdfarm.samplers import SAMPLERS, SCHEDULE_TYPES
from tests.unit.test_a1111_schedules import SIGMAS, ZERO, exponential, job, karras, unet_timesteps, uniform
from worker.pipeline import LoadedModel, load_model
from worker.render import render
from worker.samplers import K_DIFFUSION, make_scheduler
from worker.testing import SD_SCHEDULER

SIGMA_MIN, SIGMA_MAX = float(SIGMAS[0]), float(SIGMAS[-1])


def _t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    # k_diffusion/external.py, DiscreteSchedule.t_to_sigma: log-sigma interpolated
    low, high = t.floor().long(), t.ceil().long()
    w = t - low
    return ((1 - w) * SIGMAS.log()[low] + w * SIGMAS.log()[high]).exp()


def sgm_uniform(n: int) -> torch.Tensor:
    # sd_schedulers.py, sgm_uniform: t from sigma_to_t(sigma_max) = 999 to sigma_to_t(sigma_min) = 0, n + 1
    # points, the last dropped
    return torch.cat([_t_to_sigma(torch.linspace(999, 0, n + 1, dtype=torch.float64)[:-1]), ZERO])


def polyexponential(n: int) -> torch.Tensor:
    # k_diffusion/sampling.py, get_sigmas_polyexponential, A1111's default_rho 1.0
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** 1.0
    return torch.cat([torch.exp(ramp * (math.log(SIGMA_MAX) - math.log(SIGMA_MIN)) + math.log(SIGMA_MIN)), ZERO])


def kl_optimal(n: int) -> torch.Tensor:
    # sd_schedulers.py, kl_optimal: n + 1 sigmas ending at sigma_min itself
    i = torch.arange(n + 1, dtype=torch.float64) / n
    return torch.tan(i * math.atan(SIGMA_MIN) + (1 - i) * math.atan(SIGMA_MAX))


AYS = {False: [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
       True: [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]}


def align_your_steps(n: int, sdxl: bool = False) -> torch.Tensor:
    # sd_schedulers.py, get_align_your_steps_sigmas (loglinear_interp when n is not 11)
    table = AYS[sdxl]
    if n == len(table):
        return torch.tensor([*table, 0.0], dtype=torch.float64)
    ys = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(table)), np.log(table[::-1]))
    return torch.tensor([*np.exp(ys)[::-1], 0.0], dtype=torch.float64)


def simple(n: int) -> torch.Tensor:
    # sd_schedulers.py, simple_scheduler
    ss = len(SIGMAS) / n
    return torch.tensor([float(SIGMAS[-(1 + int(x * ss))]) for x in range(n)] + [0.0], dtype=torch.float64)


def ddim(n: int) -> torch.Tensor:
    # sd_schedulers.py, ddim_scheduler: sigmas[1], sigmas[1 + ss], ... reversed
    ss, x, sigs = max(len(SIGMAS) // n, 1), 1, []
    while x < len(SIGMAS):
        sigs.append(float(SIGMAS[x]))
        x += ss
    return torch.tensor([*sigs[::-1], 0.0], dtype=torch.float64)


def beta(n: int) -> torch.Tensor:
    # sd_schedulers.py, beta_scheduler, options beta_dist_alpha = beta_dist_beta = 0.6
    ts = [stats.beta.ppf(x, 0.6, 0.6) for x in 1 - np.linspace(0, 1, n)]
    return torch.tensor([SIGMA_MIN + x * (SIGMA_MAX - SIGMA_MIN) for x in ts] + [0.0], dtype=torch.float64)


EXPECTED: dict[str, Callable[[int], torch.Tensor]] = {
    "Uniform": uniform, "Karras": karras, "Exponential": exponential, "Polyexponential": polyexponential,
    "SGM Uniform": sgm_uniform, "KL Optimal": kl_optimal, "Align Your Steps": align_your_steps, "Simple": simple,
    "Normal": uniform,  # normal_scheduler without sgm: linspace(sigma_to_t(sigma_max), sigma_to_t(sigma_min), n)
    "DDIM": ddim, "Beta": beta}


def sigmas_of(sampler: str, schedule: str, steps: int, sdxl: bool = False) -> torch.Tensor:
    scheduler = make_scheduler(sampler, schedule, SD_SCHEDULER, [1], sdxl=sdxl)
    scheduler.set_timesteps(steps)
    return torch.unique_consecutive(scheduler.sigmas.double())  # second-order samplers list inner sigmas twice


def test_every_a1111_schedule_type_is_known() -> None:
    assert set(SCHEDULE_TYPES) == {"Automatic", *EXPECTED}


@pytest.mark.parametrize("schedule", sorted(EXPECTED))
@pytest.mark.parametrize("steps", [7, 20, 30])
@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M"])
def test_every_schedule_type_gives_a1111s_sigmas(sampler: str, schedule: str, steps: int) -> None:
    got, want = sigmas_of(sampler, schedule, steps), EXPECTED[schedule](steps)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=5e-5, atol=1e-7)  # float32 in diffusers


@pytest.mark.parametrize("sampler", ["Heun", "LMS", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun"])
@pytest.mark.parametrize("schedule", ["SGM Uniform", "Align Your Steps", "DDIM", "Beta", "Simple"])
def test_second_order_and_stochastic_samplers_step_over_the_same_sigmas(sampler: str, schedule: str) -> None:
    got, want = sigmas_of(sampler, schedule, 12), EXPECTED[schedule](12)
    assert torch.allclose(got, want, rtol=5e-5, atol=1e-7)


def test_ddim_schedule_runs_more_steps_than_asked_where_a1111s_does() -> None:
    # ss = 1000 // 30 = 33: sigmas[1], [34], ... [991] are 31 of them
    assert len(sigmas_of("Euler", "DDIM", 30)) == 31 + 1
    assert len(sigmas_of("Euler", "DDIM", 20)) == 20 + 1


def test_align_your_steps_has_a_table_per_family() -> None:
    for sdxl in (False, True):
        got = sigmas_of("Euler", "Align Your Steps", 11, sdxl=sdxl)
        assert torch.allclose(got, torch.tensor([*AYS[sdxl], 0.0], dtype=torch.float64), rtol=1e-6)
        assert torch.allclose(sigmas_of("Euler", "Align Your Steps", 25, sdxl=sdxl), align_your_steps(25, sdxl),
                              rtol=5e-5)


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M", "DPM++ 3M SDE"])
def test_kl_optimal_ends_at_sigma_min_where_the_sampler_can(sampler: str) -> None:
    got = sigmas_of(sampler, "KL Optimal", 10)
    assert float(got[-1]) == pytest.approx(SIGMA_MIN, rel=5e-5)  # A1111's from float32 alphas_cumprod too
    assert float(got.min()) > 0


@pytest.mark.parametrize("sampler", ["Heun", "LMS", "DPM++ SDE", "DPM2", "DPM2 a"])
def test_kl_optimal_is_refused_where_the_scheduler_always_ends_at_zero(sampler: str) -> None:
    message = (f"schedule_type 'KL Optimal' does not apply to sampler '{sampler}': it ends at sigma_min, and"
               f" diffusers' {sampler} always ends at 0")
    with pytest.raises(ValueError, match=re.escape(message)):
        job(sampler=sampler, schedule_type="KL Optimal")


@pytest.mark.parametrize(("sampler", "schedule", "formula"), [
    ("DPM2", "Karras", karras), ("DPM2 a", "Karras", karras), ("DPM2", "Uniform", uniform),
    ("DPM++ 3M SDE", "Exponential", exponential), ("DPM2", "Beta", beta)])
@pytest.mark.parametrize("steps", [6, 20])
def test_dpm2_and_3m_sde_drop_the_next_to_last_sigma_of_a_longer_schedule(
        sampler: str, schedule: str, formula: Callable[[int], torch.Tensor], steps: int) -> None:
    # sd_samplers_kdiffusion.py: discard_next_to_last_sigma (DPM2, DPM2 a, DPM++ 3M SDE) -> get_sigmas of
    # steps + 1, then torch.cat([sigmas[:-2], sigmas[-1:]])
    longer = formula(steps + 1)
    want = torch.cat([longer[:-2], longer[-1:]])
    got = sigmas_of(sampler, schedule, steps)
    assert got.shape == want.shape == (steps + 1,)
    assert torch.allclose(got, want, rtol=5e-5, atol=1e-7)


def test_automatic_for_the_new_samplers_is_a1111s() -> None:
    # samplers_k_diffusion: DPM++ 2M SDE Heun and DPM++ 3M SDE default to exponential
    for sampler in ("DPM++ 2M SDE Heun", "DPM++ 3M SDE"):
        assert job(sampler=sampler).schedule_type == "Exponential"
    heun = make_scheduler("DPM++ 2M SDE Heun", "Exponential", SD_SCHEDULER, [1])
    three = make_scheduler("DPM++ 3M SDE", "Exponential", SD_SCHEDULER, [1])
    assert (heun.config.algorithm_type, heun.config.solver_type, heun.config.solver_order) == (
        "sde-dpmsolver++", "heun", 2)
    assert (three.config.algorithm_type, three.config.solver_order) == ("sde-dpmsolver++", 3)


@pytest.mark.parametrize("sampler", ["DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"])
def test_the_sde_samplers_noise_is_a1111s_brownian_tree_per_image(sampler: str, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    # sd_samplers_kdiffusion.py, create_noise_sampler: BrownianTreeNoiseSampler(x, sigma_min, sigma_max,
    # seed=the images' seeds) on the CPU; k_diffusion/sampling.py: BatchedBrownianTree keeps one
    # torchsde.BrownianTree per seed over [sigma_min, sigma_max], and a step from sigma to sigma_next
    # gets tree(sigma_next, sigma), signed for the step's direction, over sqrt(|sigma_next - sigma|)
    import diffusers
    import torchsde

    seen: list[torch.Tensor] = []
    original = diffusers.DPMSolverMultistepScheduler.step

    def record(self: object, output: torch.Tensor, t: object, sample: torch.Tensor, generator: object = None,
               variance_noise: torch.Tensor | None = None, return_dict: bool = True) -> object:
        assert variance_noise is not None
        seen.append(variance_noise.clone())
        return original(self, output, t, sample, generator, variance_noise, return_dict)

    monkeypatch.setattr(diffusers.DPMSolverMultistepScheduler, "step", record)
    seeds, steps = [7, 9], 5
    scheduler = make_scheduler(sampler, "Exponential", SD_SCHEDULER, seeds)
    scheduler.set_timesteps(steps)
    sample = torch.zeros((2, 4, 8, 8))
    for t in scheduler.timesteps:
        sample = scheduler.step(torch.zeros_like(sample), t, sample).prev_sample
    sigmas = [float(s) for s in scheduler.sigmas]
    low, high = min(s for s in sigmas if s > 0), max(sigmas)
    trees = [torchsde.BrownianTree(t0=torch.tensor(low), w0=torch.zeros((4, 8, 8)), t1=torch.tensor(high),
                                   entropy=seed) for seed in seeds]  # as k-diffusion builds it
    for i, noise in enumerate(seen[:-1]):  # the last step goes to sigma 0: no noise
        sigma, nxt = sigmas[i], sigmas[i + 1]
        want = torch.stack([-tree(torch.tensor(nxt), torch.tensor(sigma)) for tree in trees]) / abs(nxt - sigma) ** 0.5
        assert torch.allclose(noise, want, atol=1e-5), i
    assert not seen[-1].any()
    with pytest.raises(ValueError, match=f"{re.escape(sampler)} needs the images' seeds"):
        make_scheduler(sampler, "Exponential", SD_SCHEDULER)


@pytest.mark.parametrize(("name", "reason"), [
    ("DPM++ 2S a", "diffusers has no single-step ancestral DPM-Solver\\+\\+"),
    ("DPM++ 2S a Karras", "diffusers has no single-step ancestral DPM-Solver\\+\\+"),
    ("Restart", "diffusers has no Restart sampler"), ("DPM adaptive", "an adaptive step count"),
    ("DPM fast", "k-diffusion's fixed-order DPM-Solver"), ("DDIM CFG++", "diffusers has no CFG\\+\\+ guidance")])
def test_a1111_samplers_diffusers_lacks_are_refused_with_the_reason(name: str, reason: str) -> None:
    with pytest.raises(ValueError, match=f"sampler '{re.escape(name)}' is not supported: {reason}"):
        job(sampler=name)
    with pytest.raises(ValueError, match="is not supported"):
        job(hires={"scale": 2, "sampler": name})


def test_old_combined_names_of_any_k_diffusion_sampler_read() -> None:
    # "Euler a Karras" and "LMS Karras" appear in old infotexts
    for name, sampler, schedule in (("Euler a Karras", "Euler a", "Karras"), ("LMS Karras", "LMS", "Karras"),
                                    ("DPM2 a Exponential", "DPM2 a", "Exponential")):
        j = job(sampler=name)
        assert (j.sampler, j.schedule_type) == (sampler, schedule)


@pytest.fixture(scope="module")
def loaded(registry: Registry) -> LoadedModel:
    return load_model(registry, "tiny-sd15", "cpu")


def pixels(loaded: LoadedModel, **changes: object) -> np.ndarray:
    image, = render(loaded, [job(model_hash=loaded.identity, steps=4, **changes)])
    return np.asarray(image, dtype=np.int16)


def test_every_schedule_type_renders_and_normal_is_uniform(loaded: LoadedModel) -> None:
    images = {s: pixels(loaded, sampler="Euler", schedule_type=s) for s in EXPECTED}
    # one formula each in A1111 too: Normal without sgm is Uniform, Polyexponential at rho 1 is Exponential
    assert np.array_equal(images["Normal"], images["Uniform"])
    assert np.array_equal(images["Polyexponential"], images["Exponential"])
    distinct = {s: img for s, img in images.items() if s not in ("Normal", "Polyexponential")}
    for a in distinct:
        for b in distinct:
            if a < b:
                assert np.abs(distinct[a] - distinct[b]).max() > 0, (a, b)


@pytest.mark.parametrize("sampler", sorted(K_DIFFUSION))
def test_every_k_diffusion_sampler_renders_a_non_default_schedule(loaded: LoadedModel, sampler: str) -> None:
    schedule = "SGM Uniform" if SAMPLERS[sampler][0] != "SGM Uniform" else "Beta"
    first, again = pixels(loaded, sampler=sampler, schedule_type=schedule), pixels(
        loaded, sampler=sampler, schedule_type=schedule)
    assert np.array_equal(first, again)  # deterministic, stochastic samplers included
    assert np.abs(first - pixels(loaded, sampler=sampler)).max() > 0


def test_img2img_on_the_ddim_schedule_runs_a1111s_step_count(loaded: LoadedModel) -> None:
    # sample_img2img: sigma_sched = sigmas[steps - t_enc - 1:], over the 31 sigmas DDIM's schedule
    # makes of 30 steps: t_enc + 2 steps
    init = Image.new("RGB", (64, 64), (30, 90, 200))
    ref = {"key": "inputs/blue.png", "sha256": hashlib.sha256(init.tobytes()).hexdigest(), "width": 64, "height": 64}
    j = job(model_hash=loaded.identity, steps=30, strength=0.5, sampler="Euler", schedule_type="DDIM", init_image=ref)
    t_enc = int(0.5 * 30)
    assert len(unet_timesteps(loaded, [j], {j.id: (init, None)})) == t_enc + 2


def _png(path: Path, parameters: str) -> Path:
    info = PngInfo()
    info.add_text("parameters", parameters)
    Image.new("RGB", (8, 8), "gray").save(path, pnginfo=info)
    return path


def test_beta_is_recorded_as_a1111_records_it_and_reads_back(tmp_path: Path, registry: Registry) -> None:
    short = registry.identity("tiny-sd15")[:10]
    j = job(model_hash=registry.identity("tiny-sd15"), sampler="DPM++ 3M SDE", schedule_type="Beta", steps=9)
    text = job_infotext(j, short)
    assert "Sampler: DPM++ 3M SDE, Schedule type: Beta," in text
    info = parse_infotext(text)
    assert (info["Beta schedule alpha"], info["Beta schedule beta"]) == ("0.6", "0.6")
    back, = stream_file(_png(tmp_path / "beta.png", text), registry, 10).plan().jobs
    assert back.id == j.id
    other = text.replace("Beta schedule alpha: 0.6", "Beta schedule alpha: 0.5")
    with pytest.raises(BatchInvalid) as e:
        stream_file(_png(tmp_path / "other.png", other), registry, 10).plan()
    assert "Beta schedule alpha: '0.5': sdfarm runs the Beta schedule at A1111's default alpha 0.6" in str(e.value)


def test_dpmpp_3m_sde_takes_k_diffusions_third_order_step() -> None:
    # k_diffusion/sampling.py, sample_dpmpp_3m_sde (eta 1): in EDM space, with t = -log(sigma),
    # x' = e^(-2h) x + (1 - e^(-2h)) d + phi_2 d1 - phi_3 d2, phi_2 = expm1(-2h) / (2h) + 1,
    # phi_3 = phi_2 / (2h) - 0.5; diffusers works on x_vp = alpha x with alpha = 1 / sqrt(1 + sigma^2)
    s = make_scheduler("DPM++ 3M SDE", "Exponential", SD_SCHEDULER, [1])
    assert s.config.lower_order_final is False  # full order to the end, as k-diffusion
    s.set_timesteps(6)
    s._step_index = 3
    g = torch.Generator().manual_seed(0)
    x_vp, m2, m1, m0 = (torch.randn((1, 4, 4, 4), generator=g, dtype=torch.float64) for _ in range(4))
    sig = [float(v) for v in s.sigmas]
    got = s.multistep_dpm_solver_third_order_update([m2, m1, m0], sample=x_vp.float(), noise=torch.zeros((1, 4, 4, 4)))

    def alpha(sigma: float) -> float:
        return 1 / math.sqrt(1 + sigma * sigma)

    t = [-math.log(v) for v in sig[1:5]]  # s2, s1, s0, t
    h, h1, h2 = t[3] - t[2], t[2] - t[1], t[1] - t[0]
    x = x_vp / alpha(sig[3])
    eta_h = 2 * h
    want = math.exp(-eta_h) * x + -math.expm1(-eta_h) * m0
    r0, r1 = h1 / h, h2 / h
    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    d1, d2 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1), (d1_0 - d1_1) / (r0 + r1)
    phi_2 = math.expm1(-eta_h) / eta_h + 1
    phi_3 = phi_2 / eta_h - 0.5
    want = (want + phi_2 * d1 - phi_3 * d2) * alpha(sig[4])
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_the_brownian_tree_spans_the_whole_schedule_when_sampling_starts_late() -> None:
    # sd_samplers_kdiffusion.py, sample_img2img: create_noise_sampler(x, sigmas, p) with the whole schedule
    s = make_scheduler("DPM++ 2M SDE", "Karras", SD_SCHEDULER, [3])
    s.set_timesteps(10)
    s.set_begin_index(6)  # an img2img or hires pass that starts at step 6
    sample = torch.zeros((1, 4, 8, 8))
    s.step(torch.zeros_like(sample), s.timesteps[6], sample)
    tree = s._noise.tree.trees[0]
    assert float(tree._start) == pytest.approx(float(s.sigmas[s.sigmas > 0].min()), rel=1e-4)
    assert float(tree._end) == pytest.approx(float(s.sigmas.max()), rel=1e-4)  # 14.6, not sigma at step 6
