"""Measure what the semantic tests assert, over many seeds: the figures behind their thresholds and
margins (worker/testing/trained/MODEL_CARD.md quotes them).

    .venv/bin/python tools/calibrate_shapes.py            # seeds 0..99 (about 10 minutes on 2 cores)
    .venv/bin/python tools/calibrate_shapes.py --seeds 40
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.testing import probes, shapes


def pct(values: list[float]) -> str:
    v = np.asarray(values)
    return f"mean {v.mean():.3f}  min {v.min():.3f}  p5 {np.percentile(v, 5):.3f}  p50 {np.median(v):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=100)
    args = ap.parse_args()
    seeds = list(range(args.seeds))
    with tempfile.TemporaryDirectory() as tmp:
        model = probes.Toy(Path(tmp) / "cache")
        start = time.time()
        colours = probes.prompt_colours(model, seeds)
        print(f"shape colour follows the prompt: {np.mean([a == b for a, b, _, _ in colours]):.3f} of {len(seeds)}")
        print(f"background colour follows the prompt: {np.mean([a == b for _, _, a, b in colours]):.3f}")
        weights = probes.red_share_by_weight(model, seeds, (0.6, 1.0, 1.4))
        for w, v in weights.items():
            print(f"red share at (red:{w}): {pct(v)}")
        low, high = np.asarray(weights[0.6]), np.asarray(weights[1.4])
        print(f"  (red:1.4) > (red:0.6) in {np.mean(high > low):.3f} of seeds,"
              f" mean difference {np.mean(high - low):.3f}")
        plain, negative = probes.red_share_negative(model, seeds)
        print(f"red share, no negative: {pct(plain)}; negative 'red': {pct(negative)}")
        print(f"  images with > 2% red: {np.mean(np.asarray(plain) > 0.02):.3f}"
              f" -> {np.mean(np.asarray(negative) > 0.02):.3f}")
        base, lora = probes.lora_outline(model, seeds, (0.0, 0.5, 1.0))
        zero = [float(np.abs(shapes.pixels(a) - shapes.pixels(b)).max()) for a, b in zip(base, lora[0.0], strict=True)]
        print(f"LoRA at 0 vs no LoRA, largest pixel difference: max {max(zero)}")
        for w in (0.0, 0.5, 1.0):
            print(f"dark share with <lora:outlined:{w}>: {pct([shapes.dark_share(i) for i in lora[w]])}")
        print(f"dark share without the LoRA: {pct([shapes.dark_share(i) for i in base])}")
        drawn = probes.embedding_colour(model, seeds)
        print(f"'verdigris' (the embedding) draws teal: {np.mean([d == 'teal' for d in drawn]):.3f}; drawn: "
              f"{ {c: drawn.count(c) for c in set(drawn)} }")
        print(f"CLIPSeg 'background' IoU: {pct(probes.background_iou(model, seeds))}")
        folder = Path(tmp) / "inputs"
        folder.mkdir()
        inpaint = probes.inpaint_sky(model, seeds, folder)
        print(f"inpaint 'in the sky': background nearer the sky than its old colour in "
              f"{np.mean([a < b for a, b, _ in inpaint]):.3f}; distance to sky {pct([a for a, _, _ in inpaint])};"
              f" to the old colour {pct([b for _, b, _ in inpaint])}")
        kept = [k for *_, k in inpaint]
        print(f"  shape pixels kept within 4 levels: {pct(kept)};"
              f" seeds keeping half: {np.mean(np.asarray(kept) >= 0.5):.3f}")
        print(f"hires correlation with the upscaled low-res render: {pct(probes.hires_correlation(model, seeds))}")
        print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
