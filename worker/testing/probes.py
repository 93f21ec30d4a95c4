"""Experiments on the trained toy model that say whether a render means what its job asked: the
semantic tests run them over a few dozen fixed seeds and assert thresholds; tools/calibrate_shapes.py
runs them over more seeds to measure those thresholds and their margins (MODEL_CARD.md).

Jobs are planned by the farm's batch planner from a registry of the committed files, and rendered by
the worker's own code (its LoRA and embedding switching, prompt weighting, hires fix, CLIPSeg masks
and inpainting), on the CPU. Each experiment returns one number, or one tuple, per seed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdfarm.batchfile import plan_batch
from sdfarm.inputs import Inputs
from sdfarm.jobs import RenderJob
from sdfarm.models import HashCache, Registry, parse_assets, parse_registry

from ..assets import AssetFiles
from ..masks import JobInput, MaskModels, job_input
from ..pipeline import LoadedModel, load_model
from ..render import render
from . import shapes, toy

MODEL = "shapes-sd15"
EMBEDDING = "verdigris"  # the registered name of the teal embedding: the word a prompt uses
MASK_THRESHOLD = 0.7  # CLIPSeg's probability that counts as masked (the demo's too): fewer stray pixels than 0.5
DEFAULTS = {"model": MODEL, "width": 64, "height": 64, "steps": 20, "guidance_scale": 5.0,
            "sampler": "DPM++ 2M Karras"}


def registry_text() -> str:
    """A registry of the committed toy files: the model, the outlined LoRA, the verdigris embedding and CLIPSeg."""
    return (f"models:\n  {MODEL}: {{path: {toy.MODEL}}}\nloras:\n  outlined: {{file: {toy.LORA}}}\n"
            f"embeddings:\n  {EMBEDDING}: {{file: {toy.EMBEDDING}}}\n"
            f"mask_models:\n  shapes-clipseg: {{path: {toy.CLIPSEG}}}\n")


class Toy:
    """The trained toy model, loaded as a worker loads it, with its registry."""

    def __init__(self, cache: Path) -> None:
        text = registry_text()
        self.registry = Registry(parse_registry(text, "toy", cache), HashCache(cache), parse_assets(text, "toy", cache))
        self.loaded: LoadedModel = load_model(self.registry, MODEL, "cpu")
        self.assets = AssetFiles(self.registry, None, cache)
        self.masks = MaskModels(torch.device("cpu"))

    def plan(self, items: Sequence[dict[str, Any]], inputs_dir: Path | None = None) -> list[RenderJob]:
        """Jobs for batch items (fields over DEFAULTS), as the producer plans them; `local:` inputs are
        files in `inputs_dir`."""
        text = json.dumps({"name": "probe", "defaults": DEFAULTS, "items": list(items)})
        return list(plan_batch(text, "probe.json", "json", self.registry, 100_000,
                               inputs=Inputs(None, inputs_dir)).jobs)

    def render(self, jobs: list[RenderJob], inputs: dict[str, JobInput] | None = None,
               chunk: int = 8) -> list[Image.Image]:
        """Render jobs as workers do, chunk by chunk: jobs with the same LoRAs share a chunk."""
        out: dict[str, Image.Image] = {}
        ordered = sorted(jobs, key=lambda j: repr(j.loras))
        for _, same in groupby(ordered, key=lambda j: repr(j.loras)):
            group = list(same)
            for i in range(0, len(group), chunk):
                part = group[i:i + chunk]
                files = self.assets.for_jobs(part)
                self.loaded.adapters.activate(part[0].loras, tuple({e for j in part for e in j.embeddings}), files)
                out.update(zip([j.id for j in part], render(self.loaded, part, inputs), strict=True))
        return [out[j.id] for j in jobs]

    def images(self, items: Sequence[dict[str, Any]]) -> list[Image.Image]:
        return self.render(self.plan(items))

    def text_mask(self, image: Image.Image, text: str, threshold: float = MASK_THRESHOLD) -> Image.Image:
        return self.masks.text_mask(toy.CLIPSEG, image, text, threshold)


def pairs_for(seed: int) -> tuple[str, str, str]:
    """The colour, background colour and shape of seed's prompt: every colour in turn, on a background
    that differs from it, each colour with each shape in turn."""
    names = sorted(shapes.COLOURS)
    colour = names[seed % len(names)]
    backgrounds = [c for c in names if shapes._far(shapes.COLOURS[c], shapes.COLOURS[colour])]
    shape = shapes.SHAPES[(seed // len(names)) % len(shapes.SHAPES)]
    return colour, backgrounds[(seed * 5 + seed // len(names)) % len(backgrounds)], shape


def prompt_colours(model: Toy, seeds: Sequence[int]) -> list[tuple[str, str, str, str]]:
    """Per seed: (colour asked, colour of the shape drawn, background asked, background drawn)."""
    asks = [pairs_for(s) for s in seeds]
    images = model.images([{"prompt": f"a {c} {shape} on a {bg} background", "seed": s}
                           for s, (c, bg, shape) in zip(seeds, asks, strict=True)])
    return [(c, shapes.shape_colour(im), bg, shapes.background_colour(im))
            for (c, bg, _), im in zip(asks, images, strict=True)]


def red_share_by_weight(model: Toy, seeds: Sequence[int], weights: Sequence[float]) -> dict[float, list[float]]:
    """Per weight, per seed: the share of red pixels in "a (red:W) circle on a white background"."""
    items = [{"prompt": f"a (red:{w}) circle on a white background", "seed": s} for w in weights for s in seeds]
    images = model.images(items)
    n = len(seeds)
    return {w: [shapes.share(im, "red") for im in images[k * n:(k + 1) * n]] for k, w in enumerate(weights)}


def red_share_negative(model: Toy, seeds: Sequence[int]) -> tuple[list[float], list[float]]:
    """Per seed: the share of red in "a large circle on a white background", without a negative prompt
    and with the negative prompt "red"."""
    prompt = "a large circle on a white background"
    items = [{"prompt": prompt, "negative_prompt": neg, "seed": s} for neg in ("", "red") for s in seeds]
    images = model.images(items)
    n = len(seeds)
    return [shapes.share(im, "red") for im in images[:n]], [shapes.share(im, "red") for im in images[n:]]


def lora_outline(model: Toy, seeds: Sequence[int], weights: Sequence[float]
                 ) -> tuple[list[Image.Image], dict[float, list[Image.Image]]]:
    """Per seed: the render without the LoRA, and with <lora:outlined:W> for each weight."""
    prompt = "a yellow square in the sky"
    base = model.images([{"prompt": prompt, "seed": s} for s in seeds])
    items = [{"prompt": f"{prompt} <lora:outlined:{w}>", "seed": s} for w in weights for s in seeds]
    images = model.images(items)
    n = len(seeds)
    return base, {w: images[k * n:(k + 1) * n] for k, w in enumerate(weights)}


def embedding_colour(model: Toy, seeds: Sequence[int]) -> list[str]:
    """Per seed: the colour of the shape drawn for "a large verdigris circle on a white background"
    (verdigris is the embedding's word; it should draw teal)."""
    images = model.images([{"prompt": f"a large {EMBEDDING} circle on a white background", "seed": s}
                           for s in seeds])
    return [shapes.shape_colour(im) for im in images]


def scene_for(seed: int) -> shapes.Scene:
    """A scene of the shapes world with a plain background, for the mask and inpainting experiments."""
    import random

    rng = random.Random(seed)
    while True:
        scene = shapes.random_scene(rng, unnamed_share=0.0)
        if scene.background == "plain" and scene.size != "small":
            return scene


def background_iou(model: Toy, seeds: Sequence[int], threshold: float = MASK_THRESHOLD) -> list[float]:
    """Per seed: the IoU of CLIPSeg's mask for "background" with the true background of a scene."""
    out = []
    for s in seeds:
        image, shape = shapes.render(scene_for(s))
        found = np.asarray(model.text_mask(image, "background", threshold)) > 127
        out.append(float((found & ~shape).sum() / (found | ~shape).sum()))
    return out


def inpaint_sky(model: Toy, seeds: Sequence[int], folder: Path) -> list[tuple[float, float, float]]:
    """Inpaint the background of a scene, found by CLIPSeg from the word "background", with "... in the
    sky" (mask blur 1: a 64-pixel image's feather). Per seed: the background's mean distance (RGB) from
    the sky's colours and from its own colour before, and the share of the shape's pixels (1 pixel in
    from its edge) that come back within 4 levels of the init image. The scenes are written to
    `folder` as the jobs' init images."""
    scenes = [scene_for(s) for s in seeds]
    truths = [shapes.render(sc) for sc in scenes]
    for s, (image, _) in zip(seeds, truths, strict=True):
        image.save(folder / f"scene-{s}.png")
    items = [{"prompt": f"a {sc.colour} {sc.shape} in the sky", "seed": s, "init_image": f"local:scene-{s}.png",
              "mask_prompt": "background", "mask_model": "shapes-clipseg", "mask_threshold": MASK_THRESHOLD,
              "mask_blur": 1, "strength": 1.0, "inpaint_fill": "latent noise"}
             for s, sc in zip(seeds, scenes, strict=True)]
    jobs = model.plan(items, folder)
    inputs = {job.id: job_input(job, image, model.text_mask(image, "background", job.mask_threshold))
              for job, (image, _) in zip(jobs, truths, strict=True)}
    out = []
    sky = np.linspace(np.array(shapes.SKY_TOP, float), np.array(shapes.SKY_BOTTOM, float), shapes.SIZE)
    for (image, shape), after, scene in zip(truths, model.render(jobs, inputs), scenes, strict=True):
        rgb, background = shapes.pixels(after), shapes.erode(~shape, 3)
        to_sky = np.linalg.norm(rgb - sky[:, None, :], axis=-1)[background].mean()
        to_before = np.linalg.norm(rgb - np.array(shapes.COLOURS[scene.background_colour], float), axis=-1)
        inner = shapes.erode(shape, 1)
        kept = np.abs(rgb - shapes.pixels(image)).max(-1)[inner] <= 4
        out.append((float(to_sky), float(to_before[background].mean()), float(kept.mean())))
    return out


def hires_correlation(model: Toy, seeds: Sequence[int], strength: float = 0.5) -> list[float]:
    """Per seed: the correlation of the 64x64 render, upscaled 2x (Lanczos), with the hires-fixed render
    of the same job (2x, Lanczos, `strength`)."""
    prompts = [f"a {c} {shape} on a {bg} background" for c, bg, shape in (pairs_for(s) for s in seeds)]
    low = model.images([{"prompt": p, "seed": s} for p, s in zip(prompts, seeds, strict=True)])
    high = model.images([{"prompt": p, "seed": s, "hires": {"scale": 2, "steps": 10, "upscaler": "Lanczos",
                                                              "denoising_strength": strength}}
                         for p, s in zip(prompts, seeds, strict=True)])
    out = []
    for a, b in zip(low, high, strict=True):
        up = shapes.pixels(a.resize(b.size, Image.Resampling.LANCZOS)).ravel()
        out.append(float(np.corrcoef(up, shapes.pixels(b).ravel())[0, 1]))
    return out
