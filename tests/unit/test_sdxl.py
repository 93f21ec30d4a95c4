"""SDXL: the tiny SDXL-architecture model renders every feature the way it should (CPU).

Two text encoders of different widths, the pooled embedding and size conditioning, A1111 prompt
chunking and emphasis per encoder, LoRAs in both layouts, SDXL embeddings (clip_l + clip_g),
hires fix, inpainting, and registered VAEs (a diffusers folder and an original single file)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdfarm.errors import AssetError
from sdfarm.jobs import RenderJob
from sdfarm.models import HashCache, Registry, parse_assets, parse_registry
from tests.conftest import SDXL
from tests.ldm import vae_to_ldm, write_single_file
from worker.assets import AssetFiles
from worker.pipeline import LoadedModel, load_model
from worker.prompts import chunk_prompt, encode_prompts
from worker.render import render
from worker.testing import write_tiny_embedding

FOX = "a red fox in snow"


@pytest.fixture(scope="module")
def loaded(registry: Registry) -> LoadedModel:
    return load_model(registry, SDXL, "cpu")


@pytest.fixture(scope="module")
def assets(registry: Registry, tiny_sdxl: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> AssetFiles:
    """The session's SDXL files plus: the xl-vae folder's weights as an original (LDM) single file,
    and an SD 1.x embedding wrongly registered as SDXL."""
    folder = tmp_path_factory.mktemp("sdxl-extra")
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(tiny_sdxl["xl-vae"]))
    save_file({k: v.contiguous() for k, v in vae_to_ldm(vae.state_dict(), dict(vae.config)).items()},
              str(folder / "xl-vae-ldm.safetensors"))
    write_tiny_embedding(folder / "sd1.safetensors", seed=4)
    text = (f"loras:\n  xl-detail: {{file: {tiny_sdxl['xl-detail']}, family: sdxl}}\n"
            f"  xl-grain: {{file: {tiny_sdxl['xl-grain']}, family: sdxl}}\n"
            f"embeddings:\n  xl-sparkle: {{file: {tiny_sdxl['xl-sparkle']}, family: sdxl}}\n"
            f"  sd1-only: {{file: {folder / 'sd1.safetensors'}, family: sdxl}}\n"
            f"vaes:\n  xl-vae: {{path: {tiny_sdxl['xl-vae']}, family: sdxl}}\n"
            f"  xl-vae-ldm: {{file: {folder / 'xl-vae-ldm.safetensors'}, family: sdxl}}\n")
    reg = Registry({}, HashCache(folder), parse_assets(text, "t", folder))
    return AssetFiles(reg, None, folder)


def identity(assets: AssetFiles, kind: Any, name: str) -> str:
    return assets.registry.asset_identity(kind, name)


def make(loaded: LoadedModel, assets: AssetFiles, loras: dict[str, float] | None = None,
         embeddings: tuple[str, ...] = (), vae: str | None = None, **changes: Any) -> RenderJob:
    base: dict[str, Any] = {
        "model": SDXL, "model_hash": loaded.identity, "prompt": FOX, "seed": 11, "width": 64, "height": 64,
        "steps": 4, "sampler": "Euler",
        "loras": [{"name": n, "weight": w, "sha256": identity(assets, "lora", n)} for n, w in (loras or {}).items()],
        "embeddings": [{"name": n, "sha256": identity(assets, "embedding", n)} for n in embeddings]}
    if vae:
        base["vae"] = {"name": vae, "sha256": identity(assets, "vae", vae)}
    return RenderJob.model_validate({**base, **changes})


def run(loaded: LoadedModel, assets: AssetFiles, *jobs: RenderJob, **kwargs: Any) -> list[np.ndarray]:
    """What the worker does for a chunk: fetch and verify files, switch adapters and VAE, render."""
    files = assets.for_jobs(jobs)
    loaded.adapters.activate(jobs[0].loras, tuple({e for j in jobs for e in j.embeddings}), files)
    loaded.use_vae(jobs[0].vae, files)
    return [np.asarray(img.convert("RGB")).astype(np.int16) for img in render(loaded, list(jobs), **kwargs)]


def diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


# ------------------------------------------------------------------ the pipeline


def test_sdxl_renders_with_its_size_conditioning_the_same_on_two_runs(loaded: LoadedModel,
                                                                       assets: AssetFiles) -> None:
    seen: list[torch.Tensor] = []

    def grab(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        seen.append(kwargs["added_cond_kwargs"]["time_ids"])

    handle = loaded.pipe.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        tall, = run(loaded, assets, make(loaded, assets, width=64, height=96))
    finally:
        handle.remove()
    assert tall.shape == (96, 64, 3)
    # SDXL's micro-conditioning: original size, crop top-left, target size, each (height, width)
    assert seen[0][0].tolist() == [96.0, 64.0, 0.0, 0.0, 96.0, 64.0]
    job = make(loaded, assets)
    first, = run(loaded, assets, job)
    second, = run(loaded, assets, job)
    _, inside = run(loaded, assets, make(loaded, assets, seed=3, prompt="a lighthouse"), job)
    assert diff(first, second) == 0
    assert diff(first, inside) <= 2  # a job's image does not depend on its chunk
    skipped, = run(loaded, assets, make(loaded, assets, clip_skip=2))
    assert diff(first, skipped) == 0  # SDXL ignores clip skip, as A1111 does


def test_an_sdxl_single_file_checkpoint_loads_offline_and_renders_the_same(
        loaded: LoadedModel, assets: AssetFiles, tiny_sdxl: dict[str, Path], tmp_path: Path) -> None:
    ckpt = write_single_file(loaded.pipe, tmp_path / "tiny-xl-single.safetensors")  # SGM keys, as Civitai files
    text = f"models:\n  xl-single:\n    file: {ckpt}\n    config: {tiny_sdxl['model']}\n    family: sdxl\n"
    single = load_model(Registry(parse_registry(text, "test", tmp_path), HashCache(tmp_path)), "xl-single", "cpu")
    assert single.identity == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    job = make(loaded, assets, hires={"scale": 2, "steps": 2, "denoising_strength": 0.5})
    from_folder, = run(loaded, assets, job)
    from_file, = run(single, assets, job.model_copy(update={"model": "xl-single", "model_hash": single.identity}))
    assert np.abs(from_folder - from_file).max() <= 1


def test_plain_prompts_encode_exactly_as_diffusers_sdxl_does(loaded: LoadedModel) -> None:
    pipe = loaded.pipe
    with torch.inference_mode():
        ours = encode_prompts(pipe, [FOX, "a lighthouse"], ["blurry", "ugly, dark"], clip_skip=1)
        theirs = pipe.encode_prompt([FOX, "a lighthouse"], negative_prompt=["blurry", "ugly, dark"],
                                    device=pipe.device, do_classifier_free_guidance=True)
    assert ours.prompt_embeds.shape == (2, 77, 32 + 48)  # CLIP-L and OpenCLIP-G side by side
    assert ours.pooled_prompt_embeds is not None
    assert ours.pooled_prompt_embeds.shape == (2, 48)
    for mine, reference in zip(ours[:4], theirs, strict=True):  # the tensors, not the lengths
        torch.testing.assert_close(mine, reference)
    with torch.inference_mode():  # an empty negative is zeros, as diffusers' force_zeros_for_empty_prompt
        ours = encode_prompts(pipe, [FOX, FOX], ["", "blurry"], clip_skip=1)
        theirs = pipe.encode_prompt(FOX, device=pipe.device, do_classifier_free_guidance=True)
    torch.testing.assert_close(ours.negative_prompt_embeds[:1], theirs[1])
    torch.testing.assert_close(ours.negative_pooled_prompt_embeds[:1], theirs[3])
    assert ours.negative_prompt_embeds[0].abs().max() == 0
    assert ours.negative_prompt_embeds[1].abs().max() > 0  # a chunk-mate's negative is its own


def test_a_weighted_token_changes_both_encoders_at_its_own_positions_only(loaded: LoadedModel) -> None:
    pipe = loaded.pipe
    with torch.inference_mode():
        plain = encode_prompts(pipe, ["a fox in snow"], [""], 1)
        weighted = encode_prompts(pipe, ["a (fox:1.5) in snow"], [""], 1)
    fox = {p for p, w in enumerate(chunk_prompt(pipe, "a (fox:1.5) in snow")[0].weights) if w != 1.0}
    assert len(fox) == 3  # f, o, x</w>: the tiny vocabulary has no merges
    for width in (slice(0, 32), slice(32, 80)):  # CLIP-L, then OpenCLIP-G
        a, b = plain.prompt_embeds[0, :, width], weighted.prompt_embeds[0, :, width]
        ratio = (b / a).nan_to_num(nan=1.0)
        others = [p for p in range(77) if p not in fox]
        rescale = ratio[others].flatten()  # the mean restore scales every position alike
        torch.testing.assert_close(rescale, torch.full_like(rescale, rescale[0].item()), rtol=1e-3, atol=1e-3)
        for p in fox:
            assert not torch.allclose(ratio[p], rescale[:1].expand_as(ratio[p]), rtol=1e-3, atol=1e-3)
    # the pooled embedding is the unweighted text's, as in A1111
    assert weighted.pooled_prompt_embeds is not None
    assert plain.pooled_prompt_embeds is not None
    torch.testing.assert_close(weighted.pooled_prompt_embeds, plain.pooled_prompt_embeds)


def test_words_after_the_77th_token_change_an_sdxl_image(loaded: LoadedModel, assets: AssetFiles) -> None:
    head = ("red_fox_in_snow," * 5)[:80]
    dawn, dusk = run(loaded, assets, *(make(loaded, assets, prompt=head + tail) for tail in (" at dawn", " at dusk")))
    assert diff(dawn, dusk) > 0


# ------------------------------------------------------------------ LoRAs and embeddings


def test_sdxl_loras_weight_zero_is_none_one_changes_both_layouts_load(loaded: LoadedModel,
                                                                      assets: AssetFiles) -> None:
    none, = run(loaded, assets, make(loaded, assets))
    zero, = run(loaded, assets, make(loaded, assets, {"xl-detail": 0.0}))
    one, = run(loaded, assets, make(loaded, assets, {"xl-detail": 1.0}))
    kohya, = run(loaded, assets, make(loaded, assets, {"xl-grain": 1.0}))
    both, = run(loaded, assets, make(loaded, assets, {"xl-detail": 1.0, "xl-grain": 1.0}))
    off, = run(loaded, assets, make(loaded, assets))
    assert diff(zero, none) == 0
    assert diff(one, none) > 10
    assert diff(kohya, none) > 10  # kohya keys for both text encoders (lora_te1_, lora_te2_) and the UNet
    assert diff(both, one) > 10
    assert diff(both, kohya) > 10
    assert diff(off, none) == 0


def test_an_sdxl_embedding_changes_the_image_and_an_sd1_file_fails_clearly(loaded: LoadedModel,
                                                                           assets: AssetFiles) -> None:
    plain, = run(loaded, assets, make(loaded, assets, prompt="a fox, xl-sparkle"))
    named, = run(loaded, assets, make(loaded, assets, embeddings=("xl-sparkle",), prompt="a fox, xl-sparkle"))
    upper, = run(loaded, assets, make(loaded, assets, embeddings=("xl-sparkle",), prompt="a fox, XL-Sparkle"))
    assert diff(named, plain) > 0
    assert diff(named, upper) == 0
    with pytest.raises(AssetError, match=r"embedding 'sd1-only': .*holds clip_l and clip_g, this one emb_params"):
        run(loaded, assets, make(loaded, assets, embeddings=("sd1-only",), prompt="a fox, sd1-only"))
    assert not [t for tok in (loaded.pipe.tokenizer, loaded.pipe.tokenizer_2) for t in tok.get_added_vocab()
                if t.startswith("sd1-only")]  # nothing half-loaded stays behind


# ------------------------------------------------------------------ hires, inpainting, VAEs


def test_sdxl_hires_fix_renders_the_final_size(loaded: LoadedModel, assets: AssetFiles) -> None:
    job = make(loaded, assets, {"xl-detail": 0.6}, hires={"scale": 2, "steps": 2, "denoising_strength": 0.5})
    image, = run(loaded, assets, job)
    assert image.shape == (128, 128, 3)


def test_sdxl_inpainting_keeps_the_pixels_outside_the_mask(loaded: LoadedModel, assets: AssetFiles) -> None:
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    ref = {"key": "inputs/x.png", "sha256": "1" * 64, "width": 64, "height": 64}
    job = make(loaded, assets, init_image=ref, mask_image={**ref, "sha256": "2" * 64}, mask_blur=0, strength=0.9)
    image, = run(loaded, assets, job, inputs={job.id: (init, Image.fromarray(mask))})
    outside = mask == 0
    assert diff(image[outside], np.asarray(init).astype(np.int16)[outside]) <= 2
    assert diff(image[~outside], np.asarray(init).astype(np.int16)[~outside]) > 10


def test_a_registered_vae_replaces_the_models_own_in_both_file_layouts(loaded: LoadedModel,
                                                                       assets: AssetFiles) -> None:
    own, = run(loaded, assets, make(loaded, assets))
    folder, = run(loaded, assets, make(loaded, assets, vae="xl-vae"))
    single, = run(loaded, assets, make(loaded, assets, vae="xl-vae-ldm"))
    own_again, = run(loaded, assets, make(loaded, assets))
    img2img = make(loaded, assets, vae="xl-vae", init_image={"key": "inputs/x.png", "sha256": "1" * 64,
                                                              "width": 64, "height": 64})
    run(loaded, assets, img2img, inputs={img2img.id: (Image.new("RGB", (64, 64), "gray"), None)})
    assert loaded.variant("img2img").vae is loaded.pipe.vae  # every mode's pipeline decodes with the job's VAE
    assert diff(folder, own) > 10
    assert diff(single, folder) == 0  # the original (LDM) layout of the same weights
    assert diff(own_again, own) == 0


def test_a_vae_that_does_not_fit_fails_the_job_clearly(loaded: LoadedModel, tmp_path: Path,
                                                       assets: AssetFiles) -> None:
    path = tmp_path / "wrong.safetensors"
    save_file({"decoder.up_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, str(path))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    from sdfarm.jobs import AssetRef

    with pytest.raises(AssetError, match=r"vae 'wrong': cannot load wrong\.safetensors: RuntimeError: .*state_dict"):
        loaded.use_vae(AssetRef(name="wrong", sha256=sha), {sha: path})
