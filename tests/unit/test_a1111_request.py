"""A1111's txt2img and img2img requests as the farm takes them: webuiapi's defaults accepted, the fields
mapped to the job through the A1111 import's own mapping, seeds as A1111 numbers them, and what the
farm cannot honour refused by field name."""

from __future__ import annotations

import io
from typing import Any

import pytest
import webuiapi
from PIL import Image

from producer.api.a1111_request import (
    Img2ImgRequest,
    Refused,
    Txt2ImgRequest,
    model_parameters,
    plan_request,
    request_problems,
)
from sdfarm.a1111 import Registered
from sdfarm.batchfile import RawItem, plan_items
from sdfarm.errors import BatchInvalid
from sdfarm.inputs import Inputs
from sdfarm.jobs import RenderJob
from sdfarm.models import Registry

TINY = "tiny-sd15"
TWIN = "tiny-sd15-twin"
CAP = 1024 * 1024


class Captured(webuiapi.WebUIApi):
    """webuiapi building its requests as it does, handing the body here instead of posting it."""

    def __init__(self) -> None:
        super().__init__(host="127.0.0.1", port=9, username="x", password="y")  # nothing listens on port 9

    def post_and_get_api_result(self, url: str, json: dict[str, Any], use_async: bool) -> Any:
        return json


def jobs(req: Txt2ImgRequest | Img2ImgRequest, registry: Registry, inputs: Inputs | None = None) -> list[RenderJob]:
    inputs = inputs or Inputs(None, None)
    plan = plan_request(req, Registered(registry), TINY, inputs, CAP)
    raw = [RawItem(item, n) for n, item in enumerate(plan.items, 1)]
    return list(plan_items({}, raw, "txt2img", "api", registry, 100, name="t", inputs=inputs).jobs)


def png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return webuiapi.raw_b64_img(Image.open(buf))


def test_webuiapis_own_requests_at_its_defaults_are_taken(registry: Registry) -> None:
    api = Captured()
    txt2img = Txt2ImgRequest.model_validate(api.txt2img(prompt="a fox"))
    img2img = Img2ImgRequest.model_validate(api.img2img(images=[Image.new("RGB", (64, 64))], prompt="a fox",
                                                        mask_image=Image.new("L", (64, 64), 255)))
    (job,) = jobs(txt2img, registry)
    assert (job.sampler, job.steps, job.width, job.model) == ("Euler a", 20, 512, TINY)  # webuiapi's defaults
    (job,) = jobs(img2img, registry)
    assert job.init_image is not None
    assert job.mask_image is not None
    assert (job.inpaint_fill, job.inpaint_full_res, job.mask_blur, job.strength) == ("fill", True, 4, 0.75)


def test_fields_reach_the_job_by_a1111s_names(registry: Registry) -> None:
    req = Txt2ImgRequest(prompt="a fox", negative_prompt="snow", seed=7, steps=9, cfg_scale=5,
                         width=64, height=96, sampler_name="DPM++ 2M", scheduler="exponential", enable_hr=True,
                         hr_resize_x=128, hr_second_pass_steps=3, hr_upscaler="Latent (bicubic)",
                         hr_sampler_name="Euler", denoising_strength=0.4, refiner_checkpoint=TWIN,
                         refiner_switch_at=0.6, override_settings={"sd_model_checkpoint": TINY,
                                                                   "CLIP_stop_at_last_layers": 2})
    (job,) = jobs(req, registry)
    assert (job.seed, job.steps, job.guidance_scale, job.width, job.height) == (7, 9, 5.0, 64, 96)
    assert (job.sampler, job.schedule_type, job.clip_skip, job.negative_prompt) == ("DPM++ 2M", "Exponential", 2,
                                                                                     "snow")
    assert job.hires is not None
    assert (job.hires.resize_x, job.hires.steps, job.hires.upscaler, job.hires.denoising_strength,
            job.hires.sampler) == (128, 3, "Latent (bicubic)", 0.4, "Euler")
    assert job.refiner is not None
    assert (job.refiner.name, job.refiner_switch_at) == (TWIN, 0.6)
    (job,) = jobs(Txt2ImgRequest(prompt="a fox <lora:tiny-grain:0.5>", width=64, height=64), registry)
    assert [(lora.name, lora.weight) for lora in job.loras] == [("tiny-grain", 0.5)]  # the prompt's tags


def test_seeds_go_as_a1111s_do(registry: Registry) -> None:
    plain = plan_request(Txt2ImgRequest(prompt="a", seed=10, batch_size=2, n_iter=2), Registered(registry), TINY,
                         Inputs(None, None), CAP)
    assert [i["seed"] for i in plain.items] == plain.seeds == [10, 11, 12, 13]
    assert all("subseed" not in i for i in plain.items)
    varied = plan_request(Txt2ImgRequest(prompt="a", seed=10, subseed=5, subseed_strength=0.3, n_iter=3),
                          Registered(registry), TINY, Inputs(None, None), CAP)
    assert [(i["seed"], i["subseed"]) for i in varied.items] == [(10, 5), (10, 6), (10, 7)]
    drawn = plan_request(Txt2ImgRequest(prompt="a"), Registered(registry), TINY, Inputs(None, None), CAP)
    assert 0 <= drawn.seeds[0] < 2**32
    assert drawn.subseeds[0] >= 0


def refused(req: Txt2ImgRequest | Img2ImgRequest, registry: Registry) -> dict[str, str]:
    with pytest.raises(Refused) as e:
        plan_request(req, Registered(registry), TINY, Inputs(None, None), CAP)
    return dict(e.value.problems)


def test_what_the_farm_cannot_honour_is_refused_by_name(registry: Registry) -> None:
    found = refused(Txt2ImgRequest(prompt="a", restore_faces=True, tiling=True, styles=["s"], s_churn=0.5,
                                   script_name="x/y/z plot", firstphase_width=256, enable_hr=True, hr_upscaler="None",
                                   override_settings={"sd_model_checkpoint": "gone", "randn_source": "GPU",
                                                      "sd_vae": "no-vae", "samples_save": True}), registry)
    assert set(found) == {"restore_faces", "tiling", "styles", "s_churn", "script_name", "firstphase_width",
                          "hr_upscaler", "override_settings.sd_model_checkpoint", "override_settings.randn_source",
                          "override_settings.sd_vae", "override_settings.samples_save"}
    assert TINY in found["override_settings.sd_model_checkpoint"]  # the registered models are listed
    assert set(refused(Img2ImgRequest(prompt="a", init_images=[], resize_mode=3, mask="x", mask_blur_x=2,
                                      initial_noise_multiplier=0.5), registry)) == {
        "init_images", "resize_mode", "mask", "mask_blur_y", "initial_noise_multiplier"}
    assert refused(Txt2ImgRequest(prompt="a", sampler_name="DDIM", eta=1.0), registry) == {
        "eta": "1: the farm runs DDIM at A1111's default eta, 0"}
    assert set(refused(Txt2ImgRequest(prompt="a", batch_size=8, n_iter=200), registry)) == {"n_iter"}


def test_an_answer_too_large_to_hold_is_refused_before_anything_renders(registry: Registry) -> None:
    """The answer holds every image (PNG, base64, JSON) in memory: 64 megapixels at most."""
    plan_request(Txt2ImgRequest(prompt="a", width=1024, height=1024, batch_size=8, n_iter=8), Registered(registry),
                 TINY, Inputs(None, None), CAP)
    over = refused(Txt2ImgRequest(prompt="a", width=1024, height=1024, batch_size=8, n_iter=9), registry)
    assert over["n_iter"].startswith("batch_size x n_iter is 72 images of 1048576 pixels (allowed: at most 67108864")
    hires = refused(Txt2ImgRequest(prompt="a", width=512, height=512, batch_size=8, n_iter=9, enable_hr=True,
                                   hr_scale=2, hr_upscaler="Latent"), registry)
    assert "72 images of 1048576 pixels" in hires["n_iter"]
    resized = refused(Txt2ImgRequest(prompt="a", width=512, height=512, n_iter=100, enable_hr=True,
                                     hr_resize_x=1024, hr_upscaler="Latent"), registry)
    assert "100 images of 1048576 pixels" in resized["n_iter"]


def test_an_image_over_the_cap_is_a_413_before_it_is_decoded(registry: Registry) -> None:
    with pytest.raises(Refused) as e:
        plan_request(Img2ImgRequest(prompt="a", init_images=["A" * (CAP * 2)]), Registered(registry), TINY,
                     Inputs(None, None), CAP)
    assert e.value.status == 413
    assert [f for f, _ in e.value.problems] == ["init_images.0"]
    inputs = Inputs(None, None)
    image = "data:image/png;base64," + png(Image.new("RGB", (64, 64), "red"))
    (job,) = jobs(Img2ImgRequest(prompt="a", init_images=[image], width=64, height=64), registry, inputs)
    assert job.init_image is not None
    assert list(inputs.uploads) == [job.init_image.key]


def test_the_planners_problems_name_the_requests_fields(registry: Registry) -> None:
    plan = plan_request(Txt2ImgRequest(prompt="a <lora:gone:1>", width=100, cfg_scale=99, enable_hr=True, hr_scale=9),
                        Registered(registry), TINY, Inputs(None, None), CAP)
    with pytest.raises(BatchInvalid) as e:
        plan_items({}, [RawItem(i, n) for n, i in enumerate(plan.items, 1)], "t", "api", registry, 100)
    assert {f for f, _ in request_problems(e.value.problems)} == {"prompt", "width", "cfg_scale", "hr_scale"}


def test_a_checkpoint_is_named_as_a1111_names_it() -> None:
    assert model_parameters("v1-5-pruned.safetensors [6ce0161689]") == {"Model": "v1-5-pruned",
                                                                        "Model hash": "6ce0161689"}
    assert model_parameters("tiny-sd15 [0123456789]") == {"Model": "tiny-sd15", "Model hash": "0123456789"}
    assert model_parameters("tiny-sd15") == {"Model": "tiny-sd15"}
