"""A1111's refiner: a second registered model takes over the render at A1111's model call, with the
sampler's state and the latents carried on, its own conditioning, in the hires pass when there is
one; recorded as `Refiner: name [hash]` and `Refiner switch at`, and read back from A1111 images.

Where A1111 switches (modules/sd_samplers_common.py, apply_refiner, A1111's default of switching by
sigma): at the first model call whose sigma's nearest training timestep t has (999 - t) / 1000 >=
refiner_switch_at; a timestep sampler (DDIM) compares its own timestep. The model calls of a
k-diffusion sampler over sigmas s_0 .. s_n (k_diffusion/sampling.py): one at each s_i, and for Heun
a second one at s_(i+1), for DPM2 and DPM++ SDE at exp((ln s_i + ln s_(i+1)) / 2), except on a step
to sigma 0, which is an Euler step."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from sdfarm.batchfile import plan_batch, stream_file
from sdfarm.errors import AssetError, BatchInvalid, InvalidInput, WorkerFatal
from sdfarm.infotext import job_infotext, parse_infotext
from sdfarm.jobs import Chunk, ChunkEntry, RenderJob
from sdfarm.models import Registry
from tests.conftest import SD15_TWIN, SDXL, TINY, XL_REFINER, XL_TWIN
from worker.assets import AssetFiles
from worker.encode import encode_png
from worker.pipeline import LoadedModel, load_model
from worker.refiner import call_timesteps, eval_sigmas, pass_start, switch_call, use_refiner
from worker.render import render, render_split
from worker.samplers import make_scheduler
from worker.schedules import a1111_sigmas, training_sigmas

FOX = "a red fox in snow"


@pytest.fixture(scope="module")
def files(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> AssetFiles:
    return AssetFiles(registry, None, tmp_path_factory.mktemp("refiner-cache"))


@pytest.fixture(scope="module")
def sd15(registry: Registry) -> LoadedModel:
    return load_model(registry, TINY, "cpu")


@pytest.fixture(scope="module")
def sdxl(registry: Registry) -> LoadedModel:
    return load_model(registry, SDXL, "cpu")


def job(registry: Registry, model: str, refiner: str | None = None, **changes: Any) -> RenderJob:
    fields: dict[str, Any] = {"model": model, "model_hash": registry.identity(model), "prompt": FOX, "seed": 5,
                              "width": 64, "height": 64, "steps": 8, "sampler": "Euler"}
    if refiner is not None:
        fields["refiner"] = {"name": refiner, "sha256": registry.identity(refiner)}
    return RenderJob.model_validate({**fields, **changes})


@contextmanager
def counted(*unets: Any) -> Iterator[list[list[dict[str, Any]]]]:
    """Each UNet's calls, in order: their keyword arguments as the UNet got them (after its pre-hooks),
    and the timestep."""
    calls: list[list[dict[str, Any]]] = [[] for _ in unets]
    hooks = []
    for seen, unet in zip(calls, unets, strict=True):
        def grab(_m: Any, args: Any, kwargs: dict[str, Any], seen: list[dict[str, Any]] = seen) -> None:
            given = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            seen.append({"timestep": args[1] if len(args) > 1 else kwargs["timestep"], **given})
        hooks.append(unet.register_forward_pre_hook(grab, with_kwargs=True, prepend=False))
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


def rendered(loaded: LoadedModel, files: AssetFiles, j: RenderJob) -> tuple[np.ndarray, list[int]]:
    """The image, and how many calls the model's UNet and the refiner's made."""
    refiner = use_refiner(loaded, j, files)
    unets = [loaded.pipe.unet] + ([refiner.pipe.unet] if refiner else [])
    with counted(*unets) as calls:
        image = render(loaded, [j])[0]
    return np.asarray(image).astype(np.int16), [len(c) for c in calls]


def a1111_switch(sampler: str, sigmas: list[float], train: np.ndarray, switch_at: float) -> int:
    """A1111's first refiner call, restated: the sampler's call sigmas, the nearest training timestep of
    each, the first completed ratio at the switch."""
    calls = []
    for s, nxt in itertools.pairwise(sigmas):
        calls.append(s)
        if nxt > 0 and sampler == "Heun":
            calls.append(nxt)
        elif nxt > 0 and sampler in ("DPM2", "DPM++ SDE"):
            calls.append(math.exp((math.log(s) + math.log(nxt)) / 2))
    table = torch.tensor(train, dtype=torch.float32)
    for i, sigma in enumerate(calls):
        timestep = torch.argmin(torch.abs(table - sigma))
        if not (999 - timestep) / 1000 < switch_at:
            return i
    return len(calls)


# ------------------------------------------------------------------ where A1111 switches


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "Heun", "DPM2", "DPM++ SDE", "LMS"])
@pytest.mark.parametrize("switch_at", [0.2, 0.5, 0.8, 0.95])
def test_the_refiner_takes_over_at_a1111s_model_call(sd15: LoadedModel, sampler: str, switch_at: float) -> None:
    config = sd15.base_scheduler_config
    scheduler = make_scheduler(sampler, "Automatic", config, [1])
    train = training_sigmas(scheduler.alphas_cumprod)
    schedule = scheduler.a1111_schedule.schedule
    for steps, strength in ((20, None), (30, None), (20, 0.55)):
        sigmas = a1111_sigmas(schedule, steps, train, discard_penultimate=sampler == "DPM2")
        start = pass_start(steps, strength)
        expected = a1111_switch(sampler, [float(s) for s in sigmas[start:]], train, switch_at)
        assert switch_call(call_timesteps(scheduler, sampler, steps, strength), switch_at) == expected
    # DPM++ 2M (Karras), 20 steps, at 0.8: the 12th call's sigma 0.7909 is nearest timestep 285 (completed
    # 0.714), the 13th's 0.5647 is 197 (0.802): the refiner makes the last 8 calls
    if (sampler, switch_at) == ("DPM++ 2M", 0.8):
        assert switch_call(call_timesteps(scheduler, sampler, 20, None), 0.8) == 12


def test_ddim_switches_at_its_own_timesteps(sd15: LoadedModel) -> None:
    scheduler = make_scheduler("DDIM", "Automatic", sd15.base_scheduler_config)
    # A1111's DDIM at 20 steps calls the UNet at 951, 901, .., 51 (T = 1, 51, .., 951 less the first):
    # (999 - 201) / 1000 = 0.798 < 0.8 at the 16th call, (999 - 151) / 1000 = 0.848 at the 17th (index 16)
    assert switch_call(call_timesteps(scheduler, "DDIM", 20, None), 0.8) == 16


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ 3M SDE", "Heun", "DPM2",
                                     "DPM2 a", "DPM++ SDE", "LMS", "DDIM", "UniPC"])
def test_the_model_and_the_refiner_share_the_passs_calls_as_a1111_counts_them(
        registry: Registry, sd15: LoadedModel, files: AssetFiles, sampler: str) -> None:
    j = job(registry, TINY, SD15_TWIN, sampler=sampler, steps=7, refiner_switch_at=0.6)
    _, (ours, theirs) = rendered(sd15, files, j)
    scheduler = make_scheduler(sampler, j.schedule_type, sd15.base_scheduler_config, [j.seed])
    assert ours == switch_call(call_timesteps(scheduler, sampler, 7, None), 0.6)
    assert theirs > 0
    if sampler not in ("DDIM", "UniPC"):  # k-diffusion: one diffusers call per k-diffusion model call
        sigmas = scheduler.a1111_schedule.build(7, scheduler.alphas_cumprod)
        assert ours + theirs == len(eval_sigmas(sampler, sigmas))


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M", "DPM++ 3M SDE", "Heun", "DPM2", "DPM2 a",
                                     "DPM++ SDE", "LMS"])
@pytest.mark.parametrize("schedule", ["Automatic", "Karras", "DDIM"])
def test_each_model_calls_timestep_is_the_one_a1111_reads_the_switch_from(
        registry: Registry, sd15: LoadedModel, sampler: str, schedule: str) -> None:
    """The timesteps diffusers' scheduler gives the UNet, call by call, in a txt2img and an img2img pass,
    are the nearest training timesteps of the sigmas k-diffusion's sampler calls the model at (diffusers
    interpolates log sigma, A1111 takes the nearest sigma: one step apart at most)."""
    from worker.samplers import img2img_call

    with counted(sd15.pipe.unet) as (seen,):
        for strength in (None, 0.6):
            kind = {} if strength is None else {"init_image": {"key": "inputs/x.png", "sha256": "ab" * 32,
                                                               "width": 64, "height": 64}, "strength": strength}
            j = job(registry, TINY, sampler=sampler, schedule_type=schedule, steps=9, **kind)
            steps, given = (9, None) if strength is None else img2img_call(9, strength)
            scheduler = make_scheduler(sampler, j.schedule_type, sd15.base_scheduler_config, [j.seed])
            expected = call_timesteps(scheduler, sampler, steps, given)
            seen.clear()
            render(sd15, [j], {j.id: (Image.new("RGB", (64, 64), "gray"), None)} if strength else None)
            actual = [float(call["timestep"]) for call in seen]
            assert len(actual) == len(expected)
            assert all(abs(a - e) <= 1 for a, e in zip(actual, expected, strict=True)), (actual, expected)


# ------------------------------------------------------------------ what the refiner renders


@pytest.mark.parametrize("changes", [{"sampler": "DPM++ 2M"}, {"sampler": "Heun"}, {"sampler": "Euler a"},
                                     {"sampler": "DPM++ 2M SDE"}, {"sampler": "DDIM"},
                                     {"prompt": "a [red:blue:0.9] fox AND snow:0.6"}])
@pytest.mark.parametrize(("model", "twin"), [(TINY, SD15_TWIN), (SDXL, XL_TWIN)])
def test_a_refiner_with_the_models_own_weights_leaves_the_image_as_it_was(
        registry: Registry, sd15: LoadedModel, sdxl: LoadedModel, files: AssetFiles, model: str, twin: str,
        changes: dict[str, Any]) -> None:
    """The handover keeps the sampler's state (a multistep sampler's history, the noise) and the prompt
    schedule's clock: a refiner with the same weights changes nothing, though it made the last calls."""
    loaded = sd15 if model == TINY else sdxl
    plain, _ = rendered(loaded, files, job(registry, model, **changes))
    refined, (ours, theirs) = rendered(loaded, files, job(registry, model, twin, refiner_switch_at=0.5, **changes))
    assert ours > 0
    assert theirs > 0
    assert np.abs(plain - refined).max() <= 1


def test_sdxls_refiner_gets_its_own_encoder_and_aesthetic_scores(registry: Registry, sdxl: LoadedModel,
                                                               files: AssetFiles) -> None:
    j = job(registry, SDXL, XL_REFINER, negative_prompt="blurry", width=64, height=96)
    refiner = use_refiner(sdxl, j, files)
    assert refiner is not None
    with counted(sdxl.pipe.unet, refiner.pipe.unet) as (ours, theirs):
        image = render(sdxl, [j])[0]
    assert ours
    assert theirs
    assert ours[0]["encoder_hidden_states"].shape[-1] == 32 + 48  # CLIP-L and OpenCLIP-G side by side
    given = theirs[0]
    assert given["encoder_hidden_states"].shape[-1] == 48  # OpenCLIP-G alone
    assert given["added_cond_kwargs"]["text_embeds"].shape == (2, 48)
    # [uncond; cond]: original size, crop, aesthetic score (A1111's 2.5 low, 6.0 high)
    assert given["added_cond_kwargs"]["time_ids"].tolist() == [[96, 64, 0, 0, 2.5], [96, 64, 0, 0, 6.0]]
    plain = render(sdxl, [job(registry, SDXL, negative_prompt="blurry", width=64, height=96)])[0]
    assert np.abs(np.asarray(image).astype(int) - np.asarray(plain).astype(int)).max() > 0


def test_with_hires_fix_the_refiner_takes_over_in_the_hires_pass(registry: Registry, sdxl: LoadedModel,
                                                                  files: AssetFiles) -> None:
    """A1111's default: the first pass renders on the model; the hires pass hands over at its switch,
    or runs on the refiner from its first call when it starts past it."""
    hires = {"scale": 2, "steps": 6, "denoising_strength": 0.7}
    _, (ours, theirs) = rendered(sdxl, files, job(registry, SDXL, XL_REFINER, hires=hires))
    assert ours > 8  # the first pass's 8, and the hires pass's calls before the switch
    assert theirs > 0
    assert ours + theirs == 8 + 6
    _, (ours, theirs) = rendered(sdxl, files, job(registry, SDXL, XL_REFINER, refiner_switch_at=0.5,
                                                  hires={**hires, "denoising_strength": 0.3}))
    assert (ours, theirs) == (8, 6)


def test_a_job_the_refiner_would_never_take_over_or_not_from_its_start_is_refused(
        registry: Registry, sd15: LoadedModel, sdxl: LoadedModel, files: AssetFiles) -> None:
    # DDIM at 10 steps last calls the UNet at timestep 101 (completed 0.898): A1111 never switches
    with pytest.raises(InvalidInput, match=r"refiner_switch_at 0\.95 is past the last model call of the render"
                                           r" \(timestep 101, completed 0\.898\): the refiner would never take over"):
        use_refiner(sdxl, job(registry, SDXL, XL_REFINER, sampler="DDIM", steps=10, refiner_switch_at=0.95), files)
    # DDIM at 5 steps first calls it at 801 (completed 0.198): past 0.1 from the start, which SDXL's refiner
    # (img2img only) cannot render; a refiner of the model's own family renders the whole pass
    early = {"sampler": "DDIM", "steps": 5, "refiner_switch_at": 0.1}
    with pytest.raises(InvalidInput, match=r"already reached at the first model call \(timestep 801, completed"
                                           r" 0\.198\): SDXL's refiner cannot render a text-to-image pass"):
        use_refiner(sdxl, job(registry, SDXL, XL_REFINER, **early), files)
    _, (ours, theirs) = rendered(sd15, files, job(registry, TINY, SD15_TWIN, **early))
    assert (ours, theirs) == (0, 4)


def test_out_of_memory_first_lets_go_of_a_refiner_the_chunk_does_not_use(registry: Registry, sd15: LoadedModel,
                                                                          files: AssetFiles) -> None:
    use_refiner(sd15, job(registry, TINY, SD15_TWIN), files)
    sizes: list[int] = []

    def short_of_memory_while_it_is_held(loaded: LoadedModel, jobs: list[RenderJob]) -> list[int]:
        sizes.append(len(jobs))
        if loaded.refiner is not None:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [j.seed for j in jobs]

    jobs = [job(registry, TINY, seed=seed) for seed in range(4)]
    assert render_split(sd15, jobs, short_of_memory_while_it_is_held) == [0, 1, 2, 3]
    assert sizes == [4, 4]  # tried again whole, not in halves
    assert sd15.refiner is None


def test_a_refiner_whose_weights_changed_fails_the_job_clearly(registry: Registry, sd15: LoadedModel,
                                                               files: AssetFiles) -> None:
    j = job(registry, TINY).model_copy(update={"refiner": {"name": SD15_TWIN, "sha256": "ab" * 32}})
    j = RenderJob.model_validate(j.model_dump())
    with pytest.raises(AssetError, match=r"refiner 'tiny-sd15-twin' has weights .* planned with abababab"):
        use_refiner(sd15, j, files)


def test_a_worker_does_not_serve_a_refiner_as_its_model(registry: Registry) -> None:
    with pytest.raises(WorkerFatal, match=f"model {XL_REFINER!r} is an SDXL refiner: it renders only as a job's"):
        load_model(registry, XL_REFINER, "cpu")


# ------------------------------------------------------------------ the job and the batch


def test_refiner_fields_are_checked_with_their_reasons(registry: Registry) -> None:
    with pytest.raises(ValidationError, match="refiner_switch_at goes with refiner"):
        job(registry, SDXL, refiner_switch_at=0.5)
    with pytest.raises(ValidationError, match="less than 1"):
        job(registry, SDXL, XL_REFINER, refiner_switch_at=1.0)
    with pytest.raises(ValidationError, match="is the job's own model"):
        job(registry, SDXL, SDXL)
    lora = {"name": "xl-grain", "sha256": registry.asset_identity("lora", "xl-grain")}
    with pytest.raises(ValidationError, match=r"a refiner with LoRAs \(xl-grain\) is not supported"):
        job(registry, SDXL, XL_REFINER, loras=[lora])


def test_the_batch_names_a_refiner_of_the_models_family(registry: Registry) -> None:
    def item(model: str, **fields: Any) -> str:
        extra = "".join(f"\n    {k}: {v}" for k, v in fields.items())
        return f"items:\n  - model: {model}\n    prompt: a fox\n    seed: 1{extra}\n"

    j, = plan_batch(item(SDXL, refiner=XL_REFINER, refiner_switch_at=0.7), "b.yaml", "yaml", registry, 10).jobs
    assert j.refiner is not None
    assert (j.refiner.name, j.refiner.sha256, j.refiner_switch_at) == (XL_REFINER, registry.identity(XL_REFINER), 0.7)
    same = {k: getattr(j, k) for k in ("prompt", "seed", "width", "height", "steps", "sampler", "refiner_switch_at")}
    assert j.id == job(registry, SDXL, XL_REFINER, **same).id
    assert j.id != job(registry, SDXL, XL_TWIN, **same).id  # another refiner, another job
    for text, message in [
        (item(TINY, refiner=XL_REFINER), f"refiner {XL_REFINER!r} is a sdxl-refiner model; this job's model is sd15"
                                         " (allowed: tiny-broken, "),
        (item(SDXL, refiner="nope"), "unknown model 'nope'"),
        (item(XL_REFINER), f"model {XL_REFINER!r} is an SDXL refiner: it renders only as a job's refiner"),
        (item(SDXL, refiner_switch_at=0.5), "refiner_switch_at goes with refiner"),
    ]:
        with pytest.raises(BatchInvalid) as e:
            plan_batch(text, "b.yaml", "yaml", registry, 10)
        assert any(message in str(p) for p in e.value.problems), e.value.problems


def test_a_chunk_with_a_refiner_is_read_only_by_a_worker_that_has_one(registry: Registry) -> None:
    plain, refined = job(registry, SDXL), job(registry, SDXL, XL_REFINER)
    assert Chunk(batch_id="ab" * 8, entries=(ChunkEntry(index=0, job=plain),)).message()["schema_version"] == 4
    assert Chunk(batch_id="ab" * 8, entries=(ChunkEntry(index=0, job=refined),)).message()["schema_version"] == 5
    assert plain.compat_key() != refined.compat_key()


# ------------------------------------------------------------------ infotext


def test_the_infotext_records_the_refiner_as_a1111_does(registry: Registry) -> None:
    j = job(registry, SDXL, XL_REFINER, refiner_switch_at=0.65)
    info = parse_infotext(job_infotext(j, j.model_hash[:10], refiner_name="sd_xl_refiner_1.0"))
    assert info["Refiner"] == f"sd_xl_refiner_1.0 [{registry.identity(XL_REFINER)[:10]}]"
    assert info["Refiner switch at"] == "0.65"
    assert "Refiner" not in parse_infotext(job_infotext(job(registry, SDXL), j.model_hash[:10]))


def test_a_refiner_job_survives_the_round_trip_through_its_png(tmp_path: Path, registry: Registry) -> None:
    j = job(registry, SDXL, XL_REFINER, refiner_switch_at=0.7, sampler="DPM++ 2M", schedule_type="Karras")
    (tmp_path / "r.png").write_bytes(encode_png(Image.new("RGB", (64, 64)), j, j.model_hash[:10]).png)
    back, = stream_file(tmp_path / "r.png", registry, 10).plan().jobs
    assert back == j
    assert back.id == j.id


def test_an_a1111_refiner_infotext_submits_and_its_other_options_are_refused(tmp_path: Path,
                                                                              registry: Registry) -> None:
    line = (f"Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3, Size: 64x64, "
            f"Model hash: {registry.identity(SDXL)[:10]}, Model: sd_xl_base_1.0, RNG: CPU, "
            f"Refiner: sd_xl_refiner_1.0 [{registry.identity(XL_REFINER)[:10]}], Refiner switch at: 0.8")
    (tmp_path / "a.txt").write_text(f"a fox\n{line}\n")
    j, = stream_file(tmp_path / "a.txt", registry, 10).plan().jobs
    assert j.refiner is not None
    assert (j.refiner.name, j.refiner_switch_at) == (XL_REFINER, 0.8)
    (tmp_path / "b.txt").write_text(f"a fox\n{line}, Hires refiner: first pass, Refiner switch by sampling steps:"
                                    " True\n")
    with pytest.raises(BatchInvalid) as e:
        stream_file(tmp_path / "b.txt", registry, 10).plan()
    shown = "\n".join(str(p) for p in e.value.problems)
    assert "Hires refiner: 'first pass': sdfarm's refiner takes over in the hires pass only" in shown
    assert "Refiner switch by sampling steps: 'True': sdfarm switches at the sampler's sigma" in shown
    (tmp_path / "c.txt").write_text(f"a fox\n{line.split(', Refiner:')[0]}, Refiner switch at: 0.8\n")
    with pytest.raises(BatchInvalid) as e:
        stream_file(tmp_path / "c.txt", registry, 10).plan()
    assert [(p.field, p.message) for p in e.value.problems] == [
        ("Refiner switch at", "without `Refiner` (the model that takes over)")]
