"""What the UNet is called with while jobs render: a test's view of the hooks around it."""

from __future__ import annotations

from typing import Any

from sdfarm.jobs import RenderJob
from worker.pipeline import LoadedModel
from worker.render import render


def unet_kwargs(loaded: LoadedModel, jobs: list[RenderJob], key: str) -> list[Any]:
    """The keyword argument `key` of every UNet call while the jobs render (None where absent), read
    in forward, after the module's pre-hooks have run."""
    seen: list[Any] = []
    original = loaded.pipe.unet.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        value = kwargs.get(key)
        seen.append(value.clone() if hasattr(value, "clone") else value)
        return original(*args, **kwargs)

    loaded.pipe.unet.forward = forward
    try:
        render(loaded, jobs)
    finally:
        del loaded.pipe.unet.forward
    return seen
