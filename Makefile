# Two entry points for a newcomer: `make demo` and `make test`. Both create .venv and install first.
VENV ?= .venv
PY := $(VENV)/bin/python
# One pip command for torch and everything else, so transformers/peft never pull a CUDA torch here.
# On a GPU machine: make demo TORCH_SPEC="torch>=2.4"
TORCH_SPEC ?= torch==2.13.0
SHARED ?= ../shared
DEMO_OUT ?= demo_out

.PHONY: install demo test lint clean

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

test: lint
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
