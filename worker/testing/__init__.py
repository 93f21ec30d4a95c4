"""Test and demo support: tiny random-weight SD1.5- and SDXL-architecture pipelines, and LoRA,
embedding, VAE, mask-model and upscaler files that fit them, for the demo, tests and benchmarks.

Same components and code paths as Stable Diffusion 1.5 (CLIP text encoder, UNet with cross
attention, KL VAE) and SDXL (two text encoders, the second with a projection for the pooled
embedding; a UNet with "text_time" size conditioning; a VAE that asks to be upcast in fp16),
scaled down so a 64x64 image renders in well under a second on a CPU. The SDXL encoders have
different widths (32 and 48), as CLIP-L and OpenCLIP-G do (768 and 1280), so a mix-up shows.
No download: the tokenizer's vocabulary is written here (byte-level, no merges).

LoRAs are made with peft on the UNet's attention and the text encoder's projections, then saved
in the two layouts users have: diffusers (peft keys) and kohya/A1111 (`lora_unet_...`, `lora_te_...`).
Embeddings are saved as A1111 writes them (`emb_params`) and as diffusers does (`{token: tensor}`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# Stable Diffusion 1.5's scheduler config (its scheduler_config.json), which the tiny pipelines ship
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_tokenizer_files(folder: Path) -> None:
    """Write a byte-level CLIP vocabulary (no merges) as `vocab.json` and `merges.txt` into `folder`:
    every tiny pipeline's tokenizer, with no download."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def build_tokenizer(pad_token: str = "<|endoftext|>") -> Any:
    """A CLIPTokenizer over the byte-level vocabulary of `write_tokenizer_files` (77 tokens).
    `pad_token` "!" (id 0) pads as OpenCLIP does; the default end token pads as CLIP-L does."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        return CLIPTokenizer(f"{tmp}/vocab.json", f"{tmp}/merges.txt", model_max_length=77, pad_token=pad_token)


def _text_encoder(hidden: int, with_projection: bool = False) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=514, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=hidden, bos_token_id=512,
        eos_token_id=513, pad_token_id=513,
    )
    encoder: Any = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    with torch.no_grad():  # trained CLIP norms have biases: hidden states whose mean is not zero
        getattr(encoder, "text_model", encoder).final_layer_norm.bias.normal_(0.05, 0.1)
    return encoder


def build_tiny_vae(scaling_factor: float = 0.18215) -> Any:
    """A random-weight AutoencoderKL of the tiny pipelines (8x down, 4 latent channels, as SD's VAE).
    `scaling_factor` 0.18215 is SD1.5's, 0.13025 SDXL's. Seed torch first for the same weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
        block_out_channels=(16, 32, 32, 32), norm_num_groups=16, scaling_factor=scaling_factor,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )


def build_tiny(family: str = "sd15", seed: int = 0) -> Any:
    """The tiny pipeline of a family ("sd15", "sdxl" or "sdxl-refiner"). Same seed, same weights."""
    if family == "sdxl":
        return build_tiny_sdxl(seed)
    if family == "sdxl-refiner":
        return build_tiny_sdxl_refiner(seed)
    return build_tiny_sd15(seed)


def build_tiny_sdxl_refiner(seed: int = 0) -> Any:
    """The tiny SDXL-refiner-architecture pipeline: OpenCLIP-G alone (the tiny SDXL's second encoder's
    shape), a UNet conditioned on its states and on five size and aesthetic-score numbers, SDXL's VAE
    layout; it loads as SDXL's img2img pipeline with requires_aesthetics_score, as the real refiner."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    torch.manual_seed(seed)
    unet = _tiny_xl_unet(48, 5)  # OpenCLIP-G's hidden states alone; size, crop and aesthetic score
    return StableDiffusionXLImg2ImgPipeline(
        vae=build_tiny_vae(scaling_factor=0.13025), text_encoder=None, text_encoder_2=_text_encoder(48, True),
        tokenizer=None, tokenizer_2=build_tokenizer(pad_token="!"), unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SD_SCHEDULER), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False,
    )


def _tiny_xl_unet(cross_attention_dim: int, time_ids: int) -> Any:
    """The tiny SDXL-layout UNet: conditioned on text states of `cross_attention_dim` and on `time_ids`
    numbers (8 features each) beside the pooled embedding (48, OpenCLIP-G's)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 2), norm_num_groups=16, cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=time_ids * 8 + 48,
    )


def build_tiny_sdxl(seed: int = 0) -> Any:
    """The tiny SDXL-architecture pipeline (two text encoders, size-conditioned UNet). Same seed, same weights."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    unet = _tiny_xl_unet(32 + 48, 6)  # both encoders' hidden states side by side; six size numbers
    vae = build_tiny_vae(scaling_factor=0.13025)  # force_upcast stays True, as SDXL's own VAE
    text_encoder, text_encoder_2 = _text_encoder(32), _text_encoder(48, with_projection=True)
    scheduler = EulerDiscreteScheduler.from_config(SD_SCHEDULER)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=build_tokenizer(),
        tokenizer_2=build_tokenizer(pad_token="!"),  # OpenCLIP pads with id 0 ("!"), CLIP-L with its end token
        unet=unet, scheduler=scheduler, add_watermarker=False,
    )


def build_tiny_sd15(seed: int = 0) -> Any:
    """The tiny SD1.5-architecture pipeline (one CLIP text encoder). Same seed, same weights."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16,
    )
    vae = build_tiny_vae()
    text_encoder = _text_encoder(32)
    tokenizer = build_tokenizer()
    scheduler = PNDMScheduler.from_config({**SD_SCHEDULER, "skip_prk_steps": True})
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def write_tiny_model(folder: Path, seed: int = 0, family: str = "sd15") -> Path:
    """Save the tiny pipeline as a diffusers folder (safetensors). Same seed, same weights."""
    pipe = build_tiny(family, seed)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def random_lora_layers(pipe: Any, seed: int, strength: float) -> dict[str, dict[str, torch.Tensor]]:
    """peft-layout state dicts of a random rank-4 LoRA on the UNet and each text encoder, by component
    ("unet", "text_encoder", "text_encoder_2"); weights drawn with standard deviation `strength`.
    The adapter is injected into `pipe`'s modules: pass a pipeline of its own."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    modules = {"unet": (pipe.unet, UNET_TARGETS), "text_encoder": (pipe.text_encoder, TEXT_TARGETS)}
    if getattr(pipe, "text_encoder_2", None) is not None:
        modules["text_encoder_2"] = (pipe.text_encoder_2, TEXT_TARGETS)
    layers = {}
    for component, (module, targets) in modules.items():
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets), module, adapter_name="t")
        with torch.no_grad():  # peft starts B at zero (a no-op LoRA): give it weights that change images
            for name, param in module.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, strength)
        layers[component] = get_peft_model_state_dict(module, adapter_name="t")
    return layers


# kohya/A1111 key prefixes of each component (SDXL files name the text encoders te1 and te2)
_KOHYA_PREFIXES = {
    "sd15": {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"},
    "sdxl": {"unet": "lora_unet_", "text_encoder": "lora_te1_text_model_", "text_encoder_2": "lora_te2_text_model_"},
}


def peft_to_kohya(peft_sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """One component's peft-layout LoRA state dict -> the kohya layout of A1111/Civitai files, keys
    under `prefix` (such as "lora_unet_" or "lora_te_text_model_"):
    `lora_unet_down_blocks_0_..._to_q.lora_down.weight`, `lora_te_text_model_..._q_proj.alpha`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in peft_sd.items():
        module, _, part = key.partition(".lora_")
        # CLIPTextModelWithProjection nests the model under text_model (CLIPTextModel no longer does)
        name = prefix + module.removeprefix("text_model.").replace(".", "_")
        out[f"{name}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = value.contiguous()
        if part.startswith("A"):
            out[f"{name}.alpha"] = torch.tensor(float(value.shape[0]))  # alpha = rank: scale 1
    return out


def write_tiny_lora(path: Path, seed: int, kohya: bool = False, strength: float = 0.3, family: str = "sd15") -> Path:
    """A random LoRA for the tiny pipeline of a family (fresh copy: no caller's pipeline is touched)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers

    pipe = build_tiny(family)
    layers = random_lora_layers(pipe, seed, strength)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kohya:
        prefixes = _KOHYA_PREFIXES[family]
        save_file({k: v for component, sd in layers.items() for k, v in peft_to_kohya(sd, prefixes[component]).items()},
                  str(path))
    else:
        type(pipe).save_lora_weights(
            str(path.parent), weight_name=path.name,
            **{f"{component}_lora_layers": convert_state_dict_to_diffusers(sd) for component, sd in layers.items()})
    return path


def write_tiny_embedding(path: Path, seed: int, vectors: int = 2, dim: int = 32, a1111: bool = True,
                         family: str = "sd15") -> Path:
    """A random textual-inversion embedding of `vectors` tokens, in A1111's or diffusers' layout.
    SDXL: one tensor per text encoder, `clip_l` (width 32) and `clip_g` (48), as A1111 saves them."""
    generator = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if family == "sdxl":
        save_file({"clip_l": torch.randn(vectors, 32, generator=generator),
                   "clip_g": torch.randn(vectors, 48, generator=generator)}, str(path))
        return path
    emb = torch.randn(vectors, dim, generator=generator)
    save_file({"emb_params": emb} if a1111 else {"<learned>": emb}, str(path))
    return path


def write_tiny_clipseg(folder: Path, seed: int = 0) -> Path:
    """A tiny random-weight CLIPSeg (text -> mask) with its processor, as a transformers folder."""
    import tempfile

    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        CLIPTokenizer,
        ViTImageProcessor,
    )

    torch.manual_seed(seed)
    config = CLIPSegConfig(
        text_config={"vocab_size": 514, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": 512,
                     "eos_token_id": 513, "pad_token_id": 513},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 64, "patch_size": 16},
        projection_dim=32, reduce_dim=16, extract_layers=[0, 1], decoder_num_attention_heads=4,
        decoder_intermediate_size=32,
    )
    model = CLIPSegForImageSegmentation(config)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer(f"{tmp}/vocab.json", f"{tmp}/merges.txt", model_max_length=77)
    images = ViTImageProcessor(do_resize=True, size={"height": 64, "width": 64}, image_mean=[0.5] * 3,
                               image_std=[0.5] * 3)
    model.save_pretrained(folder)
    CLIPSegProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def write_tiny_vae(folder: Path, seed: int, family: str = "sd15") -> Path:
    """A random VAE that fits the tiny pipeline of a family, as a diffusers AutoencoderKL folder."""
    torch.manual_seed(seed)
    vae = build_tiny_vae(scaling_factor=0.13025 if family == "sdxl" else 0.18215)
    vae.save_pretrained(str(folder), safe_serialization=True)
    return folder


def write_tiny_upscaler(path: Path, seed: int, scale: int = 2, filters: int = 8, blocks: int = 1) -> Path:
    """A tiny ESRGAN (RRDBNet, old-arch keys as A1111's ESRGAN files have them), as .safetensors.
    (filters=64, blocks=23, scale=4 is the real 4x ESRGAN architecture, for benchmarks.)

    The path through the network starts as an identity (the first three feature channels carry the
    image, the upsampling repeats pixels) and every weight gets random noise on top: the output is
    the image, enlarged and visibly altered, so a demo shows what happened and a test can tell the
    model from Lanczos. The residual blocks are random, so the receptive field is the full network's.
    """
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    net = ESRGAN(in_nc=3, out_nc=3, num_filters=filters, num_blocks=blocks, scale=scale)
    trunk = {id(m) for m in net.model[1].modules()}
    with torch.no_grad():
        for module in net.modules():
            if not isinstance(module, torch.nn.Conv2d):
                continue
            module.weight.normal_(0.0, 0.02)
            assert module.bias is not None
            module.bias.zero_()
            if id(module) not in trunk:  # the identity path: channel c of the input to channel c
                for c in range(3):
                    module.weight[c, c, 1, 1] += 1.0
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def write_tiny_sdxl_assets(folder: Path) -> dict[str, Path]:
    """The SDXL demo's files: xl-detail (a diffusers-layout LoRA), xl-grain (kohya layout), xl-sparkle
    (an A1111 SDXL embedding: clip_l and clip_g), xl-vae (a VAE folder)."""
    return {
        "xl-detail": write_tiny_lora(folder / "loras" / "xl-detail.safetensors", seed=11, family="sdxl"),
        "xl-grain": write_tiny_lora(folder / "loras" / "xl-grain.safetensors", seed=12, kohya=True, family="sdxl"),
        "xl-sparkle": write_tiny_embedding(folder / "embeddings" / "xl-sparkle.safetensors", seed=13, family="sdxl"),
        "xl-vae": write_tiny_vae(folder / "vaes" / "xl-vae", seed=14, family="sdxl"),
    }


def write_tiny_assets(folder: Path) -> dict[str, Path]:
    """The demo's LoRAs, embedding, mask model and upscaler: tiny-detail (diffusers layout), tiny-grain
    (kohya layout), tiny-sparkle (an A1111 embedding), tiny-clipseg (a CLIPSeg folder), tiny-esrgan (a
    2x ESRGAN file; it fits any model family)."""
    return {
        "tiny-detail": write_tiny_lora(folder / "loras" / "tiny-detail.safetensors", seed=1),
        "tiny-grain": write_tiny_lora(folder / "loras" / "tiny-grain.safetensors", seed=2, kohya=True),
        "tiny-sparkle": write_tiny_embedding(folder / "embeddings" / "tiny-sparkle.safetensors", seed=3),
        "tiny-clipseg": write_tiny_clipseg(folder / "mask_models" / "tiny-clipseg"),
        "tiny-esrgan": write_tiny_upscaler(folder / "upscalers" / "tiny-esrgan.safetensors", seed=4),
    }
