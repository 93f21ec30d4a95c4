"""Write a diffusers SD1.x or SDXL pipeline as an original single-file checkpoint (the LDM / SGM key
layout that community `.safetensors` checkpoints use): the inverse of diffusers' single-file loader,
for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def _unet_prefixes(config: dict[str, Any]) -> list[tuple[str, str]]:
    lpb, down, up = config["layers_per_block"], config["down_block_types"], config["up_block_types"]
    n = len(down)
    pairs: list[tuple[str, str]] = []
    for i in range(n):
        for j in range(lpb):
            pairs.append((f"input_blocks.{(lpb + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if "CrossAttn" in down[i]:
                pairs.append((f"input_blocks.{(lpb + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            pairs.append((f"input_blocks.{(lpb + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        for j in range(lpb + 1):
            pairs.append((f"output_blocks.{(lpb + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if "CrossAttn" in up[i]:
                pairs.append((f"output_blocks.{(lpb + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            slot = 2 if "CrossAttn" in up[i] else 1
            pairs.append((f"output_blocks.{(lpb + 1) * i + lpb}.{slot}.", f"up_blocks.{i}.upsamplers.0."))
    pairs += [("middle_block.1.", "mid_block.attentions.0."), ("middle_block.0.", "mid_block.resnets.0."),
              ("middle_block.2.", "mid_block.resnets.1.")]
    return pairs


_UNET_FIXED = {
    "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",  # SDXL
    "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
}
_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    prefixes = _unet_prefixes(config)
    for key, value in state.items():
        new = key
        for hf, sd in _UNET_FIXED.items():
            if new.startswith(hf):
                new = sd + new[len(hf):]
        if "resnets" in new:
            for hf, sd in _RESNET:
                new = new.replace(hf, sd)
        for sd, hf in prefixes:
            if new.startswith(hf):
                new = sd + new[len(hf):]
                break
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    n, lpb = len(config["down_block_types"]), config["layers_per_block"]
    pairs = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"),
             ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(n):
        pairs += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(lpb)]
        pairs += [(f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.") for j in range(lpb + 1)]
        if i < n - 1:
            pairs += [(f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."),
                      (f"up.{n - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0.")]
    pairs += [(f"mid.block_{i + 1}.", f"mid_block.resnets.{i}.") for i in range(2)]
    attn = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    out = {}
    for key, value in state.items():
        new = key
        for sd, hf in pairs:
            new = new.replace(hf, sd)
        if "attentions" in key or "mid.attn_1." in new:
            for sd, hf in attn:
                new = new.replace(hf, sd)
            if new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and value.dim() == 2:
                value = value.reshape(*value.shape, 1, 1)  # LDM's attention projections are 1x1 convs
        out["first_stage_model." + new] = value
    return out


def _hf_text_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP text-model keys with their "text_model." prefix (newer transformers flatten it away)."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
            for k, v in state.items() if not k.endswith("position_ids")}


def text_encoder_to_ldm(state: dict[str, torch.Tensor], prefix: str = "cond_stage_model.transformer."
                        ) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in _hf_text_keys(state).items()}


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection as OpenCLIP keys (SDXL's second text encoder):
    q, k and v joined into in_proj, the projection transposed."""
    state = _hf_text_keys(state)
    fixed = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    out = {prefix + ldm: state[hf] for hf, ldm in fixed.items()}
    out[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    layers = sorted({int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        hf, ldm = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[f"{ldm}attn.in_proj_{part}"] = torch.cat([state[f"{hf}self_attn.{x}_proj.{part}"] for x in "qkv"])
            out[f"{ldm}attn.out_proj.{part}"] = state[f"{hf}self_attn.out_proj.{part}"]
            out[f"{ldm}ln_1.{part}"] = state[f"{hf}layer_norm1.{part}"]
            out[f"{ldm}ln_2.{part}"] = state[f"{hf}layer_norm2.{part}"]
            out[f"{ldm}mlp.c_fc.{part}"] = state[f"{hf}mlp.fc1.{part}"]
            out[f"{ldm}mlp.c_proj.{part}"] = state[f"{hf}mlp.fc2.{part}"]
    return out


def write_single_file(pipe: Any, path: Path) -> Path:
    state: dict[str, torch.Tensor] = {}
    state.update(unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config)))
    state.update(vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)))
    if getattr(pipe, "text_encoder_2", None) is None:
        state.update(text_encoder_to_ldm(pipe.text_encoder.state_dict()))
    else:  # SDXL (SGM layout): CLIP-L as transformers keys, OpenCLIP-G as OpenCLIP keys
        state.update(text_encoder_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        state.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
