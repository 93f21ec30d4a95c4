from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from sdfarm.errors import InvalidInput, UnknownModel
from sdfarm.models import HashCache, Registry, folder_sha256, parse_registry
from sdfarm.settings import Settings


def test_single_file_identity_is_its_sha256_and_a1111_short_hash(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"weights" * 1000)
    reg = Registry(parse_registry("models:\n  m:\n    file: model.safetensors\n", "r", tmp_path), HashCache(tmp_path))
    expected = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert reg.identity("m") == expected
    assert reg.get("m").short_hash(reg.cache) == expected[:10]


def test_hash_cache_reuses_and_notices_changes(tmp_path: Path) -> None:
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a")
    cache = HashCache(tmp_path / "cache")
    first = cache.file_sha256(f)
    assert HashCache(tmp_path / "cache").file_sha256(f) == first  # persisted
    f.write_bytes(b"bb")
    assert cache.file_sha256(f) != first


def test_folder_identity_covers_weights_and_configs(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"1")
    cache = HashCache(tmp_path / "c")
    a = folder_sha256(tmp_path, cache)
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"2")
    assert folder_sha256(tmp_path, cache) != a


def test_pickle_checkpoints_are_refused_unless_opted_in(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"model\.ckpt is a pickle file"):
        parse_registry("models:\n  m:\n    file: model.ckpt\n", "r", tmp_path)
    entries = parse_registry("models:\n  m:\n    file: model.ckpt\n    allow_pickle: true\n", "r", tmp_path)
    assert entries["m"].allow_pickle


def test_registry_entry_needs_exactly_one_source(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="set exactly one of path, file, s3, hub"):
        parse_registry("models:\n  m:\n    path: a\n    hub: b/c\n", "r", tmp_path)
    with pytest.raises(InvalidInput, match=r"model 'm': entry: Value error, an s3 checkpoint needs its sha256"
                                           r" \(workers verify the download\) and config:"):
        parse_registry("models:\n  m: {s3: ckpt/m.safetensors, sha256: '" + "a" * 64 + "'}\n", "r", tmp_path)
    with pytest.raises(InvalidInput, match=r"m\.ckpt is a pickle file"):
        parse_registry("models:\n  m: {s3: m.ckpt, sha256: '" + "a" * 64 + "', config: c}\n", "r", tmp_path)
    with pytest.raises(InvalidInput, match=r"must not contain '\.\.'"):
        parse_registry("models:\n  m: {s3: a/../m.safetensors, sha256: '" + "a" * 64 + "', config: c}\n", "r",
                       tmp_path)
    with pytest.raises(InvalidInput, match="model 'Bad Name'"):
        parse_registry("models:\n  Bad Name:\n    hub: b/c\n", "r", tmp_path)


def test_names_only_never_paths(tmp_path: Path) -> None:
    reg = Registry(parse_registry("models:\n  m:\n    hub: a/b\n", "r", tmp_path), HashCache(tmp_path))
    for name in ("../../etc/passwd", "/etc/passwd", "m/../m", "M"):
        with pytest.raises(UnknownModel, match="allowed: m"):
            reg.get(name)


def test_missing_files_are_named(tmp_path: Path) -> None:
    reg = Registry(parse_registry("models:\n  m:\n    path: nowhere\n", "r", tmp_path), HashCache(tmp_path))
    with pytest.raises(UnknownModel, match="is not a diffusers folder"):
        reg.identity("m")


def test_registry_from_file_and_env(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text("models:\n  a:\n    hub: x/a\n")
    reg = Registry.from_settings(Settings(models_file=tmp_path / "models.yaml", models="models: {b: {hub: x/b}}",
                                          cache_dir=tmp_path))
    assert reg.names() == ["a", "b"]
    with pytest.raises(InvalidInput, match=r"model registry .*missing\.yaml"):
        Registry.from_settings(Settings(models_file=tmp_path / "missing.yaml", cache_dir=tmp_path))


def test_a1111_lora_hash_skips_the_safetensors_header(tmp_path: Path) -> None:
    """A1111 names LoRAs by the sha256 of the tensor bytes after the header ("addnet" hash): a file
    whose metadata changes keeps it; the whole-file sha256 (our identity) changes."""
    import torch
    from safetensors.torch import save_file

    from sdfarm.models import addnet_hash

    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(tensors, str(a), metadata={"ss_output_name": "a"})
    save_file(tensors, str(b), metadata={"ss_output_name": "a longer name"})
    assert addnet_hash(a) == addnet_hash(b)
    assert hashlib.sha256(a.read_bytes()).digest() != hashlib.sha256(b.read_bytes()).digest()
    data = a.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert addnet_hash(a) == hashlib.sha256(data[8 + header:]).hexdigest()


def test_a1111_lora_hash_is_the_sshs_metadata_else_the_addnet_hash(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from sdfarm.models import a1111_lora_hash, addnet_hash

    tensors = {"w": torch.ones(2)}
    plain, tagged = tmp_path / "plain.safetensors", tmp_path / "tagged.safetensors"
    save_file(tensors, str(plain))
    save_file(tensors, str(tagged), metadata={"sshs_model_hash": "f" * 64})
    assert a1111_lora_hash(plain) == addnet_hash(plain)[:12]
    assert a1111_lora_hash(tagged) == "f" * 12
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes((2).to_bytes(8, "little") + b"{}garbage")
    assert a1111_lora_hash(damaged) == addnet_hash(damaged)[:12]  # refused where it loads, not here
