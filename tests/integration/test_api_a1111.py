"""The A1111-compatible API (/sdapi/v1) with A1111's own client, `webuiapi` from PyPI, against a real
`sdfarm serve` on loopback and two real workers of the tiny model: txt2img with hires fix, img2img
with a mask, the lists, concurrent callers, refusals that name the field (nothing enqueued, nothing
written), the caller's progress and interrupt, and the timeout that names the batch."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest
import redis
import requests
import webuiapi
from PIL import Image

from producer.control import read_batch_jobs
from sdfarm.a1111 import Registered, item_from_infotext
from sdfarm.infotext import parse_infotext
from sdfarm.layout import BATCHES
from sdfarm.models import Registry
from sdfarm.settings import Settings
from sdfarm.store import Store
from tests.conftest import IDLE, OTHER_TOKEN, TINY, ApiServer, WorkerProcess, start_api, stop_api, wait_for

SMALL: dict[str, Any] = {"width": 64, "height": 64, "steps": 2, "override_settings": {"sd_model_checkpoint": TINY}}


@pytest.fixture(scope="module")
def workers(start_worker: Callable[..., WorkerProcess]) -> Iterator[list[WorkerProcess]]:
    started = [start_worker(name, model=TINY, wait=False) for name in ("a1111-a", "a1111-b")]
    for w in started:
        wait_for(w.ready, 180, f"worker {w.hostname} to load {TINY}")
    yield started
    for w in started:
        w.stop()


def client(api: ApiServer, token: str | None = None) -> webuiapi.WebUIApi:
    """A1111's client, its session carrying the caller's bearer token."""
    url = urlparse(api.url)
    c = webuiapi.WebUIApi(host=url.hostname, port=url.port)
    c.session.headers["Authorization"] = f"Bearer {token or api.token}"
    return c


def post(api: ApiServer, route: str, body: dict[str, Any], token: str | None = None) -> requests.Response:
    return requests.post(f"{api.url}/sdapi/v1/{route}", json=body, headers=api.headers(token), timeout=120)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def refused_fields(r: requests.Response) -> list[str]:
    return [".".join(str(p) for p in e["loc"][1:]) for e in r.json()["detail"]]


def test_the_lists_are_a1111s_shapes_of_what_the_farm_offers(api: ApiServer) -> None:
    c = client(api)
    models = c.get_sd_models()
    tiny = next(m for m in models if m["model_name"] == TINY)
    assert tiny["title"] == f"{TINY} [{tiny['hash']}]"
    assert tiny["sha256"].startswith(tiny["hash"])
    assert tiny["title"] in c.util_get_model_names()
    assert {"Euler a", "DPM++ 2M", "DDIM", "UniPC"} <= set(c.util_get_sampler_names())
    assert {"automatic", "karras", "exponential"} <= set(c.util_get_scheduler_names())
    assert {"Lanczos", "tiny-esrgan"} <= {u["name"] for u in c.get_upscalers()}
    assert "tiny-grain" in {lora["name"] for lora in c.get_loras()}
    options = c.get_options()
    assert options["CLIP_stop_at_last_layers"] == 1
    assert options["randn_source"] == "CPU"
    assert options["sd_model_checkpoint"] in c.util_get_model_names()
    assert c.set_options({"CLIP_stop_at_last_layers": 1, "randn_source": "CPU"}) is None  # what the farm runs
    r = post(api, "options", {"sd_model_checkpoint": IDLE, "randn_source": "GPU"})
    assert r.status_code == 422
    assert refused_fields(r) == ["sd_model_checkpoint", "randn_source"]  # the model is chosen per call
    assert requests.get(f"{api.url}/sdapi/v1/sd-models", timeout=5).status_code == 401


def test_txt2img_with_hires_fix_answers_images_whose_infotext_reads_back(
        api: ApiServer, workers: list[WorkerProcess], registry: Registry) -> None:
    result = client(api).txt2img(
        prompt="a lighthouse <lora:tiny-grain:0.5>", negative_prompt="fog", seed=1234, steps=3, cfg_scale=6,
        width=64, height=64, batch_size=2, sampler_name="DPM++ 2M", scheduler="karras", enable_hr=True,
        hr_scale=2, hr_upscaler="tiny-esrgan", hr_second_pass_steps=2, denoising_strength=0.5,
        override_settings={"sd_model_checkpoint": TINY, "CLIP_stop_at_last_layers": 2})
    assert [im.size for im in result.images] == [(128, 128), (128, 128)]
    info = result.info
    assert (info["seed"], info["all_seeds"], info["sampler_name"], info["clip_skip"]) == (1234, [1234, 1235],
                                                                                        "DPM++ 2M", 2)
    assert result.parameters["seed"] == 1234
    assert result.parameters["enable_hr"] is True
    known = Registered(registry)
    for image, seed, infotext in zip(result.images, [1234, 1235], info["infotexts"], strict=True):
        assert image.info["parameters"] == infotext  # the PNG's own `parameters` chunk
        params = parse_infotext(infotext)
        assert (params["Seed"], params["Size-1"], params["Hires upscale"], params["Hires upscaler"]) == (
            str(seed), "64", "2", "tiny-esrgan")
        assert (params["Clip skip"], params["Schedule type"], params["Model hash"]) == ("2", "Karras",
                                                                                       info["sd_model_hash"])
        item = item_from_infotext(infotext, known)  # sdfarm's A1111 import makes the same job again
        assert (item["model"], item["seed"], item["steps"], item["clip_skip"], item["guidance_scale"]) == (
            TINY, seed, 3, 2, 6.0)
        assert item["hires"] == {"scale": 2.0, "steps": 2, "upscaler": "tiny-esrgan", "denoising_strength": 0.5}
        assert "<lora:tiny-grain:0.5>" in item["prompt"]
    assert info["extra_generation_params"]["Lora hashes"].startswith("tiny-grain: ")


def test_img2img_with_a_mask_repaints_the_mask_only_and_uploads_the_inputs(
        api: ApiServer, workers: list[WorkerProcess], store: Store) -> None:
    rng = np.random.default_rng(3)
    init = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = client(api).img2img(images=[init], mask_image=mask, mask_blur=0, inpainting_fill=1,
                                 inpaint_full_res=False, denoising_strength=0.9, prompt="a red square", seed=7,
                                 **{**SMALL, "steps": 4})
    (image,) = result.images
    out, given = np.asarray(image.convert("RGB")), np.asarray(init)
    assert image.size == (64, 64)
    assert (out[:12] == given[:12]).all()
    assert (out[52:] == given[52:]).all()
    assert not (out[20:44, 20:44] == given[20:44, 20:44]).all()  # repainted under the mask
    params = parse_infotext(image.info["parameters"])
    assert (params["Denoising strength"], params["Seed"]) == ("0.9", "7")
    assert result.parameters["init_images"] is None  # as A1111: echoed only with include_init_images
    ((_, job),) = read_batch_jobs(store, result.info["sdfarm_batch_id"])
    assert job.init_image is not None
    assert job.mask_image is not None
    for ref in (job.init_image, job.mask_image):  # uploaded with the batch, under inputs/ by content
        assert ref.key == f"inputs/{ref.sha256}.png"
        assert store.exists(ref.key)


def test_eight_concurrent_calls_on_two_workers_all_return_with_real_seeds(
        api: ApiServer, workers: list[WorkerProcess]) -> None:
    def one(n: int) -> webuiapi.WebUIApiResult:
        return client(api).txt2img(prompt=f"a fox, number {n}", **SMALL)  # seed -1: drawn by the service

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    seeds = [r.info["seed"] for r in results]
    assert len(set(seeds)) == 8
    assert all(0 <= s < 2**32 for s in seeds)
    for r, seed in zip(results, seeds, strict=True):
        (image,) = r.images
        assert parse_infotext(image.info["parameters"])["Seed"] == str(seed)


def test_a_failed_job_answers_an_error_with_its_reason(api: ApiServer, workers: list[WorkerProcess],
                                                       store: Store) -> None:
    store.client.put_object(Bucket=store.bucket, Key="models/loras/tampered.safetensors",
                            Body=b"not the file whose sha256 the registry names")
    r = post(api, "txt2img", {"prompt": "a fox <lora:s3-tampered:1>", **SMALL})
    assert r.status_code == 500, r.text
    body = r.json()
    assert body["detail"].startswith("1 of 1 images failed: image 1: lora 's3-tampered'")
    assert "has sha256" in body["failures"][0]["reason"]
    assert requests.get(f"{api.url}/v1/batches/{body['batch_id']}", headers=api.headers(), timeout=10).ok


def test_what_the_farm_cannot_honour_is_refused_by_name_and_nothing_is_enqueued(
        api: ApiServer, redis_client: redis.Redis) -> None:
    batches = redis_client.zcard(BATCHES)
    with pytest.raises(RuntimeError) as refused:  # webuiapi raises on any status but 200
        client(api).txt2img(prompt="a fox", restore_faces=True, styles=["cinematic"], **SMALL)
    assert refused.value.args[0] == 422
    assert {"restore_faces", "styles"} <= {".".join(map(str, e["loc"][1:]))
                                         for e in json.loads(refused.value.args[1])["detail"]}
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"override_settings": {"sd_model_checkpoint": "no-such-model"}}, "override_settings.sd_model_checkpoint",
         TINY),  # the message lists the models
        ({"sampler_name": "DDIM", "eta": 1.0}, "eta", "0"),
        ({"override_settings": {"sd_model_checkpoint": TINY, "randn_source": "GPU"}},
         "override_settings.randn_source", "CPU"),
        ({"width": 100}, "width", "multiple of 8"),
        ({"prompt": "a fox <lora:no-such-lora:1>"}, "prompt", "no-such-lora"),
        ({"enable_hr": True, "hr_scale": 5}, "hr_scale", "4"),
        ({"alwayson_scripts": {"ControlNet": {"args": []}}}, "alwayson_scripts", "scripts"),
        ({"sampler_name": "DPM adaptive"}, "sampler_name", "DPM adaptive"),
        ({"frobnicate": 1}, "frobnicate", "Extra inputs"),
    ]
    for body, fld, said in cases:
        r = post(api, "txt2img", {"prompt": "a fox", **SMALL, **body})
        assert r.status_code == 422, (body, r.text)
        assert fld in refused_fields(r), (body, r.text)
        assert said in r.text, (body, r.text)
    assert redis_client.zcard(BATCHES) == batches


def test_oversized_or_hostile_images_are_refused_and_nothing_is_written(
        api: ApiServer, settings: Settings, store: Store, redis_client: redis.Redis) -> None:
    inputs, batches = set(store.keys("inputs/")), redis_client.zcard(BATCHES)
    huge = base64.b64encode(bytes(settings.api_max_image_bytes + 1)).decode()
    r = post(api, "img2img", {"prompt": "a fox", "init_images": [huge], **SMALL})
    assert r.status_code == 413
    assert refused_fields(r) == ["init_images.0"]
    assert "SDFARM_API_MAX_IMAGE_BYTES" in r.text
    head = bytearray(png(Image.new("L", (8, 8))))  # a PNG whose header claims 5000 x 5000 pixels
    head[16:24] = struct.pack(">II", 5000, 5000)
    head[29:33] = struct.pack(">I", zlib.crc32(bytes(head[12:29])))
    for image, said in ((base64.b64encode(bytes(head)).decode(), "5000x5000"), ("not base64!", "base64"),
                        (base64.b64encode(b"GIF89a....").decode(), "image")):
        r = post(api, "img2img", {"prompt": "a fox", "init_images": [image], **SMALL})
        assert r.status_code == 422, r.text
        assert refused_fields(r) == ["init_images.0"]
        assert said in r.text
    assert set(store.keys("inputs/")) == inputs
    assert redis_client.zcard(BATCHES) == batches


def test_progress_and_interrupt_are_the_callers_own(api: ApiServer, workers: list[WorkerProcess],
                                                    redis_client: redis.Redis) -> None:
    idle = client(api).get_progress()
    assert idle["progress"] == 0
    assert idle["state"]["job_count"] == 0
    assert idle["current_image"] is None
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(client(api).txt2img, prompt="a slow fox", n_iter=200, **{**SMALL, "steps": 20})
        running = wait_for(lambda: (p := client(api).get_progress())["state"]["job_no"] >= 1 and p, 60,
                           "the first images of the call")
        assert running["state"]["job_count"] == 200
        assert 0 < running["progress"] < 1
        assert running["eta_relative"] > 0
        assert client(api, OTHER_TOKEN).get_progress()["state"]["job_count"] == 0  # another caller's view
        assert post(api, "interrupt", {}, OTHER_TOKEN).json() == {"interrupted": []}
        batch_id = running["state"]["job"]
        assert post(api, "interrupt", {}).json() == {"interrupted": [batch_id]}
        result = call.result(timeout=60)
    assert 1 <= len(result.images) < 200
    assert result.info["sdfarm_batch_id"] == batch_id
    assert redis_client.hget(f"sdfarm:batch:{batch_id}", "state") == b"cancelled"
    assert client(api).get_progress()["state"]["job_count"] == 0


def test_a_call_past_the_timeout_answers_504_naming_its_batch(env: dict[str, str], tmp_path: Path) -> None:
    server = start_api(env, tmp_path / "serve.log", {"SDFARM_API_SYNC_TIMEOUT_S": "1"})
    try:
        r = post(server, "txt2img", {"prompt": "never rendered", **SMALL,
                                     "override_settings": {"sd_model_checkpoint": IDLE}})  # no worker serves it
        assert r.status_code == 504
        batch_id = r.json()["batch_id"]
        assert f"/v1/batches/{batch_id}" in r.json()["detail"]
        assert requests.get(f"{server.url}/v1/batches/{batch_id}", headers=server.headers(),
                            timeout=10).json()["state"] == "active"  # the batch goes on, for the caller to poll
        assert requests.post(f"{server.url}/v1/batches/{batch_id}/cancel", headers=server.headers(),
                             timeout=10).status_code == 200
    finally:
        stop_api(server)
