# Two commands for a newcomer: `make demo` (the main job) and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Two pytest-xdist workers, one per core (tests/README.md); a module's tests stay in one worker, so its
# shared trained runs are made once. `make test WORKERS=0` runs in one process.
WORKERS ?= 2
PYTEST_ARGS ?=
XDIST = $(if $(filter 0,$(WORKERS)),-p no:xdist,-n $(WORKERS) --dist loadscope)

.PHONY: install test test-faults demo demo-sft assets bench clean

install: $(STAMP)

# torch is pinned (constraints.txt) because an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,track,eval]'
	touch $(STAMP)

assets: install
	$(BIN)/python -m gemma_hf.assets all

test: install
	$(BIN)/python -m pytest -q $(XDIST) $(PYTEST_ARGS)

# The long fault-injection cases (every kill point, 10 random kill instants, long fuzzing); CI runs them.
test-faults: install
	$(BIN)/python -m pytest -q -m faults $(XDIST) $(PYTEST_ARGS)

# The main job: the post-training pipeline (SFT -> reward -> WARP -> evaluation -> card) on the real 270M.
demo: install
	$(BIN)/python -m gemma_hf.assets gemma3-270m llamafactory-data
	$(BIN)/python -m gemma_hf.demo

# The SFT stage alone (the previous demo).
demo-sft: install
	$(BIN)/python -m gemma_hf.assets gemma3-270m llamafactory-data
	$(BIN)/python -m gemma_hf.demo --sft-only

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
