"""Prompt text -> text-encoder embeddings, with A1111's clip skip.

A1111 "Clip skip: N" takes the hidden state N layers from the end (1 = the last layer) and applies
the final layer norm. Computed here rather than by the pipeline so the same path serves every
text encoder layout.
"""

from __future__ import annotations

from typing import Any

import torch


def encode(pipe: Any, prompts: list[str], clip_skip: int) -> torch.Tensor:
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    if clip_skip <= 1:
        hidden: torch.Tensor = text_encoder(ids)[0]
    else:
        out = text_encoder(ids, output_hidden_states=True)
        hidden = out.hidden_states[-clip_skip]
        final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
        hidden = final_norm(hidden)
    return hidden.to(dtype=text_encoder.dtype)
