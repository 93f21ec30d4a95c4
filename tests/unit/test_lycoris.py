"""LyCORIS files (issue 10, item 12): LoCon (LoRA on conv layers too) loads through diffusers and peft;
the types diffusers cannot load (LoHa, LoKr, OFT, (IA)^3, GLoRA, Full) are refused by name, at submit
for local files and at load for files from the bucket, instead of failing with diffusers' key error."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sdfarm.batchfile import plan_batch
from sdfarm.errors import AssetError, BatchInvalid
from sdfarm.jobs import LoraRef, RenderJob
from sdfarm.models import HashCache, Registry, lora_refusal, parse_assets, parse_registry
from worker.adapters import adapter_name
from worker.pipeline import LoadedModel, load_model
from worker.render import render
from worker.testing import write_tiny_lora

SHA = "ab" * 32


def kohya(tmp_path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(write_tiny_lora(tmp_path / "kohya.safetensors", seed=5, kohya=True)))


def locon(tmp_path: Path, loaded: LoadedModel) -> Path:
    """A kohya LoRA plus a conv layer's lora_down (3x3) and lora_up (1x1), as LyCORIS saves LoCon."""
    layers = kohya(tmp_path)
    conv = loaded.pipe.unet.down_blocks[0].resnets[0].conv1
    conv = getattr(conv, "base_layer", conv)  # wrapped by peft once a LoCon has loaded
    generator = torch.Generator().manual_seed(3)
    base = "lora_unet_down_blocks_0_resnets_0_conv1"
    layers[f"{base}.lora_down.weight"] = torch.randn(2, conv.in_channels, 3, 3, generator=generator) * 0.5
    layers[f"{base}.lora_up.weight"] = torch.randn(conv.out_channels, 2, 1, 1, generator=generator) * 0.5
    layers[f"{base}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "locon.safetensors"
    save_file(layers, str(path))
    return path


def lycoris(tmp_path: Path, kind: str) -> Path:
    """A file whose tensors are named as LyCORIS names a LoHa's or a LoKr's."""
    layers = kohya(tmp_path)
    out = {}
    for key, value in layers.items():
        if key.endswith(".lora_down.weight"):
            base = key.removesuffix(".lora_down.weight")
            up = layers[f"{base}.lora_up.weight"]
            if kind == "LoHa":
                out |= {f"{base}.hada_w1_a": up, f"{base}.hada_w1_b": value, f"{base}.hada_w2_a": up.clone(),
                        f"{base}.hada_w2_b": value.clone()}
            else:
                out |= {f"{base}.lokr_w1": torch.ones(2, 2), f"{base}.lokr_w2": torch.ones(2, 2)}
    path = tmp_path / f"{kind.lower()}.safetensors"
    save_file(out, str(path))
    return path


@pytest.fixture(scope="module")
def loaded(registry: Registry) -> LoadedModel:
    return load_model(registry, "tiny-sd15", "cpu")


def test_a_locon_loads_and_changes_the_conv_layers_output(loaded: LoadedModel, tmp_path: Path) -> None:
    path = locon(tmp_path, loaded)
    assert lora_refusal(path) is None
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    base = {"model": "tiny-sd15", "model_hash": loaded.identity, "prompt": "a fox", "seed": 1, "width": 64,
            "height": 64, "steps": 3}
    plain = RenderJob.model_validate(base)
    with_locon = RenderJob.model_validate({**base, "loras": [{"name": "conv", "weight": 1.0, "sha256": sha}]})
    loaded.adapters.activate(with_locon.loras, (), {sha: path})
    try:
        assert type(loaded.pipe.unet.down_blocks[0].resnets[0].conv1).__module__.startswith("peft")
        a = np.asarray(render(loaded, [with_locon])[0], dtype=np.int16)
    finally:
        loaded.adapters.activate((), (), {})
    b = np.asarray(render(loaded, [plain])[0], dtype=np.int16)
    assert np.abs(a - b).max() > 0


@pytest.mark.parametrize("kind", ["LoHa", "LoKr"])
def test_loha_and_lokr_are_refused_by_name_at_load(loaded: LoadedModel, tmp_path: Path, kind: str) -> None:
    path = lycoris(tmp_path, kind)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(AssetError, match=f"lora 'x': {kind.lower()}.safetensors is a LyCORIS {kind} \\('lora_[^']*'\\):"
                                         f" diffusers loads LoRA and LoCon networks, not {kind}"):
        loaded.adapters.activate((LoraRef(name="x", weight=1.0, sha256=sha),), (), {sha: path})
    held = {name for names in loaded.pipe.get_list_adapters().values() for name in names}
    assert adapter_name(sha) not in held  # nothing half-loaded


@pytest.mark.parametrize("kind", ["LoHa", "LoKr"])
def test_loha_and_lokr_in_local_files_are_refused_at_submit(tmp_path: Path, kind: str) -> None:
    path = lycoris(tmp_path, kind)
    text = f"models: {{tiny-sd15: {{hub: test/tiny, sha256: '{SHA}'}}}}\nloras: {{net: {{file: {path.name}}}}}\n"
    registry = Registry(parse_registry(text, "r", tmp_path), HashCache(tmp_path), parse_assets(text, "r", tmp_path))
    with pytest.raises(BatchInvalid) as e:
        plan_batch("items: [{model: tiny-sd15, prompt: 'a fox <lora:net:0.8>', seed: 1}]", "b.yaml", "yaml",
                   registry, 10)
    assert f"loras.0.name: lora 'net': {path.name} is a LyCORIS {kind}" in str(e.value)


def test_a_locon_with_a_tucker_decomposition_is_refused_by_name(loaded: LoadedModel, tmp_path: Path) -> None:
    path = locon(tmp_path, loaded)
    layers = load_file(str(path))
    layers["lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight"] = torch.ones(2, 2, 3, 3)
    save_file(layers, str(path))
    refusal = lora_refusal(path)
    assert refusal is not None
    assert refusal.startswith("locon.safetensors is a LyCORIS LoCon with a Tucker (CP) decomposition")
