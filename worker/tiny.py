"""Write a tiny random-weight SD1.5-architecture pipeline, and LoRA and embedding files that fit
it: for the demo, tests and benchmarks.

Same components and code paths as Stable Diffusion 1.5 (CLIP text encoder, UNet with cross
attention, KL VAE), scaled down so a 64x64 image renders in well under a second on a CPU.
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
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def build_tiny_sd15(seed: int = 0) -> object:
    import tempfile

    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
        block_out_channels=(16, 32, 32, 32), norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32, bos_token_id=512,
        eos_token_id=513, pad_token_id=513,
    ))
    with torch.no_grad():  # trained CLIP norms have biases: hidden states whose mean is not zero
        getattr(text_encoder, "text_model", text_encoder).final_layer_norm.bias.normal_(0.05, 0.1)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer(f"{tmp}/vocab.json", f"{tmp}/merges.txt", model_max_length=77)
    scheduler = PNDMScheduler.from_config({**SD_SCHEDULER, "skip_prk_steps": True})
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def write_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Save the tiny pipeline as a diffusers folder (safetensors). Same seed, same weights."""
    pipe = build_tiny_sd15(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(folder), safe_serialization=True)  # type: ignore[attr-defined]
    return folder


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _lora_layers(pipe: Any, seed: int, strength: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """peft-layout state dicts of a random LoRA on the UNet and the text encoder."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    unet, text_encoder = pipe.unet, pipe.text_encoder
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS), unet, adapter_name="t")
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=TEXT_TARGETS), text_encoder,
                            adapter_name="t")
    with torch.no_grad():  # peft starts B at zero (a no-op LoRA): give it weights that change images
        for module in (unet, text_encoder):
            for name, param in module.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, strength)
    return (get_peft_model_state_dict(unet, adapter_name="t"),
            get_peft_model_state_dict(text_encoder, adapter_name="t"))


def _kohya(peft_sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """peft keys -> the kohya layout of A1111/Civitai SD1 files:
    `lora_unet_down_blocks_0_..._to_q.lora_down.weight`, `lora_te_text_model_..._q_proj.alpha`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in peft_sd.items():
        module, _, part = key.partition(".lora_")
        name = prefix + module.replace(".", "_")
        out[f"{name}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = value.contiguous()
        if part.startswith("A"):
            out[f"{name}.alpha"] = torch.tensor(float(value.shape[0]))  # alpha = rank: scale 1
    return out


def write_tiny_lora(path: Path, seed: int, kohya: bool = False, strength: float = 0.3) -> Path:
    """A random LoRA for the tiny pipeline (fresh copy: the caller's pipeline is not touched)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers

    unet_sd, text_sd = _lora_layers(build_tiny_sd15(), seed, strength)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kohya:
        save_file(_kohya(unet_sd, "lora_unet_") | _kohya(text_sd, "lora_te_text_model_"), str(path))
    else:
        StableDiffusionPipeline.save_lora_weights(
            str(path.parent), unet_lora_layers=convert_state_dict_to_diffusers(unet_sd),
            text_encoder_lora_layers=convert_state_dict_to_diffusers(text_sd), weight_name=path.name)
    return path


def write_tiny_embedding(path: Path, seed: int, vectors: int = 2, dim: int = 32, a1111: bool = True) -> Path:
    """A random textual-inversion embedding of `vectors` tokens, in A1111's or diffusers' layout."""
    generator = torch.Generator().manual_seed(seed)
    emb = torch.randn(vectors, dim, generator=generator)
    path.parent.mkdir(parents=True, exist_ok=True)
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


def write_tiny_assets(folder: Path) -> dict[str, Path]:
    """The demo's LoRAs, embedding and mask model: tiny-detail (diffusers layout), tiny-grain (kohya
    layout), tiny-sparkle (an A1111 embedding), tiny-clipseg (a CLIPSeg folder)."""
    return {
        "tiny-detail": write_tiny_lora(folder / "loras" / "tiny-detail.safetensors", seed=1),
        "tiny-grain": write_tiny_lora(folder / "loras" / "tiny-grain.safetensors", seed=2, kohya=True),
        "tiny-sparkle": write_tiny_embedding(folder / "embeddings" / "tiny-sparkle.safetensors", seed=3),
        "tiny-clipseg": write_tiny_clipseg(folder / "mask_models" / "tiny-clipseg"),
    }
