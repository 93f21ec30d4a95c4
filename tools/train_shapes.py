"""Train the demo's toy models on the shapes world, on the CPU, once, by a developer (CI never trains).

    .venv/bin/python tools/train_shapes.py            # every stage, in order (about 75 minutes on 2 cores)
    .venv/bin/python tools/train_shapes.py --quick    # every stage on 50x less, into a temporary folder
    .venv/bin/python tools/train_shapes.py --stage lora

Stages, each reading what the ones before wrote under --out (default worker/testing/trained):
  vae        a KL VAE (8x down, 4 channels), L1 reconstruction plus a small KL term
  base       the CLIP text encoder and the UNet together, on the VAE's latents: diffusers' usual
             noise-prediction objective (SD 1.5's noise schedule), min-SNR weighting, 10% empty
             captions (classifier-free guidance), EMA weights saved; writes the diffusers folder sd15/
  lora       a rank-8 LoRA on the UNet's attention that draws a black rim ("outlined"), trained on
             outlined scenes captioned as usual
  embedding  a textual-inversion embedding (2 vectors, "verdigris") for teal, the colour the base model draws but
             has no word for
  clipseg    a small CLIPSeg that segments "background", "sky", "grass", the shape and colour words
  demo-input the demo's inpaint init image, the base model's own red circle (examples/inputs/red-circle.png)

Everything is seeded: the same command gives the same weights on the same machine. Losses and times go
to train_log.json, and a loss-curve figure to loss.png.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.testing import SD_SCHEDULER, UNET_TARGETS, toy
from worker.testing.shapes import SHAPES, Scene, caption, dataset, render

QUICK = 1  # --quick divides steps and data by 50: a check that every stage runs, not a model
STEPS = {"vae": 3000, "base": 6500, "lora": 1500, "embedding": 600, "clipseg": 5000}
# the LoRA's layers: the UNet's attention (as A1111 LoRAs), its feed-forward and projections, and its
# ResNet convolutions (as LoCon): a rim is a local pattern the attention alone draws faintly
LORA_TARGETS = [*UNET_TARGETS, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]


def sized(count: int) -> int:
    return max(count // QUICK, 16)


def steps_of(stage: str) -> int:
    return max(STEPS[stage] // QUICK, 10)


DEMO_INPUT_SEED = 3
TEAL_TOKENS = ["<teal>", "<teal>_1"]


def images_of(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """The scenes as a (N, 3, 64, 64) tensor in [-1, 1] and their shape masks (N, 64, 64) bool."""
    pics, masks = zip(*(render(s) for s in scenes), strict=True)
    x = torch.from_numpy(np.stack([np.asarray(p) for p in pics])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.from_numpy(np.stack(masks))


class Log:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def stage(self, name: str, **info: Any) -> None:
        self.data[name] = {**info}
        self.path.write_text(json.dumps(self.data, indent=1))


def schedule(step: int, total: int, warmup: int = 200) -> float:
    """Linear warm-up, then cosine down to 5%."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_loop(name: str, steps: int, params: list[torch.nn.Parameter], lr: float, step_fn: Any,
               log: Log, every: int = 10, weight_decay: float = 0.01) -> list[tuple[int, float]]:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, steps))
    curve: list[tuple[int, float]] = []
    smooth, start = None, time.time()
    for step in range(steps):
        loss = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if (step + 1) % every == 0 or step + 1 == steps:
            curve.append((step + 1, smooth))
            print(f"{name} {step + 1}/{steps} loss {smooth:.4f} {time.time() - start:.0f}s", flush=True)
    log.stage(name, steps=steps, seconds=round(time.time() - start), curve=curve)
    return curve


# ---------------------------------------------------------------- vae
def train_vae(out: Path, log: Log) -> None:
    torch.manual_seed(0)
    scenes = dataset(1, sized(7000)) + dataset(2, sized(1200), outlined=True)
    x, masks = images_of(scenes)
    # the shapes are a small part of each image: their pixels (and a rim round them) weigh 5x
    grown = torch.nn.functional.max_pool2d(masks[:, None].float(), 5, stride=1, padding=2)
    weight = 1 + 4 * grown
    vae = toy.build_vae().train()
    with torch.no_grad():  # start with a near-zero posterior spread: the latents carry the image from step 1
        vae.quant_conv.bias[vae.config.latent_channels:] = -12.0

    def step(_: int) -> torch.Tensor:
        idx = torch.randint(0, len(x), (16,))
        batch = x[idx]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample()).sample
        error = (recon - batch).abs() + (recon - batch).pow(2)
        loss: torch.Tensor = (weight[idx] * error).mean() + 1e-6 * posterior.kl().mean()
        return loss

    train_loop("vae", steps_of("vae"), list(vae.parameters()), 1e-3, step, log)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(x[i:i + 256]).latent_dist.mean for i in range(0, len(x), 256)])
    vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))
    vae.save_pretrained(out / "sd15" / "vae", safe_serialization=True)
    print(f"vae saved; scaling factor {vae.config.scaling_factor}", flush=True)


def encode(vae: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior's mean and standard deviation of each image (unscaled)."""
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(x), 256):
            dist = vae.encode(x[i:i + 256]).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def load_vae(out: Path) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(out / "sd15" / "vae").eval().requires_grad_(False)


class Diffusion:
    """Noise-prediction training on latents with SD 1.5's schedule and min-SNR-5 weighting."""

    def __init__(self, vae: Any, x: torch.Tensor, captions: Any, tokenizer: Any, seed: int) -> None:
        from diffusers import DDPMScheduler

        self.mean, self.std = encode(vae, x)
        self.scale = float(vae.config.scaling_factor)
        self.captions, self.tokenizer = captions, tokenizer
        self.noise = DDPMScheduler.from_config(SD_SCHEDULER)
        self.alphas = self.noise.alphas_cumprod
        self.rng = random.Random(seed)

    def loss(self, unet: Any, encoder: Any, batch: int = 32, empty: float = 0.1) -> torch.Tensor:
        idx = torch.randint(0, len(self.mean), (batch,))
        latents = (self.mean[idx] + self.std[idx] * torch.randn_like(self.mean[idx])) * self.scale
        texts = ["" if self.rng.random() < empty else self.captions(int(i), self.rng) for i in idx]
        ids = self.tokenizer(texts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        context = encoder(ids)[0]
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(latents)
        pred = unet(self.noise.add_noise(latents, noise, t), t, context).sample
        snr = self.alphas[t] / (1 - self.alphas[t])
        weight = torch.clamp(snr, max=5.0) / snr
        loss: torch.Tensor = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        return loss


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - decay)


# ---------------------------------------------------------------- base
def save_pipeline(out: Path, vae: Any, encoder: Any, unet: Any) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe: Any = StableDiffusionPipeline(
        vae=vae, text_encoder=encoder, tokenizer=toy.build_tokenizer(), unet=unet,
        scheduler=PNDMScheduler.from_config({**SD_SCHEDULER, "skip_prk_steps": True}), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out / "sd15"), safe_serialization=True)


def train_base(out: Path, log: Log) -> None:
    import copy

    torch.manual_seed(1)
    vae = load_vae(out)
    scenes = dataset(3, sized(24000))
    x, _ = images_of(scenes)
    tokenizer = toy.build_tokenizer()
    diffusion = Diffusion(vae, x, lambda i, rng: caption(scenes[i], rng), tokenizer, seed=3)
    encoder, unet = toy.build_text_encoder(len(tokenizer)).train(), toy.build_unet().train()
    ema_encoder, ema_unet = copy.deepcopy(encoder).eval(), copy.deepcopy(unet).eval()
    steps = steps_of("base")

    def step(n: int) -> torch.Tensor:
        if n > 0:
            decay = min(0.999, (1 + n) / (10 + n))
            ema_update(ema_unet, unet, decay)
            ema_update(ema_encoder, encoder, decay)
        if n > 0 and n % 1500 == 0:
            save_pipeline(out, vae, ema_encoder, ema_unet)
        return diffusion.loss(unet, encoder)

    train_loop("base", steps, [*unet.parameters(), *encoder.parameters()], 5e-4, step, log)
    ema_update(ema_unet, unet, 0.999)
    ema_update(ema_encoder, encoder, 0.999)
    save_pipeline(out, vae, ema_encoder, ema_unet)
    print("base model saved", flush=True)


def load_base(out: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out / "sd15"), safety_checker=None)
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.eval().requires_grad_(False)
    return pipe


# ---------------------------------------------------------------- lora
def train_lora(out: Path, log: Log) -> None:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(2)
    pipe = load_base(out)
    scenes = dataset(4, sized(4000), outlined=True, unnamed_share=0.0)
    x, _ = images_of(scenes)
    diffusion = Diffusion(pipe.vae, x, lambda i, rng: caption(scenes[i], rng), pipe.tokenizer, seed=4)
    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=LORA_TARGETS), pipe.unet, adapter_name="o")
    params = [p for n, p in pipe.unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    pipe.unet.train()
    train_loop("lora", steps_of("lora"), params, 1e-3, lambda _: diffusion.loss(pipe.unet, pipe.text_encoder), log,
               weight_decay=0.0)
    # peft's key names throughout (diffusers' older names cover only the attention's layers)
    layers = get_peft_model_state_dict(pipe.unet, adapter_name="o")
    (out / "loras").mkdir(exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(str(out / "loras"), unet_lora_layers=layers,
                                              weight_name="outlined.safetensors")
    print("lora saved", flush=True)


# ---------------------------------------------------------------- embedding
def train_embedding(out: Path, log: Log) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(3)
    pipe = load_base(out)
    scenes = dataset(5, sized(3000), unnamed_share=1.0)  # teal shapes only
    x, _ = images_of(scenes)
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    tokenizer.add_tokens(TEAL_TOKENS)
    encoder.resize_token_embeddings(len(tokenizer))
    table = encoder.get_input_embeddings()
    new = tokenizer.convert_tokens_to_ids(TEAL_TOKENS)
    start = table.weight[tokenizer.convert_tokens_to_ids(["blue</w>", "green</w>"])].mean(0)
    vectors = torch.nn.Parameter(start.repeat(len(new), 1).clone())
    encoder.set_input_embeddings(_Vectors(table, new, vectors))
    placeholder = " ".join(TEAL_TOKENS)

    def texts(i: int, rng: random.Random) -> str:
        text = caption(replace(scenes[i], colour="red"), rng)  # red marks the colour's place
        return text.replace("red", placeholder, 1)  # the shape's colour comes before the background's

    diffusion = Diffusion(pipe.vae, x, texts, tokenizer, seed=5)
    train_loop("embedding", steps_of("embedding"), [vectors], 5e-3,
               lambda _: diffusion.loss(pipe.unet, encoder, empty=0.0), log, weight_decay=0.0)
    (out / "embeddings").mkdir(exist_ok=True)
    save_file({"emb_params": vectors.detach().clone()}, str(out / "embeddings" / "verdigris.safetensors"))
    print("embedding saved", flush=True)


class _Vectors(torch.nn.Module):
    """The token table with trainable rows for the new tokens (the rest stays frozen)."""

    def __init__(self, table: torch.nn.Embedding, ids: list[int], vectors: torch.nn.Parameter) -> None:
        super().__init__()
        self.table, self.ids, self.vectors = table, ids, vectors

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.table(input_ids)
        for k, i in enumerate(self.ids):
            out = torch.where((input_ids == i)[..., None], self.vectors[k], out)
        return out


# ---------------------------------------------------------------- clipseg
def segmentation_queries(scene: Scene, mask: torch.Tensor, rng: random.Random) -> tuple[str, torch.Tensor]:
    """A word and its true mask for the scene: the background, the sky or grass, the shape or its colour
    (an absent shape, sky or grass gives an empty mask)."""
    kind = rng.random()
    if kind < 0.35:
        return "background", ~mask
    if kind < 0.5:
        word = rng.choice(["sky", "grass"])
        return word, ~mask if scene.background == word else torch.zeros_like(mask)
    if kind < 0.85:
        word = rng.choice(SHAPES) if rng.random() < 0.3 else scene.shape
        return word, mask if word == scene.shape else torch.zeros_like(mask)
    return (scene.colour, mask) if scene.colour else ("background", ~mask)


def train_clipseg(out: Path, log: Log) -> None:
    torch.manual_seed(4)
    scenes = dataset(6, sized(8000))
    x, masks = images_of(scenes)
    tokenizer = toy.build_tokenizer()
    model = toy.build_clipseg(len(tokenizer)).train()
    rng = random.Random(6)

    def batch(idx: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        pairs = [segmentation_queries(scenes[i], masks[i], rng) for i in idx.tolist()]
        ids = tokenizer([w for w, _ in pairs], padding="max_length", max_length=77, return_tensors="pt")
        return ({"input_ids": ids.input_ids, "attention_mask": ids.attention_mask, "pixel_values": x[idx]},
                torch.stack([m for _, m in pairs]).float())

    def step(_: int) -> torch.Tensor:
        inputs, target = batch(torch.randint(0, len(x), (32,)))
        logits = model(**inputs).logits.reshape(target.shape)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, target)

    train_loop("clipseg", steps_of("clipseg"), list(model.parameters()), 1e-3, step, log)
    model.eval()
    test = dataset(7, sized(200))
    tx, tm = images_of(test)
    with torch.no_grad():
        ids = tokenizer(["background"] * len(test), padding="max_length", max_length=77, return_tensors="pt")
        probs = torch.sigmoid(model(input_ids=ids.input_ids, attention_mask=ids.attention_mask,
                                    pixel_values=tx).logits.reshape(tm.shape))
    pred, true = probs > 0.5, ~tm
    iou = ((pred & true).sum((1, 2)).float() / (pred | true).sum((1, 2)).float())
    print(f"clipseg: background IoU mean {iou.mean():.3f}, min {iou.min():.3f}", flush=True)
    log.stage("clipseg", **log.data["clipseg"], background_iou_mean=round(iou.mean().item(), 4))
    model.save_pretrained(out / "clipseg")
    toy.clipseg_processor().save_pretrained(out / "clipseg")


# ---------------------------------------------------------------- the demo's init image
def write_demo_input(out: Path, log: Log) -> None:
    """red-circle.png: the base model's own "a large red circle on a green background", the init image
    of the demo's inpaint (CLIPSeg finds its background, sky is painted there). Written to
    examples/inputs when the models go to the committed folder, else beside them in `out`."""
    from diffusers import DPMSolverMultistepScheduler

    pipe = load_base(out)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    image = pipe("a large red circle on a green background", num_inference_steps=20, guidance_scale=5,
                 generator=torch.Generator().manual_seed(DEMO_INPUT_SEED), height=64, width=64).images[0]
    inputs = Path(__file__).resolve().parent.parent / "examples" / "inputs"
    image.save((inputs if out.resolve() == toy.TRAINED else out) / "red-circle.png")


# ---------------------------------------------------------------- figure
def draw_curves(log: Log, path: Path) -> None:
    """One panel per stage: the smoothed training loss (log scale) against the step."""
    stages = [s for s in STEPS if s in log.data]
    w, h = 300, 180
    fig = Image.new("RGB", (w * len(stages), h), "white")
    draw = ImageDraw.Draw(fig)
    for k, name in enumerate(stages):
        curve = log.data[name]["curve"]
        if not curve:
            continue
        x0, y0 = k * w + 40, 20
        losses = [v for _, v in curve]
        lo, hi = math.log10(min(losses)), math.log10(max(losses))
        points = [(x0 + (w - 60) * s / curve[-1][0],
                   y0 + (h - 50) * (1 - (math.log10(v) - lo) / max(hi - lo, 1e-9))) for s, v in curve]
        draw.rectangle((x0, y0, x0 + w - 60, y0 + h - 50), outline="grey")
        draw.line(points, fill=(30, 90, 200), width=2)
        draw.text((x0, 4), f"{name}: {log.data[name]['seconds'] // 60} min", fill="black")
        draw.text((x0, h - 26), f"steps 0..{curve[-1][0]}   loss {max(losses):.3f} -> {losses[-1]:.3f} (log)",
                  fill="black")
    fig.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help=f"where the models go (default {toy.TRAINED}; with --quick a temporary folder)")
    ap.add_argument("--stage", choices=["all", *STEPS, "demo-input"], default="all")
    ap.add_argument("--quick", action="store_true", help="50x fewer steps and scenes: check the stages run")
    args = ap.parse_args()
    global QUICK
    QUICK = 50 if args.quick else 1
    if args.out is None:  # a quick check never overwrites the committed weights
        args.out = Path(tempfile.mkdtemp(prefix="shapes-quick-")) if args.quick else toy.TRAINED
        print(f"writing to {args.out}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    log = Log(args.out / "train_log.json")
    stages = {"vae": train_vae, "base": train_base, "lora": train_lora, "embedding": train_embedding,
              "clipseg": train_clipseg, "demo-input": write_demo_input}
    for name, fn in stages.items():
        if args.stage in ("all", name):
            fn(args.out, log)
            if name in STEPS:
                draw_curves(log, args.out / "loss.png")


if __name__ == "__main__":
    main()
