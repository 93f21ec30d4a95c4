"""producer.fetch.contact_sheet: a fetched batch's images, each scaled into its cell over a caption
band with the index and seed, then the prompt (from the sidecar) over at most three lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from producer.fetch import ELLIPSIS, caption_font, caption_prompt, contact_sheet, wrap_caption

LONG_PROMPT = ("a very detailed oil painting of a lighthouse on a rocky coast at dusk, dramatic clouds, "
               "crashing waves, seagulls, warm light from the windows, by a famous old master, trending")


def write_batch(folder: Path, cells: list[dict[str, Any]]) -> None:
    """fetch's layout: <index:06d>-<job_id>.png and .json (the sidecar), and manifest.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for cell in cells:
        index, job_id = cell["index"], f"job{cell['index']}"
        entry = {"index": index, "job_id": job_id, "prompt": cell.get("prompt", ""), "seed": 1000 + index}
        if "size" not in cell:
            rows.append({**entry, "status": "failed", "reason": "boom"})
            continue
        stem = f"{index:06d}-{job_id}"
        Image.new("RGB", cell["size"], cell["color"]).save(folder / f"{stem}.png")
        job = {"prompt": cell.get("prompt", ""), "seed": 1000 + index, "negative_prompt": cell.get("negative", ""),
               "loras": [{"name": n, "weight": w, "sha256": "0" * 64} for n, w in cell.get("loras", [])]}
        sidecar = {"schema_version": 1, "job_id": job_id, "index": index, "job": job, "seed": 1000 + index,
                   "loras": job["loras"]}
        (folder / f"{stem}.json").write_text(json.dumps(sidecar))
        rows.append({**entry, "status": "done", "image": f"{stem}.png", "sidecar": f"{stem}.json"})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def dark(img: Image.Image, box: tuple[int, int, int, int]) -> int:
    """How many pixels in `box` are dark (text), on the sheet's white."""
    return sum(img.crop(box).convert("L").point(lambda v: 255 if v < 128 else 0).histogram()[255:])


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def test_cells_scale_to_fit_keep_aspect_and_order_with_a_caption_band(tmp_path: Path) -> None:
    thumb = 128
    write_batch(tmp_path / "b", [
        {"index": 0, "size": (64, 64), "color": RED, "prompt": LONG_PROMPT},
        {"index": 1},  # failed: no cell
        {"index": 2, "size": (128, 64), "color": GREEN, "prompt": ""},
        {"index": 3, "size": (64, 128), "color": BLUE, "prompt": "a cat"},
    ])
    out = contact_sheet(tmp_path / "b", tmp_path / "sheets" / "sheet.png", thumb=thumb, columns=2)
    with Image.open(out) as opened:
        sheet = opened.convert("RGB")

    # 3 cells over 2 columns: 2 rows, each a thumb square and a caption band for 4 lines of text
    assert sheet.width == 2 * thumb
    assert sheet.height % 2 == 0
    band = sheet.height // 2 - thumb
    assert band >= 4 * 10
    cell_h = thumb + band

    # cell 0: 64 px upscaled to fill the whole square, untouched by any text
    assert sheet.crop((0, 0, thumb, thumb)).getcolors() == [(thumb * thumb, RED)]
    # cell 1 (index 2): 128x64, full width, centred vertically on white
    assert sheet.getpixel((thumb + 64, 64)) == GREEN
    assert sheet.getpixel((thumb, 32)) == sheet.getpixel((2 * thumb - 1, 95)) == GREEN
    assert sheet.getpixel((thumb + 64, 10)) == sheet.getpixel((thumb + 64, 118)) == (255, 255, 255)
    # cell 2 (index 3): 64x128 (scaled to 64x128 in a 128 cell), centred horizontally, second row
    assert sheet.getpixel((64, cell_h + 64)) == BLUE
    assert sheet.getpixel((10, cell_h + 64)) == sheet.getpixel((118, cell_h + 64)) == (255, 255, 255)
    # the fourth slot is empty
    assert dark(sheet, (thumb, cell_h, 2 * thumb, 2 * cell_h)) == 0

    # every caption band has its "#index seed" line at the top ...
    for x, y in ((0, 0), (thumb, 0), (0, cell_h)):
        assert dark(sheet, (x, y + thumb, x + thumb, y + thumb + band // 4 + 1)) > 0
    # ... and prompt lines below only where the prompt is set; the long prompt fills all three
    def prompt_band(x: int, y: int) -> tuple[int, int, int, int]:
        return x, y + thumb + band // 4 + 2, x + thumb, y + cell_h

    assert dark(sheet, prompt_band(0, 0)) > 0
    assert dark(sheet, (0, cell_h - band // 4 + 1, thumb, cell_h)) > 0  # the third prompt line
    assert dark(sheet, prompt_band(thumb, 0)) == 0  # empty prompt
    assert dark(sheet, prompt_band(0, cell_h)) > 0
    assert dark(sheet, (0, 2 * cell_h - band // 2, thumb, 2 * cell_h)) == 0  # "a cat": one line


def test_sheet_size_follows_thumb_and_columns(tmp_path: Path) -> None:
    write_batch(tmp_path / "b", [{"index": i, "size": (64, 64), "color": RED, "prompt": "x"} for i in range(5)])
    small = contact_sheet(tmp_path / "b", tmp_path / "small.png", thumb=64, columns=4)
    big = contact_sheet(tmp_path / "b", tmp_path / "big.png")
    with Image.open(small) as s, Image.open(big) as b:
        assert s.width == 4 * 64
        assert b.width == 5 * 128  # fewer images than columns: one row
        band = b.height - 128
        assert band > 0
        assert s.height == 2 * (64 + band)  # the band is the same at any thumb size


def test_no_images_is_an_error(tmp_path: Path) -> None:
    write_batch(tmp_path / "b", [{"index": 0}])
    with pytest.raises(ValueError, match="no images"):
        contact_sheet(tmp_path / "b", tmp_path / "sheet.png")


def test_wrap_caption_fits_three_lines_and_ends_with_an_ellipsis() -> None:
    font = caption_font()
    lines = wrap_caption(LONG_PROMPT, font, 124)
    assert len(lines) == 3
    assert all(font.getlength(line) <= 124 for line in lines)
    assert lines[-1].endswith(ELLIPSIS)
    assert " ".join(lines).removesuffix(ELLIPSIS).rstrip() in LONG_PROMPT

    assert wrap_caption("a cat", font, 124) == ["a cat"]
    assert wrap_caption("", font, 124) == []
    assert wrap_caption("  a\n\ncat ", font, 124) == ["a cat"]
    split = wrap_caption("x" * 200, font, 60)  # a word wider than the line is cut, not lost
    assert len(split) == 3
    assert split[0].startswith("xxx")
    assert split[-1].endswith(ELLIPSIS)
    assert all(font.getlength(line) <= 60 for line in split)


def test_caption_prompt_comes_from_the_sidecar_with_its_loras(tmp_path: Path) -> None:
    write_batch(tmp_path, [
        {"index": 0, "size": (8, 8), "color": RED, "prompt": "a cat <lora:fluffy:0.5>",
         "loras": [("fluffy", 0.5), ("detail", 0.8)]},
        {"index": 1, "size": (8, 8), "color": RED, "prompt": "a dog"},
        {"index": 2, "size": (8, 8), "color": RED, "prompt": "a circle", "negative": "red"},
    ])
    rows = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    # the tagged LoRA is not repeated; the untagged one is appended as A1111 writes it
    assert caption_prompt(tmp_path, rows[0]) == "a cat <lora:fluffy:0.5> <lora:detail:0.8>"
    assert caption_prompt(tmp_path, rows[1]) == "a dog"
    assert caption_prompt(tmp_path, rows[2]) == "a circle | negative: red"
    # the sidecar is the source; the manifest's copy serves when it is gone
    sidecar = tmp_path / rows[1]["sidecar"]
    meta = json.loads(sidecar.read_text())
    meta["job"]["prompt"] = "a dog, from the sidecar"
    sidecar.write_text(json.dumps(meta))
    assert caption_prompt(tmp_path, rows[1]) == "a dog, from the sidecar"
    sidecar.unlink()
    assert caption_prompt(tmp_path, rows[1]) == "a dog"
