# Two commands on a fresh machine: `make demo` (the loop with Qwen2.5-Coder-0.5B-Instruct on CPU) and `make test`.
# Each makes .venv on first use and installs slkit with the extras of pyproject.toml it needs: demo -> [demo],
# test and install -> [demo,dev], lab -> [lab]; `make install EXTRAS=gpu,vllm` for others (EXTRAS= for core only).
# An extra is installed again when pyproject.toml changed since.
#
# TORCH_INDEX: the pip index torch comes from, which picks its build. Default: PyTorch's CPU wheels on a machine
# without `nvidia-smi` (no CUDA libraries: a ~2 GB .venv instead of ~6 GB), pip's own index (PyPI: the CUDA build
# on Linux) on a machine with it. When TORCH_INDEX cannot be reached (checked once, 15 s at most), torch comes
# from pip's own index and mirrors, with a warning: its build may then be CUDA's (pip retrying an unreachable
# index for each of torch's dependencies took over 20 minutes). Others: TORCH_INDEX=https://download.pytorch.org/whl/cu128 (a CUDA version),
# TORCH_INDEX= (pip's own index). When it, or torch's requirement in pyproject.toml, is not what .venv was made
# with, .venv is made again from scratch.
PY ?= python3
VENV ?= .venv
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi),,https://download.pytorch.org/whl/cpu)
EXTRAS ?= demo,dev
BIN = $(VENV)/bin
# torch's requirement as pyproject.toml writes it: its floor is named there only.
TORCH := $(shell sed -n 's/^ *"\(torch[<>=!~][^"]*\)".*/\1/p' pyproject.toml)
TORCH_BUILD = $(TORCH) from $(or $(TORCH_INDEX),pip's index)

.PHONY: install demo test lab clean FORCE

# .venv with torch alone; $@ records TORCH_BUILD, and only a different one remakes it (and so the extras below).
$(VENV)/torch-build: FORCE
	@test -n "$(TORCH)" || { echo "pyproject.toml: no torch requirement found" >&2; exit 1; }
	@if [ "$$(cat $@ 2>/dev/null)" != "$(TORCH_BUILD)" ]; then \
	  echo "making $(VENV) with $(TORCH_BUILD)" && rm -rf $(VENV) && $(PY) -m venv $(VENV) && \
	  $(BIN)/pip install -q --upgrade pip && \
	  index="$(TORCH_INDEX)"; \
	  if [ -n "$$index" ] && ! $(PY) -c "import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=15)" "$$index" 2>/dev/null; then \
	    echo "warning: $$index cannot be reached; torch comes from pip's own index (its build may be CUDA's)" >&2; index=; fi; \
	  $(BIN)/pip install -q $${index:+--index-url $$index} "$(TORCH)" && \
	  echo "$(TORCH_BUILD)" > $@; fi

# slkit with the extras named after the dash ("core": none); torch is already there, so pip keeps its build.
$(VENV)/installed-%: pyproject.toml $(VENV)/torch-build
	$(BIN)/pip install -q -e ".$(if $(filter-out core,$*),[$*])"
	$(BIN)/slkit setup --kernel-only
	touch $@

install: $(VENV)/installed-$(or $(EXTRAS),core)

demo: $(VENV)/installed-demo
	$(BIN)/slkit run params/demo.yaml

test: $(VENV)/installed-demo,dev
	$(BIN)/python -m pytest -q -ra

lab: $(VENV)/installed-lab
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf runs/
