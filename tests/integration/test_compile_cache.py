"""Compiled graphs shared through the bucket: a worker on a new node (empty local cache) starts from
what the first worker of its model and GPU type published, and only when the signature is right."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdfarm.models import Registry
from sdfarm.store import Store
from tests.conftest import ROOT, TINY
from worker.compile import SharedCache
from worker.pipeline import load_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECRET = b"workers-only compile cache key"

FRESH_NODE = """
import json, sys
from pathlib import Path
import torch._dynamo.utils as u
from sdfarm.models import Registry
from sdfarm.settings import Settings
from sdfarm.store import Store
from worker.compile import SharedCache
from worker.pipeline import load_model

settings = Settings()
store = Store.from_settings(settings)
load_model(Registry.from_settings(settings), sys.argv[1], "cpu", compile=True, static_batch=4,
           cache_root=Path(sys.argv[2]), shared_cache=SharedCache(store, sys.argv[3].encode()))
print(json.dumps(dict(u.counters["inductor"])))
"""


def test_a_new_node_starts_from_the_published_graphs(registry: Registry, store: Store, compile_cache: Path,
                                                     env: dict[str, str], tmp_path: Path) -> None:
    shared = SharedCache(store, SECRET)
    loaded = load_model(registry, TINY, "cpu", compile=True, static_batch=4, cache_root=compile_cache,
                        shared_cache=shared)
    key = SharedCache.key(loaded.identity, loaded.device_name, "64px-b4-default")
    blob = store.get(key)
    assert hmac.compare_digest(blob[:32], hmac.new(SECRET, blob[32:], hashlib.sha256).digest())

    out = subprocess.run([sys.executable, "-c", FRESH_NODE, TINY, str(tmp_path / "empty-cache"), SECRET.decode()],
                         env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         check=True)
    counters = json.loads(out.stdout.strip().splitlines()[-1])
    assert counters.get("fxgraph_cache_hit", 0) > 0, out.stderr[-2000:]
    assert counters.get("fxgraph_cache_miss", 0) == 0, out.stderr[-2000:]


def test_artifacts_signed_with_another_key_are_never_loaded(store: Store) -> None:
    key = SharedCache.key("f" * 64, "test-gpu", "64px-b4-default")
    data = b"compiled code an attacker with bucket access wrote"
    store.put_if_absent(key, hmac.new(b"not the workers' key", data, hashlib.sha256).digest() + data,
                        "application/octet-stream")
    assert SharedCache(store, SECRET).fetch(key) is False
    assert SharedCache(store, SECRET).fetch(SharedCache.key("e" * 64, "test-gpu", "none")) is False
