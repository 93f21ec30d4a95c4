"""LoRAs, embeddings, hires fix and upscale change the image the way they should (tiny SD1.5, CPU)."""

from __future__ import annotations

import hashlib
import io
import resource
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sdfarm.errors import AssetError
from sdfarm.infotext import parse_infotext
from sdfarm.jobs import RenderJob
from sdfarm.models import HashCache, Registry, parse_assets
from worker.assets import AssetFiles
from worker.encode import encode_png
from worker.pipeline import LoadedModel, load_model
from worker.render import render
from worker.testing import write_tiny_embedding as write_embedding
from worker.testing import write_tiny_lora as write_lora

LORAS = 10  # distinct LoRA files for the swap test


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("assets")
    out = {f"l{i}": write_lora(folder / f"l{i}.safetensors", seed=i) for i in range(LORAS)}
    out["kohya"] = write_lora(folder / "kohya.safetensors", seed=99, kohya=True)
    out["Sparkle"] = write_embedding(folder / "sparkle.safetensors", seed=1, a1111=True)
    out["glow"] = write_embedding(folder / "glow.safetensors", seed=2, a1111=False)
    out["broken"] = folder / "broken.safetensors"
    out["broken"].write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    return out


@pytest.fixture(scope="module")
def loaded(registry: Registry) -> LoadedModel:
    return load_model(registry, "tiny-sd15", "cpu")  # its own pipeline: adapters do not leak out


@pytest.fixture(scope="module")
def assets(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> AssetFiles:
    text = "loras:\n" + "".join(f"  {n}: {{file: {p}}}\n" for n, p in files.items() if n.startswith(("l", "k", "b")))
    text += "embeddings:\n" + "".join(f"  {n}: {{file: {files[n]}}}\n" for n in ("Sparkle", "glow"))
    cache = tmp_path_factory.mktemp("cache")
    return AssetFiles(Registry({}, HashCache(cache), parse_assets(text, "t", cache)), None, cache)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make(loaded: LoadedModel, files: dict[str, Path], loras: dict[str, float] | None = None,
         embeddings: tuple[str, ...] = (), **changes: Any) -> RenderJob:
    base = {"model": "tiny-sd15", "model_hash": loaded.identity, "prompt": "a red fox in snow", "seed": 11,
            "width": 64, "height": 64, "steps": 4,
            "loras": [{"name": n, "weight": w, "sha256": sha(files[n])} for n, w in (loras or {}).items()],
            "embeddings": [{"name": n, "sha256": sha(files[n])} for n in embeddings]}
    return RenderJob.model_validate({**base, **changes})


def run(loaded: LoadedModel, assets: AssetFiles, *jobs: RenderJob) -> list[np.ndarray]:
    """What the worker does for a chunk: fetch and verify files, switch adapters, render."""
    paths = assets.for_jobs(jobs)
    loaded.adapters.activate(jobs[0].loras, tuple({e for j in jobs for e in j.embeddings}), paths)
    return [np.asarray(img.convert("RGB")).astype(np.int16) for img in render(loaded, list(jobs))]


def diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


# ------------------------------------------------------------------ LoRA


def test_lora_weight_zero_is_no_lora_weight_one_changes_two_combine(loaded: LoadedModel, assets: AssetFiles,
                                                                    files: dict[str, Path]) -> None:
    none, = run(loaded, assets, make(loaded, files))
    zero, = run(loaded, assets, make(loaded, files, {"l0": 0.0}))
    one, = run(loaded, assets, make(loaded, files, {"l0": 1.0}))
    other, = run(loaded, assets, make(loaded, files, {"l1": 1.0}))
    both, = run(loaded, assets, make(loaded, files, {"l0": 1.0, "l1": 1.0}))
    again, = run(loaded, assets, make(loaded, files))
    assert diff(zero, none) == 0
    assert diff(one, none) > 10
    assert diff(both, one) > 10
    assert diff(both, other) > 10
    assert diff(again, none) == 0  # switching back off leaves no trace


def test_text_encoder_and_unet_weights_apply_to_their_own_parts(loaded: LoadedModel, assets: AssetFiles,
                                                                  files: dict[str, Path]) -> None:
    def with_weights(te: float, unet: float) -> np.ndarray:
        lora = {"name": "l0", "weight": te, "unet_weight": unet, "sha256": sha(files["l0"])}
        image, = run(loaded, assets, RenderJob.model_validate({**make(loaded, files).model_dump(), "loras": [lora]}))
        return image

    none, = run(loaded, assets, make(loaded, files))
    full, = run(loaded, assets, make(loaded, files, {"l0": 1.0}))
    te_only, unet_only = with_weights(1.0, 0.0), with_weights(0.0, 1.0)
    assert diff(with_weights(1.0, 1.0), full) == 0  # one weight for both is the plain tag
    assert diff(with_weights(0.0, 0.0), none) == 0
    assert diff(te_only, none) > 0  # the text encoder's layers alone change the image
    assert diff(unet_only, none) > 10
    assert diff(te_only, full) > 10
    assert diff(unet_only, full) > 0


def test_a_kohya_layout_lora_from_a1111_loads_and_applies(loaded: LoadedModel, assets: AssetFiles,
                                                          files: dict[str, Path]) -> None:
    none, = run(loaded, assets, make(loaded, files))
    kohya, = run(loaded, assets, make(loaded, files, {"kohya": 1.0}))
    assert diff(kohya, none) > 10


def test_the_same_lora_job_gives_the_same_image_alone_and_in_a_chunk(loaded: LoadedModel, assets: AssetFiles,
                                                                      files: dict[str, Path]) -> None:
    job = make(loaded, files, {"l2": 0.8}, prompt="a lighthouse")
    alone, = run(loaded, assets, job)
    _, inside = run(loaded, assets, make(loaded, files, {"l2": 0.8}, seed=3), job)
    assert diff(alone, inside) <= 2


def test_a_failed_lora_switch_leaves_no_lora_behind(loaded: LoadedModel, assets: AssetFiles,
                                                    files: dict[str, Path]) -> None:
    none, = run(loaded, assets, make(loaded, files))
    with pytest.raises(AssetError, match=r"lora 'broken': cannot load broken\.safetensors"):
        run(loaded, assets, make(loaded, files, {"l5": 1.0, "broken": 1.0}))
    after, = run(loaded, assets, make(loaded, files))
    assert diff(after, none) == 0  # l5 loaded before broken failed: it must not stay on


def test_an_image_does_not_depend_on_a_long_prompt_in_its_chunk(loaded: LoadedModel, assets: AssetFiles,
                                                                 files: dict[str, Path]) -> None:
    short = make(loaded, files, prompt="a lighthouse")
    long = make(loaded, files, prompt="a lighthouse on a cliff, " * 8, seed=3)
    alone, = run(loaded, assets, short)
    _, inside = run(loaded, assets, long, short)
    assert diff(alone, inside) <= 2


def test_fifty_lora_swaps_keep_memory_bounded(loaded: LoadedModel, assets: AssetFiles,
                                              files: dict[str, Path]) -> None:
    """Adapters beyond `keep` are deleted, so parameters stop growing; RSS is measured too."""
    pipe = loaded.pipe

    def params() -> int:
        return sum(p.numel() for m in (pipe.unet, pipe.text_encoder) for p in m.parameters())

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    sizes, peaks = [], []
    for swap in range(50):
        run(loaded, assets, make(loaded, files, {f"l{swap % LORAS}": 1.0}, steps=1))
        sizes.append(params())
        peaks.append(rss_mb())
    held = pipe.get_list_adapters()["unet"]
    assert len(held) <= loaded.adapters.keep
    assert max(sizes[LORAS:]) == max(sizes[:LORAS])  # after the first round, nothing more is kept
    print(f"\nparameters after swaps 10/50: {sizes[LORAS - 1]}/{sizes[-1]};"
          f" peak RSS after swaps 10/50: {peaks[LORAS - 1]:.0f}/{peaks[-1]:.0f} MiB")
    assert peaks[-1] - peaks[LORAS - 1] < 100  # forty more swaps cost no more than noise


# ------------------------------------------------------------------ embeddings


@pytest.mark.parametrize("name", ["Sparkle", "glow"])  # A1111 (emb_params) and diffusers layouts
def test_an_embedding_named_in_the_prompt_changes_the_image(loaded: LoadedModel, assets: AssetFiles,
                                                            files: dict[str, Path], name: str) -> None:
    plain, = run(loaded, assets, make(loaded, files, prompt="a fox, sparkly"))
    named, = run(loaded, assets, make(loaded, files, embeddings=(name,), prompt=f"a fox, {name}"))
    lower, = run(loaded, assets, make(loaded, files, embeddings=(name,), prompt=f"a fox, {name.lower()}"))
    plain_again, = run(loaded, assets, make(loaded, files, prompt="a fox, sparkly"))
    assert diff(named, plain) > 0
    assert diff(named, lower) == 0  # names match as A1111's do: the tokenizer lower-cases prompts
    assert diff(plain_again, plain) == 0  # a loaded embedding does not touch prompts that do not name it


def test_a_file_changed_since_planning_fails_with_the_reason(tmp_path: Path, loaded: LoadedModel,
                                                             files: dict[str, Path]) -> None:
    path = write_lora(tmp_path / "x.safetensors", seed=5)
    planned = sha(path)
    text = f"loras:\n  x: {{file: {path}}}\n"
    assets = AssetFiles(Registry({}, HashCache(tmp_path), parse_assets(text, "t", tmp_path)), None, tmp_path)
    path.write_bytes(path.read_bytes() + b" ")
    job = make(loaded, files, prompt="a").model_copy(update={"loras": ()})
    job = RenderJob.model_validate({**job.model_dump(), "loras": [{"name": "x", "sha256": planned}]})
    with pytest.raises(AssetError, match=r"lora 'x': .*x\.safetensors has sha256 .*, the job was planned with"):
        assets.for_jobs([job])
    with pytest.raises(AssetError, match=r"unknown lora 'nope'"):
        assets.path("lora", "nope", planned)


# ------------------------------------------------------------------ hires fix and upscale


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_renders_the_final_size_and_records_it(loaded: LoadedModel, assets: AssetFiles,
                                                         files: dict[str, Path], upscaler: str) -> None:
    hires = {"scale": 2, "steps": 2, "denoising_strength": 0.6, "upscaler": upscaler}
    job = make(loaded, files, {"l3": 0.7}, hires=hires)
    first, second = run(loaded, assets, job), run(loaded, assets, job)
    assert first[0].shape == (128, 128, 3)
    assert diff(first[0], second[0]) == 0  # the same job gives the same image on two runs
    low, = run(loaded, assets, make(loaded, files, {"l3": 0.7}))
    small = np.asarray(Image.fromarray(first[0].astype(np.uint8)).resize((64, 64), Image.Resampling.BOX))
    assert diff(small.astype(np.int16), low) > 0  # the second pass changed the upscaled image
    png = encode_png(Image.fromarray(first[0].astype(np.uint8)), job, loaded.short_hash).png
    info = parse_infotext(Image.open(io.BytesIO(png)).text["parameters"])
    assert (info["Hires upscale"], info["Hires steps"], info["Hires upscaler"], info["Denoising strength"]) == (
        "2", "2", upscaler, "0.6")


def test_upscale_gives_the_requested_size(loaded: LoadedModel, assets: AssetFiles, files: dict[str, Path]) -> None:
    big, = run(loaded, assets, make(loaded, files, upscale={"factor": 2.5}))
    assert big.shape == (160, 160, 3)
