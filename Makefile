# Two entry points for a newcomer: `make run` and `make test`. Both create the virtualenv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint browser clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: a looser spec would pull gigabytes of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/sdlora train training_data/sks_star --prompt "a purple sks shape" --steps 300 --rank 8 \
		--lr 1e-3 --class-prompt "a purple shape" --num-class-images 16 --name sks_star \
		--sample-every 100 --sample-prompt "a purple sks shape on a white background"
	$(VENV)/bin/sdlora generate "a purple sks shape on a white background" \
		--lora outputs/adapters/sks_star.safetensors --compare --steps 30 --guidance 4 \
		--out outputs/images/sks_star_compare.png

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
