# Two commands on a fresh machine: `make demo` (the loop with Qwen2.5-Coder-0.5B-Instruct on CPU) and `make test`.
# Both create .venv on first use. On CPU-only machines torch 2.13.0 (CPU build) is installed first,
# which keeps the environment at ~2 GB; on a GPU machine run `make install TORCH=torch` for CUDA.
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN = $(VENV)/bin

.PHONY: install demo test lab clean

$(BIN)/slkit: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/slkit setup --kernel-only
	touch $@

install: $(BIN)/slkit

demo: install
	$(BIN)/slkit run params/demo.yaml

test: install
	$(BIN)/python -m pytest -q -ra

lab: install
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf runs/
