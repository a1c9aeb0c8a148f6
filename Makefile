# Fresh machine: `make test` or `make demo` installs everything into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
JOBS ?= 2

.PHONY: venv test demo bench big-demo cpp-test clean

venv: $(STAMP)

# Re-install only when the dependency list changes; torch is pinned so pip takes the CPU build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: venv cpp-test
	$(PY) -m pytest -q -n $(JOBS) tests

demo: venv
	$(VENV)/bin/gptj-popxl demo

bench: venv
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-warmup=on --benchmark-min-rounds=20

# GPT-J 6B on one host: a random 12 GB float16 checkpoint, then generation with the decoder layers
# streamed from memory-mapped files (needs ~36 GB of disk and under 20 GB of memory; many minutes on 2 cores).
BIG_DIR ?= big-demo
big-demo: venv
	$(VENV)/bin/gptj-popxl random-checkpoint --config gpt-j-6b --dtype float16 --output $(BIG_DIR)/gpt-j-6b-random
	$(VENV)/bin/gptj-popxl generate --model $(BIG_DIR)/gpt-j-6b-random --offload --dtype float16 \
		--prompt-ids 50256,464,3290,318,257 --max-new-tokens 8

# The C++ kernels' own tests, with the cmake that `make venv` installs.
cpp-test: venv
	$(VENV)/bin/cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
	$(VENV)/bin/cmake --build build -j $(JOBS)
	$(VENV)/bin/ctest --test-dir build --output-on-failure

clean:
	rm -rf build .pytest_cache .benchmarks
