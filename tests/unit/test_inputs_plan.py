"""img2img and inpainting inputs at submit: local files under SDFARM_INPUTS_DIR, checked, hashed and
recorded; bad ones rejected with the reason before anything is enqueued. (The bucket path is tested
against real S3 in tests/integration/test_features_farm.py.)"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from PIL import Image

from sdfarm.batchfile import plan_batch
from sdfarm.errors import BatchInvalid
from sdfarm.infotext import job_infotext, parse_infotext
from sdfarm.inputs import Inputs
from sdfarm.jobs import RenderJob
from sdfarm.models import HashCache, Registry, parse_assets, parse_registry

SHA = "9" * 64


def png(size: tuple[int, int], colour: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def inputs_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "cat.png").write_bytes(png((96, 80)))
    (folder / "mask.png").write_bytes(png((96, 80), "white"))
    (folder / "small-mask.png").write_bytes(png((64, 64), "white"))
    (folder / "huge.png").write_bytes(png((5000, 8)))
    (folder / "truncated.png").write_bytes(png((96, 80))[:60])
    (folder / "notes.txt").write_text("not an image")
    (tmp_path / "outside.png").write_bytes(png((8, 8)))
    (tmp_path / "clipseg").mkdir()
    (tmp_path / "clipseg" / "config.json").write_text("{}")
    return folder


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    text = f"models:\n  m: {{hub: a/b, sha256: '{SHA}'}}\nmask_models:\n  clipseg: {{path: clipseg}}\n"
    return Registry(parse_registry(text, "r", tmp_path), HashCache(tmp_path), parse_assets(text, "r", tmp_path))


def plan(body: str, registry: Registry, inputs_dir: Path | None) -> tuple[list[RenderJob], dict[str, bytes]]:
    text = "defaults: {model: m, seed: 1, prompt: a cat, width: 64, height: 64}\nitems:\n" + body.lstrip("\n")
    p = plan_batch(text, "b.yaml", "yaml", registry, 100, inputs=Inputs(None, inputs_dir))
    return list(p.jobs), p.uploads


def problems(body: str, registry: Registry, inputs_dir: Path | None) -> list[str]:
    with pytest.raises(BatchInvalid) as info:
        plan(body, registry, inputs_dir)
    return [str(p) for p in info.value.problems]


def test_a_local_init_image_is_hashed_recorded_and_uploaded_at_submit(registry: Registry, inputs_dir: Path) -> None:
    data = (inputs_dir / "cat.png").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    (job, masked, texted), uploads = plan("""
  - {init_image: "local:cat.png", strength: 0.5}
  - {init_image: "local:cat.png", mask_image: "local:mask.png", mask_blur: 2}
  - {init_image: "local:cat.png", mask_prompt: background, mask_dilate: 3}
""", registry, inputs_dir)
    assert job.init_image is not None
    assert (job.init_image.key, job.init_image.sha256, job.init_image.width, job.init_image.height) == (
        f"inputs/{sha}.png", sha, 96, 80)
    assert set(uploads) == {f"inputs/{sha}.png", masked.mask_image.key}  # type: ignore[union-attr]
    assert uploads[f"inputs/{sha}.png"] == data
    assert (job.mode, masked.mode, texted.mode) == ("img2img", "inpaint", "inpaint")
    assert texted.mask_model is not None
    assert texted.mask_model.name == "clipseg"
    for planned in (job, masked, texted):  # the task message round trip keeps every job as it is
        assert RenderJob.model_validate_json(planned.model_dump_json()) == planned
    assert len({job.compat_key(), masked.compat_key()}) == 2  # img2img and inpaint never share a chunk
    info = parse_infotext(job_infotext(masked, SHA[:10]))
    assert (info["Denoising strength"], info["Mask blur"]) == ("0.75", "2")
    assert parse_infotext(job_infotext(job, SHA[:10]))["Denoising strength"] == "0.5"


def test_bad_inputs_are_rejected_at_submit_with_the_reason(registry: Registry, inputs_dir: Path) -> None:
    found = problems("""
  - {init_image: "local:nope.png"}
  - {init_image: "local:../outside.png"}
  - {init_image: "local:truncated.png"}
  - {init_image: "local:huge.png"}
  - {init_image: "local:notes.txt"}
  - {init_image: "local:cat.png", mask_image: "local:small-mask.png"}
  - {init_image: "local:cat.png", mask_image: "local:mask.png", mask_prompt: background}
  - {init_image: "local:cat.png", mask_prompt: sky, mask_model: nope}
  - {strength: 0.5}
  - {mask_prompt: sky}
  - {init_image: "local:cat.png", hires: {scale: 2}}
  - {init_image: "local:cat.png", mask_blur: 8}
  - {init_image: "../../etc/passwd"}
""", registry, inputs_dir)
    assert found[0] == "b.yaml:3: item 1: init_image: 'local:nope.png': No such file or directory"
    assert found[1] == "b.yaml:4: item 2: init_image: 'local:../outside.png' is outside SDFARM_INPUTS_DIR"
    assert found[2].startswith("b.yaml:5: item 3: init_image: 'local:truncated.png' is not a readable image")
    assert found[3] == "b.yaml:6: item 4: init_image: 'local:huge.png' is 5000x8 (allowed: sides up to 4096)"
    assert found[4].startswith("b.yaml:7: item 5: init_image: 'local:notes.txt' is not a readable image")
    assert found[5] == ("b.yaml:8: item 6: mask_image is 64x64, init_image is 96x80: they must be the same size")
    assert found[6] == "b.yaml:9: item 7: set mask_image or mask_prompt, not both"
    assert found[7] == "b.yaml:10: item 8: mask_model: unknown mask_model 'nope' (allowed: clipseg)"
    assert found[8] == "b.yaml:11: item 9: strength needs init_image (img2img or inpainting)"
    assert found[9] == "b.yaml:12: item 10: mask_prompt needs init_image (img2img or inpainting)"
    assert found[10] == ("b.yaml:13: item 11: hires applies to txt2img; with init_image, set width and height"
                         " instead")
    assert found[11] == "b.yaml:14: item 12: mask_blur needs mask_image or mask_prompt"
    assert "init_image: '../../etc/passwd' is not an input reference" in found[12]
    assert len(found) == 13


def test_local_inputs_need_an_inputs_dir(registry: Registry) -> None:
    found = problems('  - {init_image: "local:cat.png"}\n', registry, None)
    assert found == ["b.yaml:3: item 1: init_image: 'local:cat.png': local inputs need SDFARM_INPUTS_DIR"]
