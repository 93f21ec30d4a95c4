from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from sdfarm.jobs import (
    FIELD_VERSIONS,
    RENDER_CHANGES,
    RENDERS_SINCE,
    SCHEMA_VERSION,
    USER_FIELDS,
    VALUE_VERSIONS,
    Chunk,
    ChunkEntry,
    HiresFix,
    RenderJob,
    Upscale,
    make_chunks,
)

HASH = "ab" * 32
BASE = {"model": "tiny-sd15", "model_hash": HASH, "prompt": "a red fox", "seed": 7, "width": 64, "height": 64,
        "steps": 8}

# every field that affects pixels, with a different valid value
PIXEL_CHANGES = {
    "model_hash": "cd" * 32,
    "prompt": "a blue fox",
    "negative_prompt": "blurry",
    "seed": 8,
    "width": 72,
    "height": 72,
    "steps": 9,
    "guidance_scale": 6.5,
    "sampler": "Euler a",
    "schedule_type": "Exponential",
    "clip_skip": 2,
    "loras": [{"name": "add_detail", "weight": 0.5, "sha256": "ab" * 32}],
    "embeddings": [{"name": "EasyNegative", "sha256": "ef" * 32}],
    "vae": {"name": "sdxl-vae-fp16-fix", "sha256": "0e" * 32},
    "hires": {"scale": 2},
    "upscale": {"factor": 2},
}
# the same for img2img and inpainting, over a job that has an init image
INIT = {"key": "inputs/a.png", "sha256": "01" * 32, "width": 64, "height": 64}
IMG2IMG_CHANGES = {
    "init_image": {**INIT, "sha256": "02" * 32},
    "strength": 0.5,
    "mask_image": {**INIT, "sha256": "03" * 32},
    "mask_prompt": "sky",
    "mask_model": {"name": "clipseg", "sha256": "04" * 32},
    "mask_threshold": 0.6,
    "mask_dilate": 4,
    "mask_blur": 8,
    "resize_mode": "Crop and resize",
    "inpaint_fill": "latent noise",
    "inpaint_invert": True,
    "inpaint_full_res": True,
    "inpaint_full_res_padding": 16,
}
# the same for variation seeds, over a job that has one
VARIATION = {"subseed": 9, "subseed_strength": 0.5}
VARIATION_CHANGES = {"subseed": 10, "subseed_strength": 0.4, "seed_resize_from": [128, 64]}


# the same for the refiner, over a job that has one
REFINER = {"refiner": {"name": "sdxl-refiner", "sha256": "0a" * 32}}
REFINER_CHANGES = {"refiner": {"name": "sdxl-refiner", "sha256": "0b" * 32}, "refiner_switch_at": 0.7}


def job(**changes: object) -> RenderJob:
    return RenderJob.model_validate({**BASE, **changes})


def test_id_is_stable_across_processes() -> None:
    code = ("import json,sys; from sdfarm.jobs import RenderJob; "
            "print(RenderJob.model_validate(json.loads(sys.argv[1])).id)")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(BASE)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == job().id
    assert len(job().id) == 32


@pytest.mark.parametrize(("field", "value"), PIXEL_CHANGES.items())
def test_every_pixel_field_changes_the_id(field: str, value: object) -> None:
    assert job(**{field: value}).id != job().id


def test_fields_that_do_not_affect_pixels_leave_the_id() -> None:
    # the model's registry name is a label: the weights' hash is the identity
    assert job(model="renamed-model").id == job().id
    # a round trip through JSON (the task message) keeps the id
    assert RenderJob.model_validate_json(job().model_dump_json()).id == job().id


@pytest.mark.parametrize(("field", "value"), IMG2IMG_CHANGES.items())
def test_every_img2img_field_changes_the_id(field: str, value: object) -> None:
    clipseg = {"name": "clipseg", "sha256": "05" * 32}
    if field in ("mask_image", "init_image", "strength"):
        base: dict[str, object] = {"init_image": INIT}
    else:  # the mask options, over a text-masked inpainting job
        base = {"init_image": INIT, "mask_prompt": "background", "mask_model": clipseg}
    assert job(**{**base, field: value}).id != job(**base).id


def test_every_field_is_classified() -> None:
    labels = {"model", "schema_version"}
    assert set(RenderJob.model_fields) == set(PIXEL_CHANGES) | set(IMG2IMG_CHANGES) | set(VARIATION_CHANGES) \
        | set(REFINER_CHANGES) | labels | {"prompt", "seed"}


@pytest.mark.parametrize(("field", "value"), REFINER_CHANGES.items())
def test_every_refiner_field_changes_the_id(field: str, value: object) -> None:
    assert job(**{**REFINER, field: value}).id != job(**REFINER).id
    assert job(**REFINER).id != job().id


@pytest.mark.parametrize(("field", "value"), VARIATION_CHANGES.items())
def test_every_variation_field_changes_the_id(field: str, value: object) -> None:
    assert job(**{**VARIATION, field: value}).id != job(**VARIATION).id


def test_legacy_sampler_name_is_split_and_same_job() -> None:
    a = job(sampler="DPM++ 2M Karras")
    b = job(sampler="DPM++ 2M", schedule_type="Karras")
    assert (a.sampler, a.schedule_type) == ("DPM++ 2M", "Karras")
    assert a.id == b.id


def test_schedule_type_must_suit_the_sampler() -> None:
    with pytest.raises(ValidationError, match="schedule_type 'KL Optimal' does not apply to sampler 'DPM2 a'"):
        job(sampler="DPM2 a", schedule_type="KL Optimal")
    assert job(sampler="Euler a", schedule_type="Karras").schedule_type == "Karras"  # any k-diffusion sampler


def test_job_is_frozen_and_forbids_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        job().seed = 3  # type: ignore[misc]
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        job(colour="red")


def test_chunks_group_compatible_jobs_in_order() -> None:
    jobs = [job(seed=i) for i in range(5)] + [job(seed=i, steps=20) for i in range(3)]
    chunks = list(make_chunks("0" * 20, enumerate(jobs), size=2))
    assert [len(c.entries) for c in chunks] == [2, 2, 2, 1, 1]
    assert sorted(e.index for c in chunks for e in c.entries) == list(range(8))
    for c in chunks:
        assert len({e.job.compat_key() for e in c.entries}) == 1


def test_chunk_refuses_incompatible_jobs() -> None:
    entries = [{"index": 0, "job": job().model_dump()}, {"index": 1, "job": job(steps=20).model_dump()}]
    with pytest.raises(ValidationError, match="cannot share one pipeline call"):
        Chunk.model_validate({"batch_id": "0" * 20, "entries": entries})


@pytest.mark.parametrize("changes", [{}, *({k: v} for k, v in PIXEL_CHANGES.items()),
                                     {"init_image": INIT, "strength": 0.5, "mask_prompt": "background",
                                      "mask_model": {"name": "clipseg", "sha256": "05" * 32}, "mask_blur": 0},
                                     {"upscale": {"factor": 2, "upscaler": "4x-Sharp", "upscaler_sha256": "07" * 32}}])
def test_a_chunk_message_leaves_defaults_out_and_gives_back_the_same_jobs(changes: dict[str, object]) -> None:
    chunk = Chunk(batch_id="ab" * 8, entries=(ChunkEntry(index=0, job=job(**changes)),))
    message = chunk.message()
    sent = json.loads(json.dumps(message))
    back = Chunk.model_validate(sent)
    assert (back.batch_id, back.entries) == (chunk.batch_id, chunk.entries)
    assert back.entries[0].job.id == chunk.entries[0].job.id
    # the oldest version that renders it as this one does (RENDERS_SINCE)
    assert sent["schema_version"] == RENDERS_SINCE == 4
    # only what the job sets travels, and the schedule it resolved
    assert set(sent["entries"][0]["job"]) <= {*BASE, *changes, "schedule_type"}


def test_every_schema_version_after_the_first_declares_the_fields_it_added() -> None:
    added = {*FIELD_VERSIONS.values(), *(v for values in VALUE_VERSIONS.values() for v in values.values())}
    assert added | set(RENDER_CHANGES) == set(range(2, SCHEMA_VERSION + 1))
    sections = {"": RenderJob, "hires": HiresFix, "upscale": Upscale}
    for (section, fld) in [*FIELD_VERSIONS, *VALUE_VERSIONS]:
        assert fld in sections[section].model_fields


@pytest.mark.parametrize(("changes", "version"), [
    ({"subseed": 7, "subseed_strength": 0.3}, 4), ({"seed_resize_from": [72, 64]}, 4),
    ({"hires": {"scale": 2, "sampler": "Euler"}}, 4), ({"hires": {"resize_x": 96}}, 4),
    ({"sampler": "DPM++ 3M SDE"}, 4), ({"sampler": "Euler", "schedule_type": "SGM Uniform"}, 4),
    ({"sampler": "Euler", "schedule_type": "Karras"}, 4), ({"hires": {"scale": 2}}, 4)])
def test_a_message_with_what_version_4_added_names_version_4(changes: dict[str, object], version: int) -> None:
    # a version-3 worker would refuse these fields and values as malformed, and renders every job
    # otherwise (RENDER_CHANGES[4]): it hands the chunk back instead
    message = Chunk(batch_id="ab" * 8, entries=(ChunkEntry(index=0, job=job(**changes)),)).message()
    assert message["schema_version"] == version


def test_a_batch_file_may_set_every_field_the_planner_does_not_fill_in() -> None:
    # model_hash and embeddings come from the registry; schema_version is the format's
    assert set(RenderJob.model_fields) - set(USER_FIELDS) == {"model_hash", "embeddings", "schema_version"}
