# Two commands for a fresh machine: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision as one matching pair that pip takes from this machine's disk (no download).
# On x86_64 the pair is a CUDA build that runs on the CPU too (torch 2.13.0's CPU build has no
# torchvision to match); on aarch64 a CPU build.
ifeq ($(shell uname -m),aarch64)
TORCH_SPEC ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
endif

.PHONY: install demo test unit lint clean debian-tools

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[worker,stack,dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m infra.demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Debian's packages the suite drives, where this machine lacks them (root and apt): Prometheus for the
# metrics test, Chromium for the gallery's browser test (Playwright drives it; browsers cannot be
# downloaded here). Without them those tests skip (and fail in CI).
DEBIAN_TOOLS := prometheus chromium

debian-tools:
	@missing=$$(for t in $(DEBIAN_TOOLS); do command -v $$t >/dev/null 2>&1 || echo $$t; done); \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  $$missing >/dev/null; } || echo "not installed: $$missing (their tests skip, and fail in CI)"

test: lint debian-tools
	$(VENV)/bin/pytest -q

# the fast tier for the edit-test loop: tests/unit needs no embedded stack (no Redis, S3 or workers), no lint
unit: install
	$(VENV)/bin/pytest -q -m "not slow" tests/unit

clean:
	rm -rf .sdfarm .pytest_cache .mypy_cache .ruff_cache
