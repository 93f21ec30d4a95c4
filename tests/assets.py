"""Tiny LoRA and textual-inversion files for the tiny SD1.5 pipeline, written by the tests.

LoRAs are made with peft on the UNet's attention and the text encoder's projections, then saved
in the two layouts users have: diffusers (peft keys) and kohya/A1111 (`lora_unet_...`, `lora_te_...`).
Embeddings are saved as A1111 writes them (`emb_params`) and as diffusers does (`{token: tensor}`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

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


def write_lora(path: Path, seed: int, kohya: bool = False, strength: float = 0.3) -> Path:
    """A random LoRA for the tiny pipeline (fresh copy: the caller's pipeline is not touched)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    from worker.tiny import build_tiny_sd15

    unet_sd, text_sd = _lora_layers(build_tiny_sd15(), seed, strength)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kohya:
        save_file(_kohya(unet_sd, "lora_unet_") | _kohya(text_sd, "lora_te_text_model_"), str(path))
    else:
        StableDiffusionPipeline.save_lora_weights(
            str(path.parent), unet_lora_layers=convert_state_dict_to_diffusers(unet_sd),
            text_encoder_lora_layers=convert_state_dict_to_diffusers(text_sd), weight_name=path.name)
    return path


def write_embedding(path: Path, seed: int, vectors: int = 2, dim: int = 32, a1111: bool = True) -> Path:
    """A random textual-inversion embedding of `vectors` tokens, in A1111's or diffusers' layout."""
    generator = torch.Generator().manual_seed(seed)
    emb = torch.randn(vectors, dim, generator=generator)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": emb} if a1111 else {"<learned>": emb}, str(path))
    return path
