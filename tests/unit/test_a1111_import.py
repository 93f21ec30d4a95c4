"""A1111 images in: PNGs whose infotext A1111 or sdfarm wrote submit as jobs; a job survives the round
trip job -> PNG -> infotext -> job with its id; what cannot be rendered as A1111 did is refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdfarm.batchfile import plan_batch, stream_file
from sdfarm.errors import BatchInvalid
from sdfarm.jobs import RenderJob
from sdfarm.models import Registry, a1111_lora_hash
from worker.encode import encode_png

TINY = "tiny-sd15"


def png(path: Path, parameters: str | None) -> Path:
    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    Image.new("RGB", (8, 8), "gray").save(path, pnginfo=info)
    return path


def refused(path: Path, registry: Registry, cpu_noise: bool = False) -> list[str]:
    with pytest.raises(BatchInvalid) as e:
        stream_file(path, registry, 100, cpu_noise=cpu_noise).plan()
    return [str(p) for p in e.value.problems]


def test_a_png_in_a1111s_own_format_submits_as_its_job(tmp_path: Path, registry: Registry) -> None:
    short = registry.identity(TINY)[:10]
    text = ("a lighthouse at dusk, (storm:1.2)\n"
            "Negative prompt: blurry\n"
            f"Steps: 12, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 64x96, "
            f"Model hash: {short}, Model: {TINY}, Denoising strength: 0.45, Clip skip: 2, RNG: CPU, Hires upscale: 2, "
            "Hires steps: 5, Hires upscaler: Latent, Version: v1.10.1")
    job, = stream_file(png(tmp_path / "00001-1234.png", text), registry, 100).plan().jobs
    assert (job.prompt, job.negative_prompt, job.steps, job.sampler, job.schedule_type) == (
        "a lighthouse at dusk, (storm:1.2)", "blurry", 12, "DPM++ 2M", "Karras")
    assert (job.guidance_scale, job.seed, job.width, job.height, job.clip_skip, job.model) == (
        6.5, 1234, 64, 96, 2, TINY)
    assert job.hires is not None
    assert (job.hires.scale, job.hires.steps, job.hires.upscaler, job.hires.denoising_strength) == (
        2, 5, "Latent", 0.45)


def test_a_job_survives_the_round_trip_through_its_png(tmp_path: Path, registry: Registry) -> None:
    batch = f"""
items:
  - model: {TINY}
    prompt: "a (red:1.3) fox, tiny-sparkle <lora:tiny-grain:0.7>"
    negative_prompt: "snow, [blurry]"
    seed: 77
    steps: 9
    guidance_scale: 5.5
    width: 64
    height: 80
    sampler: Euler
    schedule_type: Exponential
    clip_skip: 2
    hires: {{scale: 1.5, steps: 3, denoising_strength: 0.6, upscaler: "Latent (bicubic)"}}
    upscale: {{factor: 2, upscaler: tiny-esrgan}}
"""
    lora_file = registry.asset("lora", "tiny-grain").file
    assert lora_file is not None
    assert_round_trip(batch, registry, tmp_path, lambda job: {job.loras[0].sha256: a1111_lora_hash(lora_file)})


def assert_round_trip(batch: str, registry: Registry, tmp_path: Path,
                      lora_hashes: Callable[[RenderJob], dict[str, str]] | None = None) -> None:
    """The batch's one job -> its PNG (as the worker encodes it) -> submitted back: the same job, same id."""
    job, = plan_batch(batch, "b.yaml", "yaml", registry, 10).jobs
    encoded = encode_png(Image.new("RGB", job.output_size), job, registry.identity(TINY)[:10],
                         lora_hashes(job) if lora_hashes else None)
    (tmp_path / "out.png").write_bytes(encoded.png)
    back, = stream_file(tmp_path / "out.png", registry, 10).plan().jobs
    assert back == job
    assert back.id == job.id


def test_a_folder_is_one_job_per_png_and_every_refusal_names_its_image_and_field(
        tmp_path: Path, registry: Registry) -> None:
    short = registry.identity(TINY)[:10]
    line = f"Steps: 4, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, Model hash: {short}, Model: {TINY}"
    folder = tmp_path / "from-a1111"
    folder.mkdir()
    png(folder / "a.png", f"a cat\n{line}, RNG: CPU")
    png(folder / "b.png", f"a dog\n{line}")  # no RNG: A1111's GPU noise
    png(folder / "c.png", "a bird\nSteps: 4, Sampler: Euler, Seed: 2, Size: 64x64, Model hash: 0123456789,"
        " Model: other, Hires prompt: a hawk, Hires steps: 5, Denoising strength: 0.5, RNG: CPU, Vision: x")
    png(folder / "d.png", None)
    (folder / "e.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not an image: not read")
    assert refused(folder, registry) == [
        f"{folder}/b.png: RNG: no RNG field, which A1111 reads as GPU: sdfarm draws each image's noise on the CPU"
        " (A1111's RNG: CPU); pass --cpu-noise to render it with CPU noise (same settings and seed, other noise)",
        f"{folder}/c.png: Hires prompt: a hires field without `Hires upscale` or `Hires resize`",
        f"{folder}/c.png: Hires steps: a hires field without `Hires upscale` or `Hires resize`",
        f"{folder}/c.png: Denoising strength: an img2img or inpainting image (no hires fields): its init image is"
        " not in the infotext; submit it as a batch item with init_image",
        f"{folder}/c.png: Model hash: '0123456789' ('other') is no registered model's (registered: "
        + ", ".join(registry.names()) + ")",
        f"{folder}/c.png: Vision: 'x': sdfarm cannot render this as A1111 did (not supported)",
        f"{folder}/d.png: holds no A1111 `parameters` text (an image A1111 or sdfarm saved, with its infotext)",
        f"{folder}/e.png: is not a PNG image",
    ]
    for bad in ("c.png", "d.png", "e.png"):
        (folder / bad).unlink()
    plan = stream_file(folder, registry, 100, cpu_noise=True).plan()
    assert [j.prompt for j in plan.jobs] == ["a cat", "a dog"]
    assert plan.name == "from-a1111"


def test_hashes_must_be_the_registered_files(tmp_path: Path, registry: Registry) -> None:
    short = registry.identity(TINY)[:10]
    text = (f"a fox tiny-sparkle <lora:tiny-grain:1>\nSteps: 4, Sampler: Euler, Seed: 1, Size: 64x64, "
            f"Model hash: {short}, Model: {TINY}, RNG: CPU, Lora hashes: \"tiny-grain: 000000000000\", "
            "TI hashes: \"tiny-sparkle: 111111111111, nobody: 222222222222\"")
    path = png(tmp_path / "x.png", text)
    assert refused(path, registry) == [
        f"{path}: TI hashes: embedding 'tiny-sparkle': the image's '111111111111' is not the registered file's",
        f"{path}: TI hashes: embedding 'nobody' is not registered",
        f"{path}: Lora hashes: lora 'tiny-grain': the image's '000000000000' is not the registered file's",
    ]


def test_an_empty_folder_is_refused(tmp_path: Path, registry: Registry) -> None:
    assert refused(tmp_path, registry) == [f"{tmp_path}: holds no .png files"]


def test_a_hires_resize_size_and_sampler_come_back_as_they_were(tmp_path: Path, registry: Registry) -> None:
    short = registry.identity(TINY)[:10]
    text = (f"a fox\nSteps: 4, Sampler: Euler, Seed: 3, Size: 64x64, Model hash: {short}, Model: {TINY},"
            " Denoising strength: 0.5, RNG: CPU, Hires resize: 128x96, Hires steps: 2, Hires upscaler: Latent,"
            " Hires sampler: DPM++ 2M, Hires schedule type: Exponential, Hires CFG Scale: 4.5")
    job, = stream_file(png(tmp_path / "r.png", text), registry, 10).plan().jobs
    assert job.hires is not None
    assert (job.hires.resize_x, job.hires.resize_y, job.hires.target(64, 64)) == (128, 96, (128, 96))
    assert (job.hires.sampler, job.hires.schedule_type, job.hires.guidance_scale) == ("DPM++ 2M", "Exponential", 4.5)


def test_a_txt_of_infotexts_is_one_job_each(tmp_path: Path, registry: Registry) -> None:
    short = registry.identity(TINY)[:10]
    params = f"CFG scale: 6, Size: 64x64, Model hash: {short}, RNG: CPU"
    text = (f"a fox in snow\nNegative prompt: blurry\nSteps: 7, Sampler: Euler, Seed: 1, {params}\n\n"
            f"a hen,\non two lines, [red:blue:3]\nSteps: 5, Sampler: DPM++ 2M, Schedule type: Karras, Seed: 2,"
            f" {params}\n")
    path = tmp_path / "infotexts.txt"
    path.write_text(text)
    fox, hen = stream_file(path, registry, 100).plan().jobs
    assert (fox.prompt, fox.negative_prompt, fox.steps, fox.sampler, fox.seed) == (
        "a fox in snow", "blurry", 7, "Euler", 1)
    assert (hen.prompt, hen.steps, hen.sampler, hen.seed) == ("a hen,\non two lines, [red:blue:3]", 5, "DPM++ 2M", 2)
    # a prompt file stays one prompt a line
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\na hen\n")
    planned = stream_file(prompts, registry, 100, overrides={"model": TINY}).plan().jobs
    assert [j.prompt for j in planned] == ["a fox", "a hen"]


def test_a_txt_of_infotexts_names_the_line_of_each_refusal(tmp_path: Path, registry: Registry) -> None:
    short = registry.identity(TINY)[:10]
    path = tmp_path / "bad.txt"
    path.write_text(f"ok\nSteps: 3, Sampler: Euler, Seed: 1, Size: 64x64, Model hash: {short}, RNG: CPU\n\n"
                    f"gpu noise\nSteps: 3, Sampler: Euler, Seed: 2, Size: 64x64, Model hash: {short}\n"
                    "a prompt without its parameters\n")
    problems = refused(path, registry)
    assert problems[0].startswith(f"{path}:4: item 2: RNG: no RNG field, which A1111 reads as GPU")
    assert problems[1] == (f"{path}:6: item 3: an infotext without its parameters line (`Steps: ...`) at the end"
                           " of the file")
    assert len(problems) == 2


def test_a_job_with_the_newer_fields_survives_the_round_trip(tmp_path: Path, registry: Registry) -> None:
    # variation seed and noise size, a schedule type beyond Karras and Exponential, prompt editing and
    # AND, a hires pass resized to a size with its own sampler, schedule, CFG, prompt and negative
    batch = f"""
items:
  - model: {TINY}
    prompt: "a [red:blue:0.4] fox AND a (hen:1.2):0.6"
    negative_prompt: "[snow|fog], blurry"
    seed: 78
    steps: 12
    guidance_scale: 6.5
    width: 64
    height: 64
    sampler: DPM++ 3M SDE
    schedule_type: Beta
    subseed: 4242
    subseed_strength: 0.35
    seed_resize_from: [96, 80]
    hires: {{resize_x: 128, resize_y: 96, steps: 4, denoising_strength: 0.45, upscaler: Latent,
             sampler: DPM++ 2M SDE Heun, schedule_type: Align Your Steps, guidance_scale: 4.5,
             prompt: "a [red:blue:1.5] fox, sharp", negative_prompt: "grainy"}}
"""
    assert_round_trip(batch, registry, tmp_path)


def test_a_png_in_a1111s_format_with_schedule_rng_variation_and_hires_fields_submits(
        tmp_path: Path, registry: Registry) -> None:
    short = registry.identity(TINY)[:10]
    text = ("a castle, [day:night:0.5]\nNegative prompt: lowres\n"
            f"Steps: 20, Sampler: DPM++ SDE, Schedule type: SGM Uniform, CFG scale: 7, Seed: 1000,"
            f" Size: 64x64, Model hash: {short}, Model: {TINY}, Variation seed: 2000, Variation seed strength: 0.25,"
            " Seed resize from: 80x80, Denoising strength: 0.55, RNG: CPU, Hires upscale: 2, Hires steps: 6,"
            ' Hires upscaler: Latent (antialiased), Hires sampler: Euler a, Hires schedule type: Karras,'
            ' Hires prompt: "a castle, night", Version: v1.10.1')
    job, = stream_file(png(tmp_path / "a.png", text), registry, 10).plan().jobs
    assert (job.sampler, job.schedule_type, job.seed, job.subseed, job.subseed_strength, job.seed_resize_from) == (
        "DPM++ SDE", "SGM Uniform", 1000, 2000, 0.25, (80, 80))
    assert job.hires is not None
    assert (job.hires.scale, job.hires.steps, job.hires.upscaler, job.hires.sampler, job.hires.schedule_type,
            job.hires.prompt, job.hires.denoising_strength) == (2, 6, "Latent (antialiased)", "Euler a", "Karras",
                                                                "a castle, night", 0.55)
