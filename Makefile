# The two commands: `make demo` (set up, then train -> export -> serve -> query)
# and `make test` (set up, then lint and run the test suite). Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.keras-hps-installed

# The CPU build of torch that Triton's interpreter needs; pinned so pip never pulls a CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir --upgrade pip
	$(PY) -m pip install -q --no-cache-dir --find-links /opt/wheels "$(TORCH_PIN)"
	$(PY) -m pip install -q --no-cache-dir -e ".[serving,gpu,redis,test]" "$(TORCH_PIN)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/keras-hps demo --workdir demo_output

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	TRITON_INTERPRET=1 $(PY) -m pytest -n 2 -q

clean:
	rm -rf $(VENV) demo_output
