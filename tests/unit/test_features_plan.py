"""LoRAs, embeddings, hires fix and upscale on the producer side: fields, validation, registry
hashes, ids and the A1111 infotext. No torch needed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from sdfarm import __version__
from sdfarm.batchfile import plan_batch
from sdfarm.errors import BatchInvalid, InvalidInput
from sdfarm.infotext import job_infotext, parse_infotext
from sdfarm.inputs import Inputs
from sdfarm.jobs import RenderJob
from sdfarm.models import HashCache, Registry, parse_assets, parse_registry

SHA = "9" * 64
S3_SHA = "ab" * 32


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    (tmp_path / "detail.safetensors").write_bytes(b"detail weights")
    (tmp_path / "grain.safetensors").write_bytes(b"grain weights")
    (tmp_path / "easyneg.safetensors").write_bytes(b"embedding")
    (tmp_path / "sharp.safetensors").write_bytes(b"upscaler weights")
    text = f"""
models:
  tiny-sd15: {{hub: test/tiny, sha256: '{SHA}'}}
loras:
  add_detail: {{file: detail.safetensors}}
  FilmGrain: {{file: grain.safetensors}}
  remote: {{s3: loras/remote.safetensors, sha256: '{S3_SHA}'}}
embeddings:
  EasyNegative: {{file: easyneg.safetensors}}
upscalers:
  4x-Sharp: {{file: sharp.safetensors}}
"""
    return Registry(parse_registry(text, "r", tmp_path), HashCache(tmp_path), parse_assets(text, "r", tmp_path))


def sha_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def plan(text: str, registry: Registry, fmt: str = "yaml") -> list[RenderJob]:
    return plan_batch(text, f"b.{fmt}", fmt, registry, 1000).jobs


def problems(text: str, registry: Registry, fmt: str = "yaml") -> list[str]:
    with pytest.raises(BatchInvalid) as info:
        plan(text, registry, fmt)
    return [str(p) for p in info.value.problems]


# ------------------------------------------------------------------ LoRAs


def test_loras_from_the_field_and_from_prompt_tags_get_registry_hashes(registry: Registry) -> None:
    jobs = plan("""
defaults: {model: tiny-sd15, seed: 1}
items:
  - prompt: a cat <lora:add_detail:0.6>
  - {prompt: a dog, loras: [{name: FilmGrain, weight: 0.4}, "remote:1.2"]}
""", registry)
    assert [(x.name, x.weight, x.sha256) for x in jobs[0].loras] == [("add_detail", 0.6, sha_of(b"detail weights"))]
    assert [(x.name, x.weight, x.sha256) for x in jobs[1].loras] == [
        ("FilmGrain", 0.4, sha_of(b"grain weights")), ("remote", 1.2, S3_SHA)]


def test_a_csv_cell_lists_loras(registry: Registry) -> None:
    jobs = plan('model,prompt,seed,loras\ntiny-sd15,a cat,1,"add_detail:0.5, FilmGrain"\n', registry, "csv")
    assert [(x.name, x.weight) for x in jobs[0].loras] == [("FilmGrain", 1.0), ("add_detail", 0.5)]


def test_lora_order_and_lora_weight_belong_to_the_id(registry: Registry) -> None:
    a, b, c, d = plan("""
defaults: {model: tiny-sd15, seed: 1, prompt: a cat}
items:
  - loras: ["add_detail:0.5", "FilmGrain:1"]
  - loras: ["FilmGrain:1", "add_detail:0.5"]
  - loras: ["add_detail:0.6", "FilmGrain:1"]
  - {}
""", registry)
    assert a.id == b.id  # order does not change the image
    assert len({a.id, c.id, d.id}) == 3
    assert a.compat_key() != c.compat_key() != d.compat_key()  # different LoRA sets never share a chunk


def test_lora_problems_are_reported_with_what_is_allowed(registry: Registry) -> None:
    found = problems("""
defaults: {model: tiny-sd15, seed: 1}
items:
  - {prompt: a cat, loras: [nope]}
  - {prompt: a cat, loras: ["add_detail:9"]}
  - {prompt: a cat, loras: ["add_detail:0.5", "add_detail:0.7"]}
  - {prompt: "a cat <lora:add_detail:0.5>", loras: ["add_detail:0.8"]}
  - {prompt: "a cat <hypernet:x:1>"}
  - {prompt: "a cat <lora:add_detail:lots>"}
  - {prompt: "a (cat:1.2.3)"}
  - {prompt: "a cat <lora:add_detail:1:0.5:8>"}
  - {prompt: "a cat <lora:add_detail:te=1:dyn=8>"}
  - {prompt: "a cat <lora:add_detail:te=1:boost=2>"}
""", registry)
    assert found[0] == ("b.yaml:4: item 1: loras.0.name: unknown lora 'nope'"
                        " (allowed: FilmGrain, add_detail, remote)")
    assert "item 2: loras.0.weight: Input should be less than or equal to 5" in found[1]
    assert "item 3: loras: names a LoRA twice: add_detail" in found[2]
    assert "item 4" in found[3]
    assert "<lora:add_detail:0.5> is not in loras at that weight" in found[3]
    assert "item 5: prompt: extra network tag '<hypernet:x:1>' is not supported" in found[4]
    assert "item 6: prompt: tag '<lora:add_detail:lots>': weight 'lots' is not a number" in found[5]
    assert "item 7: prompt: bad attention weight '1.2.3' in prompt 'a (cat:1.2.3)'" in found[6]
    assert "item 8: prompt: tag '<lora:add_detail:1:0.5:8>': a dynamic dimension (dyn) is not supported" in found[7]
    assert "item 9: prompt: tag '<lora:add_detail:te=1:dyn=8>': a dynamic dimension (dyn) is not" in found[8]
    assert "item 10: prompt: tag '<lora:add_detail:te=1:boost=2>': unknown parameter 'boost'" in found[9]


def test_a_loras_text_encoder_and_unet_weights_as_a1111s_tag_gives_them(registry: Registry) -> None:
    # extensions-builtin/Lora/extra_networks_lora.py: te is the first number (default 1), unet the
    # second (default te); te= and unet= name them; <lyco:...> is the same tag
    jobs = plan("""
defaults: {model: tiny-sd15, seed: 1}
items:
  - {prompt: "a cat <lora:add_detail:0.8:0.3>"}
  - {prompt: "a cat <lyco:add_detail:unet=0.3:te=0.8>"}
  - {prompt: "a cat", loras: ["add_detail:0.8:0.3"]}
  - {prompt: "a cat", loras: [{name: add_detail, weight: 0.8, unet_weight: 0.3}]}
  - {prompt: "a cat <lora:add_detail:0.8:0.8>"}
  - {prompt: "a cat <lora:add_detail:0.8>"}
""", registry)
    assert [(j.loras[0].weight, j.loras[0].unet_weight) for j in jobs] == [(0.8, 0.3)] * 4 + [(0.8, None)] * 2
    assert jobs[0].id != jobs[1].id  # the prompts differ as text
    assert jobs[2].id == jobs[3].id
    assert jobs[4].loras == jobs[5].loras  # a UNet weight equal to the text encoder's is none
    assert job_infotext(jobs[2], SHA[:10]).startswith("a cat <lora:add_detail:0.8:0.3>\n")


# ------------------------------------------------------------------ embeddings


def test_embeddings_named_in_prompts_are_recorded_case_insensitively(registry: Registry) -> None:
    a, b, c = plan("""
defaults: {model: tiny-sd15, seed: 1}
items:
  - {prompt: a cat, negative_prompt: "EasyNegative, blurry"}
  - {prompt: "a cat, (easynegative:1.2)"}
  - {prompt: a cat}
""", registry)
    expected = [("EasyNegative", sha_of(b"embedding"))]
    assert [(e.name, e.sha256) for e in a.embeddings] == expected
    assert [(e.name, e.sha256) for e in b.embeddings] == expected
    assert c.embeddings == ()
    assert "embeddings" in problems("items: [{model: tiny-sd15, prompt: x, embeddings: []}]", registry)[0]


def test_registry_rejects_unsafe_or_ambiguous_assets(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"lora 'x': .*x\.ckpt is a pickle file"):
        parse_assets("loras:\n  x: {file: x.ckpt}\n", "r", tmp_path)
    with pytest.raises(InvalidInput, match="an s3 source needs its sha256"):
        parse_assets("loras:\n  x: {s3: loras/x.safetensors}\n", "r", tmp_path)
    with pytest.raises(InvalidInput, match=r"must not contain '\.\.'"):
        parse_assets(f"loras:\n  x: {{s3: a/../x.safetensors, sha256: '{SHA}'}}\n", "r", tmp_path)
    with pytest.raises(InvalidInput, match="two embeddings differ only in case"):
        parse_assets("embeddings:\n  Bad: {file: a.safetensors}\n  bad: {file: b.safetensors}\n", "r", tmp_path)
    with pytest.raises(InvalidInput, match="unknown section 'lora'"):
        parse_assets("lora:\n  x: {file: x.safetensors}\n", "r", tmp_path)
    with pytest.raises(InvalidInput, match=r"vae 'v': .*a VAE loads from a \.safetensors file or a diffusers folder"):
        parse_assets("vaes:\n  v: {file: v.pt, allow_pickle: true}\n", "r", tmp_path)


def test_a_local_file_that_no_longer_matches_its_registered_hash_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.safetensors").write_bytes(b"changed")
    text = f"models:\n  m: {{hub: a/b}}\nloras:\n  x: {{file: x.safetensors, sha256: '{SHA}'}}\n"
    reg = Registry(parse_registry(text, "r", tmp_path), HashCache(tmp_path), parse_assets(text, "r", tmp_path))
    found = problems("items: [{model: m, prompt: a, seed: 1, loras: [x]}]", reg)
    assert "loras.0.name: lora 'x': " in found[0]
    assert "the registry says 999999999999" in found[0]


# ------------------------------------------------------------------ hires fix and upscale


def test_hires_and_upscale_sizes_and_limits(registry: Registry) -> None:
    job, = plan("items: [{model: tiny-sd15, prompt: a, seed: 1, width: 512, height: 768,"
                " hires: {scale: 1.5, upscaler: Lanczos}, upscale: {factor: 2}}]", registry)
    assert job.rendered_size == (768, 1152)
    assert job.output_size == (1536, 2304)
    found = problems("""
defaults: {model: tiny-sd15, prompt: a, seed: 1}
items:
  - {hires: {upscaler: ESRGAN_4x}}
  - {hires: {scale: 4}, width: 2048}
  - {hires: {denoising_strength: 0}}
  - {upscale: {factor: 2, upscaler: Latent}}
""", registry)
    assert "hires.upscaler: unknown upscaler 'ESRGAN_4x' (allowed: Latent, Latent (antialiased)" in found[0]
    assert found[0].endswith("Lanczos, Nearest, 4x-Sharp)")
    assert "hires.scale 4 makes 8192x2048 (allowed: sides up to 4096)" in found[1]
    assert "hires.denoising_strength: Input should be greater than 0" in found[2]
    assert "upscale.upscaler: unknown upscaler 'Latent' (allowed: Lanczos, Nearest, 4x-Sharp)" in found[3]


def test_an_upscaler_model_is_named_by_the_registry_and_its_file_belongs_to_the_id(
        registry: Registry, tmp_path: Path) -> None:
    model, lanczos = plan("""
defaults: {model: tiny-sd15, prompt: a, seed: 1}
items:
  - {hires: {upscaler: 4x-Sharp}, upscale: {factor: 2, upscaler: 4x-Sharp}}
  - {hires: {upscaler: Lanczos}, upscale: {factor: 2, upscaler: Lanczos}}
""", registry)
    assert model.hires is not None
    assert model.upscale is not None
    assert lanczos.hires is not None
    assert model.hires.upscaler_sha256 == model.upscale.upscaler_sha256 == sha_of(b"upscaler weights")
    assert lanczos.hires.upscaler_sha256 is None
    (tmp_path / "sharp.safetensors").write_bytes(b"other upscaler weights")  # the same name, other weights
    retrained, _ = plan("""
defaults: {model: tiny-sd15, prompt: a, seed: 1}
items:
  - {hires: {upscaler: 4x-Sharp}, upscale: {factor: 2, upscaler: 4x-Sharp}}
  - {hires: {upscaler: Lanczos}, upscale: {factor: 2, upscaler: Lanczos}}
""", Registry(registry.entries, HashCache(tmp_path / "fresh"), registry.assets))
    assert retrained.id != model.id


def test_upscaler_shas_are_checked_when_a_message_is_read() -> None:
    base = {"model": "m", "model_hash": SHA, "prompt": "p", "seed": 1}
    with pytest.raises(ValueError, match=r"unknown upscaler '4x-Sharp' \(allowed: Lanczos, Nearest, or a registered"):
        RenderJob.model_validate({**base, "upscale": {"factor": 2, "upscaler": "4x-Sharp"}})
    with pytest.raises(ValueError, match="upscaler_sha256 goes with a registered upscaler model, not 'Latent'"):
        RenderJob.model_validate({**base, "hires": {"upscaler": "Latent", "upscaler_sha256": SHA}})


@pytest.mark.parametrize(("spec", "message"), [
    ("{file: x.pt, allow_pickle: true}", "an upscaler loads from a .safetensors file, or a .pth/.ckpt with"),
    ("{file: x.pth}", "x.pth is a pickle file, which can run code when loaded"),
    ("{file: x.safetensors, family: sdxl, sha256: nope}", "sha256: String should match pattern"),
])
def test_the_registry_refuses_bad_upscaler_entries(tmp_path: Path, spec: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_assets(f"upscalers:\n  4x-Sharp: {spec}\n", "r", tmp_path)


def test_an_upscaler_may_not_take_a_built_in_name(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="'Lanczos' is a built-in upscaler's name; register the model under"):
        parse_assets("upscalers:\n  Lanczos: {file: x.safetensors}\n", "r", tmp_path)
    pickled = parse_assets("upscalers:\n  RealESRGAN_x4plus: {file: x.pth, allow_pickle: true}\n", "r", tmp_path)
    assert pickled[("upscaler", "RealESRGAN_x4plus")].allow_pickle


# ------------------------------------------------------------------ infotext


def test_infotext_records_loras_embeddings_and_hires_as_a1111_does(registry: Registry) -> None:
    job, = plan("""
items:
  - model: tiny-sd15
    prompt: a cat <lora:add_detail:0.6>
    negative_prompt: EasyNegative
    loras: ["FilmGrain:0.4"]
    seed: 7
    steps: 20
    hires: {scale: 2, steps: 10, denoising_strength: 0.55, upscaler: Latent}
""", registry)
    text = job_infotext(job, SHA[:10])
    detail, grain, easy = sha_of(b"detail weights")[:12], sha_of(b"grain weights")[:12], sha_of(b"embedding")[:12]
    assert text == (
        "a cat <lora:add_detail:0.6> <lora:FilmGrain:0.4>\n"
        "Negative prompt: EasyNegative\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 7, Size: 512x512,"
        " Model hash: 9999999999, Model: tiny-sd15, Denoising strength: 0.55, RNG: CPU, Hires upscale: 2,"
        " Hires steps: 10, Hires upscaler: Latent,"
        f' Lora hashes: "add_detail: {detail}, FilmGrain: {grain}", TI hashes: "EasyNegative: {easy}",'
        f" Version: sdfarm {__version__}"
    )
    back = parse_infotext(text)
    assert back["Lora hashes"] == f"add_detail: {detail}, FilmGrain: {grain}"
    assert back["TI hashes"] == f"EasyNegative: {easy}"
    assert (back["Hires upscale"], back["Hires steps"], back["Hires upscaler"], back["Denoising strength"]) == (
        "2", "10", "Latent", "0.55")
    assert back["Size-1"] == "512"  # A1111 records the first pass's size


def test_upscale_is_recorded_as_postprocessing(registry: Registry) -> None:
    job, = plan("items: [{model: tiny-sd15, prompt: a, seed: 1, upscale: {factor: 2.5}}]", registry)
    back = parse_infotext(job_infotext(job, SHA[:10]))
    assert (back["Postprocess upscale by"], back["Postprocess upscaler"]) == ("2.5", "Lanczos")


def test_the_features_example_uses_every_feature(tmp_path: Path) -> None:
    for name in ("detail", "grain", "sparkle", "xl-detail", "xl-grain", "xl-sparkle", "esrgan"):
        (tmp_path / f"{name}.safetensors").write_bytes(name.encode())
    xl = "family: sdxl"
    text = f"""
models: {{tiny-sd15: {{hub: test/tiny, sha256: '{SHA}'}}, tiny-sdxl: {{hub: test/xl, sha256: '{S3_SHA}', {xl}}},
         tiny-xl-refiner: {{hub: test/xl-refiner, sha256: '{"cd" * 32}', family: sdxl-refiner}}}}
loras: {{tiny-detail: {{file: detail.safetensors}}, tiny-grain: {{file: grain.safetensors}},
        xl-detail: {{file: xl-detail.safetensors, {xl}}}, xl-grain: {{file: xl-grain.safetensors, {xl}}}}}
embeddings: {{tiny-sparkle: {{file: sparkle.safetensors}}, xl-sparkle: {{file: xl-sparkle.safetensors, {xl}}}}}
vaes: {{xl-vae: {{path: clipseg, {xl}}}}}
upscalers: {{tiny-esrgan: {{file: esrgan.safetensors}}}}
mask_models: {{clipseg: {{path: clipseg}}}}
"""
    (tmp_path / "clipseg").mkdir()
    (tmp_path / "clipseg" / "config.json").write_text("{}")
    reg = Registry(parse_registry(text, "r", tmp_path), HashCache(tmp_path), parse_assets(text, "r", tmp_path))
    examples = Path(__file__).resolve().parents[2] / "examples"
    path = examples / "features.yaml"
    jobs = plan_batch(path.read_text(), str(path), "yaml", reg, 1000, inputs=Inputs(None, examples / "inputs")).jobs
    assert len(jobs) == 24
    sd, xl = jobs[:21], jobs[21:]
    assert any(j.scheduled and " AND " in j.prompt for j in sd)
    assert any(j.inpaint_full_res and j.inpaint_fill == "latent noise" for j in sd)
    assert any(j.resize_mode == "Crop and resize" for j in sd)
    assert any(j.hires and j.hires.prompt for j in sd)
    assert {(j.sampler, j.schedule_type) for j in sd if j.prompt == "a paper crane on a desk"} == {
        (s, t) for s in ("DPM++ 3M SDE", "DPM2") for t in ("Align Your Steps", "SGM Uniform", "Beta")}
    assert any(j.subseed_strength == 0.5 and j.subseed == 7 for j in sd)
    assert any(lora.unet_weight == 0.3 for j in sd for lora in j.loras)
    assert all(j.embeddings for j in sd)
    assert [j.mode for j in sd[-3:]] == ["img2img", "inpaint", "inpaint"]
    assert sd[-1].mask_prompt == "sky"
    assert {lora.name for j in sd for lora in j.loras} == {"tiny-detail", "tiny-grain"}
    assert {j.model for j in xl} == {"tiny-sdxl"}
    assert [e.name for e in xl[0].embeddings] == ["xl-sparkle"]
    assert xl[0].vae is not None
    assert xl[0].hires is not None
    assert {lora.name for j in xl for lora in j.loras} == {"xl-detail", "xl-grain"}
    assert xl[1].refiner is not None
    assert (xl[1].refiner.name, xl[1].refiner_switch_at) == ("tiny-xl-refiner", 0.8)
    assert xl[2].mode == "inpaint"
    assert any(len(j.loras) == 2 for j in jobs)
    assert {j.hires.upscaler for j in jobs if j.hires} == {"Latent", "Lanczos", "tiny-esrgan"}
    assert {j.upscale.upscaler for j in jobs if j.upscale} == {"Lanczos", "tiny-esrgan"}
    assert any("BREAK" in j.prompt and "(red:1.3)" in j.prompt for j in jobs)
    assert max(len(j.prompt) for j in jobs) > 300  # well past 77 tokens
    assert {j.schedule_type for j in jobs} == {"Uniform", "Karras", "Exponential", "Align Your Steps", "SGM Uniform",
                                               "Beta"}
    assert any(j.clip_skip == 2 for j in jobs)


# ------------------------------------------------------------------ SDXL and VAEs


@pytest.fixture
def xl_registry(tmp_path: Path) -> Registry:
    for name in ("xl-lora", "sd-lora", "xl-emb", "sd-emb", "xl-vae", "sd-vae"):
        (tmp_path / f"{name}.safetensors").write_bytes(name.encode())
    text = f"""
models:
  tiny-sd15: {{hub: test/tiny, sha256: '{SHA}'}}
  tiny-sdxl: {{hub: test/tiny-xl, sha256: '{S3_SHA}', family: sdxl}}
loras:
  xl-lora: {{file: xl-lora.safetensors, family: sdxl}}
  sd-lora: {{file: sd-lora.safetensors}}
embeddings:
  xl-emb: {{file: xl-emb.safetensors, family: sdxl}}
  sd-emb: {{file: sd-emb.safetensors}}
vaes:
  xl-vae: {{file: xl-vae.safetensors, family: sdxl}}
  sd-vae: {{file: sd-vae.safetensors}}
"""
    return Registry(parse_registry(text, "r", tmp_path), HashCache(tmp_path), parse_assets(text, "r", tmp_path))


def test_loras_and_vaes_must_fit_the_models_family(xl_registry: Registry) -> None:
    found = problems("""
items:
  - {model: tiny-sdxl, prompt: a fox, seed: 1, loras: [sd-lora], vae: sd-vae}
  - {model: tiny-sd15, prompt: a fox <lora:xl-lora:0.5>, seed: 1, vae: nope}
""", xl_registry)
    assert found == [
        "b.yaml:3: item 1: loras.0.name: lora 'sd-lora' is for sd15 models; this job's model is sdxl"
        " (allowed: xl-lora)",
        "b.yaml:3: item 1: vae: vae 'sd-vae' is for sd15 models; this job's model is sdxl (allowed: xl-vae)",
        "b.yaml:4: item 2: loras.0.name: lora 'xl-lora' is for sdxl models; this job's model is sd15"
        " (allowed: sd-lora)",
        "b.yaml:4: item 2: vae: unknown vae 'nope' (allowed: sd-vae, xl-vae)",
    ]


def test_embeddings_of_the_models_family_only_and_the_vae_in_id_and_infotext(xl_registry: Registry) -> None:
    xl, xl_vae, sd = plan("""
defaults: {seed: 1, negative_prompt: "xl-emb, sd-emb"}
items:
  - {model: tiny-sdxl, prompt: a fox}
  - {model: tiny-sdxl, prompt: a fox, vae: xl-vae}
  - {model: tiny-sd15, prompt: a fox}
""", xl_registry)
    assert [e.name for e in xl.embeddings] == ["xl-emb"]  # an SD 1.x embedding's name is plain text to SDXL
    assert [e.name for e in sd.embeddings] == ["sd-emb"]
    assert xl_vae.vae is not None
    assert xl_vae.vae.sha256 == sha_of(b"xl-vae")
    assert xl_vae.id != xl.id
    assert xl_vae.compat_key() != xl.compat_key()
    back = parse_infotext(job_infotext(xl_vae, S3_SHA[:10]))
    assert (back["VAE hash"], back["VAE"]) == (sha_of(b"xl-vae")[:10], "xl-vae")
    assert "VAE" not in parse_infotext(job_infotext(xl, S3_SHA[:10]))
