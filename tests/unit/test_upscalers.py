"""Upscaler models through spandrel: a tiny ESRGAN file written by the test, run in tiles, in hires
fix and the final upscale, and refused with a clear reason when the file is not an upscaler."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from safetensors.torch import load_file, save_file

from sdfarm.errors import AssetError, RenderError
from sdfarm.infotext import parse_infotext
from sdfarm.jobs import RenderJob
from sdfarm.models import HashCache, Registry, parse_assets
from worker.assets import AssetFiles
from worker.encode import encode_png
from worker.pipeline import LoadedModel, load_model
from worker.render import render
from worker.testing import write_tiny_lora, write_tiny_upscaler
from worker.upscalers import Upscalers, load_upscaler, run_model


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("upscalers")
    return {
        "x2": write_tiny_upscaler(folder / "x2.safetensors", seed=4),
        "x4": write_tiny_upscaler(folder / "x4.safetensors", seed=5, scale=4),
        "lora": write_tiny_lora(folder / "lora.safetensors", seed=6),  # weights, but no upscaler
    }


@pytest.fixture(scope="module")
def assets(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> AssetFiles:
    text = "upscalers:\n" + "".join(f"  {n}: {{file: {p}}}\n" for n, p in files.items())
    cache = tmp_path_factory.mktemp("cache")
    return AssetFiles(Registry({}, HashCache(cache), parse_assets(text, "t", cache)), None, cache)


@pytest.fixture(scope="module")
def loaded(registry: Registry) -> LoadedModel:
    return load_model(registry, "tiny-sd15", "cpu")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def picture(width: int = 80, height: int = 64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2))


def upscale_job(name: str, files: dict[str, Path]) -> RenderJob:
    return RenderJob.model_validate({"model": "m", "model_hash": "0" * 64, "prompt": "p", "seed": 1, "width": 80,
                                     "height": 64, "upscale": {"factor": 2, "upscaler": name,
                                                               "upscaler_sha256": sha(files[name])}})


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def test_an_esrgan_file_loads_and_enlarges_the_image_its_own_way(files: dict[str, Path]) -> None:
    model = load_upscaler(files["x2"], torch.device("cpu"))
    assert (model.architecture.name, model.scale) == ("ESRGAN", 2)
    image = picture()
    out = pixels(run_model(model, image, tile=0))
    assert out.shape == (128, 160, 3)
    lanczos = pixels(image.resize((160, 128), Image.Resampling.LANCZOS))
    assert 3 < np.abs(out - lanczos).mean() < 60  # the network's own output, still the same picture
    other = pixels(picture().transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((160, 128)))
    assert np.abs(out - lanczos).mean() < np.abs(out - other).mean()


def test_tiles_with_a_margin_give_the_whole_image_result(files: dict[str, Path]) -> None:
    model = load_upscaler(files["x2"], torch.device("cpu"))
    image = picture(100, 72)  # tiles of 16 do not divide it: edge tiles are smaller
    assert np.abs(pixels(run_model(model, image, tile=16)) - pixels(run_model(model, image, tile=0))).max() <= 1


@pytest.mark.parametrize(("model", "size", "passes"), [
    ("x2", (160, 128), 1), ("x2", (240, 192), 2), ("x4", (200, 160), 1), ("x2", (88, 72), 1), ("x2", (800, 640), 3)])
def test_the_model_runs_until_the_target_size_at_most_three_times_then_lanczos_fits_it(
        files: dict[str, Path], assets: AssetFiles, monkeypatch: pytest.MonkeyPatch, model: str,
        size: tuple[int, int], passes: int) -> None:
    calls: list[tuple[int, int]] = []

    def counted(m: Any, image: Image.Image, tile: int) -> Image.Image:
        calls.append(image.size)
        return run_model(m, image, tile)

    monkeypatch.setattr("worker.upscalers.run_model", counted)
    upscalers = Upscalers(torch.device("cpu"), tile=0)
    job = upscale_job(model, files)
    upscalers.prepare(job, assets.for_jobs([job]))
    out = upscalers.resize(picture(), size, model, sha(files[model]))
    assert out.size == size
    assert len(calls) == passes  # a 2x model for 3x runs twice; 10x stops after three passes (8x), as A1111
    if model == "x2" and size == (160, 128):  # one pass gives the size exactly: no resampling after it
        direct = run_model(load_upscaler(files["x2"], torch.device("cpu")), picture(), tile=0)
        assert np.array_equal(pixels(out), pixels(direct))


def test_nan_in_half_precision_is_redone_in_float32_and_nan_in_float32_fails_the_job(
        files: dict[str, Path], tmp_path: Path) -> None:
    state = load_file(str(files["x2"]))
    state["model.0.weight"] *= 6e4  # fits in fp16, but the first features overflow it: inf - inf = NaN
    hot = tmp_path / "hot.safetensors"
    save_file(state, str(hot))
    upscalers = Upscalers(torch.device("cpu"), tile=0)
    upscalers.files["hot"], upscalers.loaded["hot"] = hot, load_upscaler(hot, torch.device("cpu"), torch.float16)
    bright = Image.new("RGB", (80, 64), (250, 240, 245))
    with pytest.raises(RenderError):  # what the fp16 model gives by itself
        run_model(upscalers.loaded["hot"], bright, tile=0)
    assert upscalers.resize(bright, (160, 128), "hot", "hot").size == (160, 128)
    assert upscalers.loaded["hot"].dtype == torch.float32  # and it stays so
    state["model.0.weight"] *= float("nan")
    save_file(state, str(hot))
    upscalers.loaded["hot"] = load_upscaler(hot, torch.device("cpu"))
    with pytest.raises(RenderError, match="the upscaler model produced NaN or infinite pixels; nothing was stored"):
        upscalers.resize(bright, (160, 128), "hot", "hot")


def test_a_file_that_is_not_an_upscaler_fails_the_job_with_the_reason(files: dict[str, Path],
                                                                     assets: AssetFiles) -> None:
    job = upscale_job("lora", files)
    with pytest.raises(AssetError, match=r"upscaler 'lora': cannot load lora.safetensors: not an upscaler model"
                                         r" spandrel knows"):
        Upscalers(torch.device("cpu")).prepare(job, assets.for_jobs([job]))


def test_only_the_last_two_models_stay_loaded(files: dict[str, Path], assets: AssetFiles) -> None:
    upscalers = Upscalers(torch.device("cpu"))
    for name in ("x2", "x4", "x2", "x4"):
        job = upscale_job(name, files)
        upscalers.prepare(job, assets.for_jobs([job]))
    assert list(upscalers.loaded) == [sha(files["x2"]), sha(files["x4"])]


def make(loaded: LoadedModel, **changes: Any) -> RenderJob:
    return RenderJob.model_validate({"model": "tiny-sd15", "model_hash": loaded.identity, "prompt": "a red fox",
                                     "seed": 11, "width": 64, "height": 64, "steps": 4, **changes})


def rendered(loaded: LoadedModel, assets: AssetFiles, job: RenderJob) -> Image.Image:
    loaded.upscalers.prepare(job, assets.for_jobs([job]))
    image, = render(loaded, [job])
    return image


def test_hires_fix_with_an_upscaler_model(loaded: LoadedModel, assets: AssetFiles, files: dict[str, Path]) -> None:
    hires = {"scale": 2, "steps": 2, "denoising_strength": 0.5}
    job = make(loaded, hires={**hires, "upscaler": "x2", "upscaler_sha256": sha(files["x2"])})
    image = rendered(loaded, assets, job)
    assert image.size == (128, 128)
    assert np.array_equal(pixels(image), pixels(rendered(loaded, assets, job)))  # the same image on two runs
    by_lanczos = rendered(loaded, assets, make(loaded, hires={**hires, "upscaler": "Lanczos"}))
    assert np.abs(pixels(image) - pixels(by_lanczos)).max() > 10  # the model, not a resampler, enlarged it
    info = parse_infotext(Image.open(io.BytesIO(encode_png(image, job, loaded.short_hash).png)).text["parameters"])
    assert (info["Hires upscale"], info["Hires upscaler"], info["Denoising strength"]) == ("2", "x2", "0.5")


def test_the_final_upscale_with_an_upscaler_model(loaded: LoadedModel, assets: AssetFiles,
                                                  files: dict[str, Path]) -> None:
    job = make(loaded, upscale={"factor": 3, "upscaler": "x4", "upscaler_sha256": sha(files["x4"])})
    image = rendered(loaded, assets, job)
    assert image.size == (192, 192)
    plain = rendered(loaded, assets, make(loaded))
    expected = plain.resize((256, 256), Image.Resampling.NEAREST)  # the x4 model starts from repeated pixels
    model = load_upscaler(files["x4"], torch.device("cpu"))
    assert np.array_equal(pixels(image), pixels(run_model(model, plain, tile=0).resize((192, 192),
                                                                                     Image.Resampling.LANCZOS)))
    assert np.abs(pixels(run_model(model, plain, tile=0)) - pixels(expected)).mean() > 3
    info = parse_infotext(Image.open(io.BytesIO(encode_png(image, job, loaded.short_hash).png)).text["parameters"])
    assert (info["Postprocess upscale by"], info["Postprocess upscaler"]) == ("3", "x4")
