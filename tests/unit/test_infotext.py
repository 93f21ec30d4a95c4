from __future__ import annotations

from sdfarm import __version__
from sdfarm.infotext import format_infotext, job_infotext, parse_infotext
from sdfarm.jobs import RenderJob

HASH = "6ce0161689" + "0" * 54


def make(**changes: object) -> RenderJob:
    base = {"model": "v1-5-pruned-emaonly", "model_hash": HASH, "prompt": "a cat", "seed": 1234, "width": 512,
            "height": 512, "steps": 30, "guidance_scale": 7, "sampler": "DPM++ 2M Karras"}
    return RenderJob.model_validate({**base, **changes})


def test_exact_a1111_layout() -> None:
    text = job_infotext(make(negative_prompt="ugly"), HASH[:10])
    assert text == (
        "a cat\n"
        "Negative prompt: ugly\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512, "
        f"Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, RNG: CPU, Version: sdfarm {__version__}"
    )


def test_negative_line_omitted_when_empty_and_clip_skip_only_above_one() -> None:
    text = job_infotext(make(sampler="Euler a"), HASH[:10])
    assert "Negative prompt" not in text
    assert "Schedule type: Uniform" in text  # A1111's Automatic for Euler a, stated
    assert "Clip skip" not in text
    assert "Clip skip: 2" in job_infotext(make(clip_skip=2), HASH[:10])


def test_values_with_commas_or_colons_are_json_quoted() -> None:
    lora = "add_detail: 7c6bad76eb54, style: abc"
    text = format_infotext("p", "", {"Steps": 1, "Sampler": "Euler", "Lora hashes": lora})
    assert text.endswith('Lora hashes: "add_detail: 7c6bad76eb54, style: abc"')
    assert parse_infotext(text)["Lora hashes"] == "add_detail: 7c6bad76eb54, style: abc"


def test_reads_back_through_a1111_rules() -> None:
    job = make(prompt="a cat,\nwith a hat: (red:1.2)", negative_prompt="blurry, ugly\nlow quality",
               guidance_scale=6.5, clip_skip=2)
    parsed = parse_infotext(job_infotext(job, HASH[:10]))
    assert parsed["Prompt"] == job.prompt
    assert parsed["Negative prompt"] == job.negative_prompt
    assert parsed["Steps"] == "30"
    assert parsed["Sampler"] == "DPM++ 2M"
    assert parsed["Schedule type"] == "Karras"
    assert parsed["CFG scale"] == "6.5"
    assert parsed["Seed"] == "1234"
    assert (parsed["Size-1"], parsed["Size-2"]) == ("512", "512")
    assert parsed["Model hash"] == "6ce0161689"
    assert parsed["Model"] == "v1-5-pruned-emaonly"
    assert parsed["Clip skip"] == "2"
    assert parsed["Version"] == f"sdfarm {__version__}"


def test_missing_clip_skip_reads_as_one() -> None:
    assert parse_infotext(job_infotext(make(), HASH[:10]))["Clip skip"] == "1"


def test_lines_are_stripped_when_read_back_as_a1111_does() -> None:
    parsed = parse_infotext("  a cat  \n  on a mat\n  Negative prompt:  ugly  \n Steps: 20, Sampler: Euler, Seed: 1")
    assert (parsed["Prompt"], parsed["Negative prompt"]) == ("a cat\non a mat", "ugly")


def test_hashes_follow_the_prompt_and_names_are_file_names() -> None:
    ref = {"sha256": "ab" * 32}
    job = make(prompt="zeta <lora:beta:0.5> then alpha-ish and alpha", negative_prompt="gamma",
               loras=[{"name": "gamma", "weight": 1, "sha256": "cd" * 32}, {"name": "beta", "weight": 0.5, **ref}],
               embeddings=[{"name": "gamma", "sha256": "ef" * 32}, {"name": "alpha", "sha256": "12" * 32},
                           {"name": "zeta", "sha256": "34" * 32}],
               vae={"name": "clear", "sha256": "56" * 32})
    parsed = parse_infotext(job_infotext(job, HASH[:10], {"ab" * 32: "0123456789ab"}, model_name="v1-5-pruned",
                                         vae_name="clear-vae.safetensors"))
    # extensions-builtin/Lora: networks in the order of the prompt's tags (fields' LoRAs are appended)
    assert parsed["Lora hashes"] == f"beta: 0123456789ab, gamma: {'cd' * 6}"
    # embeddings where the prompt, then the negative prompt, first uses them, at word boundaries only
    assert parsed["TI hashes"] == f"zeta: {'34' * 6}, alpha: {'12' * 6}, gamma: {'ef' * 6}"
    assert (parsed["Model"], parsed["VAE"], parsed["VAE hash"]) == ("v1-5-pruned", "clear-vae.safetensors", "56" * 5)
