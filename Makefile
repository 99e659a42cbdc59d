# Two entry points for a newcomer: `make run` and `make test`. Both create the virtualenv first and
# install exactly the versions in requirements.lock (the set the tests passed with).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
LOCK := requirements.lock
# The CPU build of torch: PyPI's Linux wheel would pull gigabytes of CUDA packages. It comes from
# PyTorch's CPU index, or from a local wheel folder where the machine has one (/opt/wheels here);
# a GPU user installs the CUDA build of the same version first (see the README).
TORCH_VERSION := 2.13.0
TORCH_INDEX ?= $(if $(wildcard /opt/wheels),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)

.PHONY: install run test lint format browser lock test-latest clean gpu-setup gpu-check

$(STAMP): pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) torch==$(TORCH_VERSION) $(TORCH_INDEX)
	$(PY) -m pip install -q -c $(LOCK) -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/sdlora ui

# Browser tests drive Debian's Chromium through Playwright (its own browser download is not used).
browser:
	@test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: install lint browser
	$(PY) -m pytest -q

# On a bare CUDA machine: the CUDA build of the same torch from PyTorch's index (CUDA_INDEX: the CUDA
# version the driver supports) with its torchvision (only diffusers' reference script needs it), then
# the locked rest with bitsandbytes. Then `make gpu-check`.
CUDA_INDEX ?= https://download.pytorch.org/whl/cu128
GPU_CHECK_OUT ?= outputs/gpu-check
gpu-setup:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION) torchvision --index-url $(CUDA_INDEX)
	$(PY) -m pip install -q -c $(LOCK) -e ".[test,cuda]"
	touch $(STAMP)

# The GPU path in one command (about 8 minutes on an H100/H200; reduced sizes without CUDA): the tests
# marked cuda, training and generation timed, the targets. REFERENCE=diffusers/examples/dreambooth adds
# the reference script's timings. Results in $(GPU_CHECK_OUT)/gpu_check.{json,md}.
gpu-check: install
	$(PY) -m benchmarks.gpu_check --out $(GPU_CHECK_OUT) $(if $(REFERENCE),--reference $(REFERENCE))

# Regenerate the lock with `uv pip compile` (every package, direct and transitive, for Linux x86_64,
# Python 3.11). torch is locked without its local label (+cpu) so the same lock serves a CUDA build.
lock: install
	$(PY) -m pip install -q uv
	echo "torch==$(TORCH_VERSION)" | $(VENV)/bin/uv pip compile pyproject.toml - --extra test --extra cuda $(TORCH_INDEX) \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --quiet \
		| sed -E 's/^torch==([0-9.]+)\+[a-z0-9]+/torch==\1/' > $(LOCK).new
	mv $(LOCK).new $(LOCK)

# Not part of CI: the newest releases pyproject.toml allows, in their own venv, so that an upgrade
# is a deliberate change (run this, then `make lock`, then commit the lock).
test-latest: browser
	python3 -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q torch==$(TORCH_VERSION) $(TORCH_INDEX)
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]"
	.venv-latest/bin/python -m pytest -q

clean:
	rm -rf $(VENV) .venv-latest .pytest_cache .ruff_cache
