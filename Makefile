# Two entry points for a newcomer: `make demo` and `make test`. Both create .venv and install first.
# `make test-fast` is the quick loop: the tests not marked slow (processes, kills, sweeps, races, the demo, the
# harness, the SmolLM2 GGUF, anything over a few seconds): 720 tests in 59 s on this 2-core machine, measured
# before the 31 tests of the ZO levers were added (make test: 836 tests in 6 min 45 s, 9 min 11 s with the
# install, on a fresh clone).
VENV ?= .venv
PY := $(VENV)/bin/python
# One pip command for torch and everything else, so transformers/peft never pull a CUDA torch here.
# On a GPU machine: make demo TORCH_SPEC="torch>=2.4"
TORCH_SPEC ?= torch==2.13.0
SHARED ?= ../shared
DEMO_OUT ?= demo_out

.PHONY: install demo test test-fast lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/dlzo demo --shared $(SHARED) --out $(DEMO_OUT)

lint: install
	$(VENV)/bin/ruff check src tests

# Two workers, one torch thread each (pytest-xdist): the tests are mostly single-threaded Python and small
# models, so two processes use both cores where one used about 1.2 (a whole file per worker: its module
# fixtures are built once).
test: lint
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -n 2 --dist loadfile

# One thread: the tests' models are tiny, and two torch threads on a busy 2-core machine spin more than they
# compute (the fast tier with other jobs running: 2 min 28 s with one thread, 3 min 41 s with two).
test-fast: lint
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -n 2 --dist loadfile -m "not slow"

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
