"""Render features on the farm: LoRAs fetched from S3 and verified, embeddings, hires fix, img2img
and inpainting (local, S3 and CLIPSeg text masks), through real `sdfarm worker` processes; a
tampered LoRA or a replaced input fails its job with the reason, and the worker serves on."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from producer.submit import submit_plan
from sdfarm.batchfile import plan_file
from sdfarm.infotext import parse_infotext
from sdfarm.inputs import Inputs
from sdfarm.layout import failed_key, image_key, sidecar_key
from sdfarm.models import Registry, addnet_hash
from sdfarm.progress import ProgressBoard
from sdfarm.store import Store
from tests.conftest import FEATURES, SDXL, XL_REFINER, WorkerProcess, cli, sha256_of, wait_for


@pytest.fixture(scope="module")
def feature_worker(start_worker: Callable[..., WorkerProcess], store: Store, tiny_assets: dict[str, Path]
                   ) -> WorkerProcess:
    good = tiny_assets["tiny-detail"].read_bytes()
    store.client.put_object(Bucket=store.bucket, Key="models/loras/detail.safetensors", Body=good)
    # a LoRA file, but not the one whose sha256 the registry names for this key
    store.client.put_object(Bucket=store.bucket, Key="models/loras/tampered.safetensors", Body=good)
    store.client.put_object(Bucket=store.bucket, Key="models/upscalers/esrgan.safetensors",
                            Body=tiny_assets["tiny-esrgan"].read_bytes())
    return start_worker("features", model=FEATURES)


def write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nseed: 5\ndefaults: {{model: {FEATURES}, width: 64, height: 64, steps: 4}}\n"
                    + body)
    return path


def test_loras_embeddings_and_hires_render_on_the_farm(tmp_path: Path, feature_worker: WorkerProcess,
                                                      env: dict[str, str], store: Store, registry: Registry,
                                                      tiny_assets: dict[str, Path]) -> None:
    path = write(tmp_path, "features", """items:
  - prompt: a fox <lora:s3-detail:0.7>, tiny-sparkle
  - {prompt: a fox, loras: ["s3-detail:0.7", "tiny-grain:0.5"]}
  - {prompt: "a (fox:1.2) BREAK in snow", hires: {scale: 2, steps: 2, denoising_strength: 0.5}}
  - {prompt: a fox, upscale: {factor: 2}}
  - {prompt: a fox, upscale: {factor: 2, upscaler: s3-esrgan}, hires: {scale: 1.5, upscaler: tiny-esrgan}}
""")
    plan = plan_file(path, registry, 100)
    result = cli(["submit", str(path), "--watch"], env)
    assert result.returncode == 0, result.stdout + result.stderr + feature_worker.tail()

    images = {job.id: Image.open(io.BytesIO(store.get(image_key(job.id)))) for job in plan.jobs}
    first, second, hires, upscaled, by_model = (images[j.id] for j in plan.jobs)
    info = parse_infotext(first.text["parameters"])
    assert info["Lora hashes"] == f"s3-detail: {addnet_hash(tiny_assets['tiny-detail'])[:12]}"  # as A1111
    assert info["TI hashes"] == f"tiny-sparkle: {sha256_of(tiny_assets['tiny-sparkle'])[:12]}"
    assert parse_infotext(second.text["parameters"])["Prompt"] == "a fox <lora:s3-detail:0.7> <lora:tiny-grain:0.5>"
    assert hires.size == (128, 128)
    assert parse_infotext(hires.text["parameters"])["Hires upscale"] == "2"
    assert upscaled.size == (128, 128)
    assert by_model.size == (192, 192)  # 64 -> hires 96 (ESRGAN 2x, fitted) -> 192 (ESRGAN 2x from the bucket)
    info = parse_infotext(by_model.text["parameters"])
    assert (info["Hires upscaler"], info["Postprocess upscaler"]) == ("tiny-esrgan", "s3-esrgan")
    assert feature_worker.tail(10**9).count("upscaler s3-esrgan fetched from s3://") == 1
    meta = store.get_json(sidecar_key(plan.jobs[1].id))
    assert [x["name"] for x in meta["loras"]] == ["s3-detail", "tiny-grain"]
    assert (meta["image"]["width"], meta["image"]["height"]) == (64, 64)
    # the S3 LoRA was downloaded once into the worker's cache, verified, and reused
    assert feature_worker.tail(10**9).count("lora s3-detail fetched from s3://") == 1


def test_a_tampered_lora_fails_its_job_with_the_reason_and_the_worker_serves_on(
        tmp_path: Path, feature_worker: WorkerProcess, env: dict[str, str], store: Store,
        registry: Registry) -> None:
    path = write(tmp_path, "tampered", """items:
  - {prompt: a fox, loras: [s3-tampered]}
  - a fox without LoRAs
""")
    plan = plan_file(path, registry, 100)
    watched = cli(["submit", str(path), "--watch"], env)
    assert watched.returncode == 1
    bad, good = plan.jobs
    reason = store.get_json(failed_key(plan.batch_id, bad.id))["reason"]
    assert "lora 's3-tampered': s3://" in reason
    assert "models/loras/tampered.safetensors has sha256" in reason
    assert "not loaded" in reason
    assert not store.exists(image_key(bad.id))
    assert store.exists(sidecar_key(good.id))  # the other chunk rendered
    assert feature_worker.proc.poll() is None
    again = write(tmp_path, "after-tampered", "items: [a later job]\n")
    assert cli(["submit", str(again), "--watch"], env).returncode == 0


def picture(seed: int, size: int = 96) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_img2img_and_inpainting_with_local_s3_and_text_masks(
        tmp_path: Path, feature_worker: WorkerProcess, env: dict[str, str], store: Store, registry: Registry,
        inputs_dir: Path) -> None:
    init = picture(1)
    init.save(inputs_dir / "init.png")
    mask = Image.new("L", (96, 96), 0)
    mask.paste(255, (24, 24, 72, 72))
    store.client.put_object(Bucket=store.bucket, Key="inputs/square-mask.png", Body=png_bytes(mask))
    path = write(tmp_path, "inpaint", """items:
  - {prompt: a fox, init_image: "local:init.png", strength: 0.6}
  - {prompt: a fox, init_image: "local:init.png", mask_image: inputs/square-mask.png, strength: 1.0}
  - {prompt: a fox, init_image: "local:init.png", mask_prompt: background, mask_threshold: 0.5}
""")
    result = cli(["submit", str(path), "--watch"], env)
    assert result.returncode == 0, result.stdout + result.stderr + feature_worker.tail()
    plan = plan_file(path, registry, 100, inputs=Inputs(store, inputs_dir))
    img2img, square, texted = plan.jobs
    assert img2img.init_image is not None
    assert store.exists(img2img.init_image.key)  # the local file was uploaded at submit, by its sha256
    out = {j.id: Image.open(io.BytesIO(store.get(image_key(j.id)))) for j in plan.jobs}
    assert all(image.size == (64, 64) for image in out.values())
    assert parse_infotext(out[img2img.id].text["parameters"])["Denoising strength"] == "0.6"
    assert parse_infotext(out[square.id].text["parameters"])["Mask blur"] == "4"
    kept = np.asarray(init.resize((64, 64), Image.Resampling.LANCZOS)).astype(int)
    got = np.asarray(out[square.id].convert("RGB")).astype(int)
    assert np.abs(got[:4] - kept[:4]).max() <= 2  # the top rows are outside the mask: the init image
    assert store.get_json(sidecar_key(texted.id))["job"]["mask_prompt"] == "background"


def test_an_input_replaced_after_submit_fails_its_job(tmp_path: Path, feature_worker: WorkerProcess,
                                                      store: Store, registry: Registry, board: ProgressBoard,
                                                      celery_app: Any) -> None:
    store.client.put_object(Bucket=store.bucket, Key="inputs/swap.png", Body=png_bytes(picture(7)))
    path = write(tmp_path, "swapped", 'items: [{prompt: a fox, init_image: inputs/swap.png}]\n')
    plan = plan_file(path, registry, 100, inputs=Inputs(store, None))
    store.client.put_object(Bucket=store.bucket, Key="inputs/swap.png", Body=png_bytes(picture(8)))
    submit_plan(plan, store, celery_app, board, 4)
    wait_for(lambda: (p := board.read(plan.batch_id)) is not None and p.finished, 120, "the batch to finish")
    reason = store.get_json(failed_key(plan.batch_id, plan.jobs[0].id))["reason"]
    assert "inputs/swap.png has sha256" in reason
    assert "it was replaced after submit" in reason


def test_sdxl_renders_on_the_farm_with_lora_embedding_vae_hires_and_inpainting(
        tmp_path: Path, start_worker: Callable[..., WorkerProcess], env: dict[str, str], store: Store,
        registry: Registry, inputs_dir: Path, tiny_sdxl: dict[str, Path]) -> None:
    worker = start_worker("sdxl", model=SDXL)
    picture(3).save(inputs_dir / "xl-init.png")
    path = tmp_path / "xl.yaml"
    path.write_text(f"""name: xl
seed: 9
defaults: {{model: {SDXL}, width: 64, height: 64, steps: 4, sampler: Euler a}}
items:
  - {{prompt: "a (fox:1.2), xl-sparkle <lora:xl-detail:0.7>", vae: xl-vae,
     hires: {{scale: 2, steps: 2, denoising_strength: 0.5}}}}
  - {{prompt: a fox, loras: [xl-grain], init_image: "local:xl-init.png", mask_prompt: background}}
  - {{prompt: a lighthouse, sampler: DPM++ 2M, refiner: {XL_REFINER}, refiner_switch_at: 0.6}}
  - {{prompt: a lighthouse, sampler: DPM++ 2M}}
""")
    result = cli(["submit", str(path), "--watch"], env)
    assert result.returncode == 0, result.stdout + result.stderr + worker.tail()
    plan = plan_file(path, registry, 100, inputs=Inputs(store, inputs_dir))
    first, inpaint, refined, plain = (Image.open(io.BytesIO(store.get(image_key(j.id)))) for j in plan.jobs)
    info = parse_infotext(first.text["parameters"])
    assert first.size == (128, 128)
    assert (info["Model"], info["VAE"], info["Hires upscale"]) == (SDXL, "xl-vae", "2")
    assert info["Lora hashes"] == f"xl-detail: {addnet_hash(tiny_sdxl['xl-detail'])[:12]}"
    assert info["TI hashes"] == f"xl-sparkle: {sha256_of(tiny_sdxl['xl-sparkle'])[:12]}"
    assert inpaint.size == (64, 64)
    assert store.get_json(sidecar_key(plan.jobs[1].id))["job"]["mask_prompt"] == "background"
    info = parse_infotext(refined.text["parameters"])  # the worker loaded the refiner beside its model
    assert (info["Refiner"], info["Refiner switch at"]) == (f"{XL_REFINER} [{registry.identity(XL_REFINER)[:10]}]",
                                                            "0.6")
    assert plain.tobytes() != refined.tobytes()  # the refiner rendered the last calls
    worker.stop()


def test_sdfarm_models_lists_every_registry_entry_with_family_and_identity(env: dict[str, str],
                                                                             registry: Registry) -> None:
    result = cli(["models"], env)
    assert result.returncode == 0, result.stderr
    lines = {tuple(line.split()[:3]) for line in result.stdout.splitlines()}
    assert ("model", SDXL, "sdxl") in lines
    assert ("vae", "xl-vae", "sdxl") in lines
    assert ("mask_model", "clipseg", "-") in lines
    assert ("lora", "s3-detail", "sd15") in lines
    assert ("upscaler", "s3-esrgan", "-") in lines
    assert f"{registry.asset_identity('vae', 'xl-vae')[:12]}" in result.stdout
