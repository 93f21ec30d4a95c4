"""A checkpoint registered with an s3: source: the worker downloads it once into its cache, verifies
its sha256, and only then loads it; a checkpoint whose bytes differ is never loaded. Real S3."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from sdfarm.errors import WorkerFatal
from sdfarm.jobs import RenderJob
from sdfarm.models import HashCache, Registry, parse_registry
from sdfarm.settings import Settings
from sdfarm.store import Store
from tests.ldm import write_single_file
from worker.assets import AssetFiles
from worker.main import fetch_checkpoint
from worker.pipeline import load_model
from worker.render import render
from worker.testing import build_tiny_sd15


def test_an_s3_checkpoint_is_fetched_once_verified_and_rendered(store: Store, tiny_model_dir: Path,
                                                                tmp_path: Path) -> None:
    ckpt = write_single_file(build_tiny_sd15(), tmp_path / "tiny.safetensors")
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    store.client.put_object(Bucket=store.bucket, Key="models/checkpoints/tiny.safetensors", Body=ckpt.read_bytes())
    store.client.put_object(Bucket=store.bucket, Key="models/checkpoints/swapped.safetensors",
                            Body=ckpt.read_bytes() + b"\0")
    text = (f"models:\n  from-s3: {{s3: checkpoints/tiny.safetensors, sha256: '{sha}', config: {tiny_model_dir}}}\n"
            f"  swapped: {{s3: checkpoints/swapped.safetensors, sha256: '{sha}', config: {tiny_model_dir}}}\n")
    cache = tmp_path / "cache"
    registry = Registry(parse_registry(text, "t", tmp_path), HashCache(cache))
    files = AssetFiles(registry, store, cache)
    (cache / "assets").mkdir(parents=True)
    (cache / "assets" / f"{sha}.safetensors.0123abcd.part").write_bytes(b"left by a worker killed mid-download")

    loaded = load_model(registry, "from-s3", "cpu", files)
    cached = cache / "assets" / f"{sha}.safetensors"
    assert cached.is_file()
    assert loaded.identity == sha
    job = RenderJob(model="from-s3", model_hash=sha, prompt="a lighthouse", seed=3, width=64, height=64, steps=4)
    image = np.asarray(render(loaded, [job])[0])
    assert image.std() > 0
    assert not list((cache / "assets").glob("*.part"))  # the stale download is gone
    mtime = cached.stat().st_mtime_ns
    again = load_model(registry, "from-s3", "cpu", AssetFiles(registry, store, cache))  # a restarted worker
    assert cached.stat().st_mtime_ns == mtime  # verified from the cache, not downloaded again
    assert again.identity == sha

    # the worker's parent process fetches it before any pool process starts (no start-up timeout)
    parent = Settings(cache_dir=tmp_path / "parent-cache")
    fetch_checkpoint(registry, store, parent, "from-s3")
    assert (parent.cache_dir / "assets" / f"{sha}.safetensors").is_file()
    with pytest.raises(WorkerFatal, match=r"cannot serve model 'swapped': .*has sha256 .*; not loaded"):
        fetch_checkpoint(registry, store, parent.model_copy(update={"cache_dir": tmp_path / "p2"}), "swapped")

    fresh = tmp_path / "fresh-cache"  # (a cache that holds the verified file would serve it: same sha256)
    with pytest.raises(WorkerFatal, match=r"cannot serve model 'swapped': model 'swapped': s3://.*/models/"
                                          r"checkpoints/swapped\.safetensors has sha256 .*; not loaded"):
        load_model(registry, "swapped", "cpu", AssetFiles(registry, store, fresh))
    assert not list((fresh / "assets").glob("*.safetensors*"))  # nothing half-written stays
