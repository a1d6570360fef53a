# Two commands on a fresh machine: `make demo` (the loop with Qwen2.5-Coder-0.5B-Instruct on CPU) and `make test`.
# Each makes .venv on first use and installs slkit with the extras of pyproject.toml it needs: demo -> [demo],
# test and install -> [demo,dev], lab -> [lab]; `make install EXTRAS=gpu,vllm` for others (EXTRAS= for core only).
# An extra is installed again when pyproject.toml or the lock changed since.
#
# LOCK: constraints.txt, the versions of every package (torch's included) that `make test` last passed with; its
# header says when and where. Every install here takes them (pip's -c), so a new release of a dependency changes
# nothing until `make lock` takes it on purpose. EXTRAS with vllm install without it (LOCK=): each vllm pins its
# own torch. `make lock` (uv pip compile) writes it again from pyproject.toml, keeping the pins it can;
# `make lock LOCK_ARGS=--upgrade` takes the newest versions. `make test-newest` runs the tests on the newest
# versions pyproject.toml allows, in .venv-newest, without the lock: breakage shows there first.
#
# TORCH_INDEX: the pip index torch comes from, which picks its build (CPU or CUDA; the lock pins its version).
# Default: PyTorch's CPU wheels on a machine without `nvidia-smi` (no CUDA libraries: a ~2 GB .venv instead of
# ~6 GB), pip's own index (PyPI: the CUDA build on Linux) on a machine with it. When TORCH_INDEX cannot be reached
# (checked once, 15 s at most), torch comes from pip's own index and mirrors, with a warning: its build may then be
# CUDA's (pip retrying an unreachable index for each of torch's dependencies took over 20 minutes). Others:
# TORCH_INDEX=https://download.pytorch.org/whl/cu128 (a CUDA version), TORCH_INDEX= (pip's own index).
# TORCH: torch's requirement, the lock's pin (pyproject.toml's without a lock). When TORCH_INDEX or TORCH is not
# what .venv was made with, .venv is made again from scratch.
PY ?= python3
VENV ?= .venv
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi),,https://download.pytorch.org/whl/cpu)
EXTRAS ?= demo,dev
LOCK ?= $(if $(findstring vllm,$(EXTRAS)),,constraints.txt)
BIN = $(VENV)/bin
# torch's pin in the lock; without one, its requirement as pyproject.toml writes it (its floor is named there only)
TORCH ?= $(if $(LOCK),$(shell sed -n 's/^\(torch==[^ ;]*\).*/\1/p' $(LOCK)),$(shell sed -n 's/^ *"\(torch[<>=!~][^"]*\)".*/\1/p' pyproject.toml))
TORCH_BUILD = $(TORCH) from $(or $(TORCH_INDEX),pip's index)
# the lock less torch's line, for pip's -c: torch is TORCH, installed first (and so a TORCH= of another version works)
PINS = $(VENV)/pins.txt
CONSTRAINED = $(if $(LOCK),-c $(PINS))
LOCKED_EXTRAS = demo dev lab gpu

.PHONY: install demo lessons test lab lock test-newest clean FORCE

# .venv with torch alone; $@ records TORCH_BUILD, and only a different one remakes it (and so the extras below).
$(VENV)/torch-build: FORCE
	@test -n "$(TORCH)" || { echo "pyproject.toml: no torch requirement found" >&2; exit 1; }
	@if [ "$$(cat $@ 2>/dev/null)" != "$(TORCH_BUILD)" ]; then \
	  echo "making $(VENV) with $(TORCH_BUILD)$(if $(LOCK), and the versions of $(LOCK))" && rm -rf $(VENV) && \
	  $(PY) -m venv $(VENV) && $(if $(LOCK),grep -v '^torch==' $(LOCK) > $(PINS) &&) \
	  $(BIN)/pip install -q --upgrade pip $(CONSTRAINED) && \
	  index="$(TORCH_INDEX)"; \
	  if [ -n "$$index" ] && ! $(PY) -c "import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=15)" "$$index" 2>/dev/null; then \
	    echo "warning: $$index cannot be reached; torch comes from pip's own index (its build may be CUDA's)" >&2; index=; fi; \
	  $(BIN)/pip install -q $${index:+--index-url $$index} "$(TORCH)" $(CONSTRAINED) && \
	  echo "$(TORCH_BUILD)" > $@; fi

# slkit with the extras named after the dash ("core": none); torch is already there, so pip keeps its build.
$(VENV)/installed-%: pyproject.toml $(LOCK) $(VENV)/torch-build
	$(if $(LOCK),grep -v '^torch==' $(LOCK) > $(PINS))
	$(BIN)/pip install -q -e ".$(if $(filter-out core,$*),[$*])" $(CONSTRAINED)
	$(BIN)/slkit setup --kernel-only
	touch $@

install: $(VENV)/installed-$(or $(EXTRAS),core)

demo: $(VENV)/installed-demo
	$(BIN)/slkit run params/demo.yaml

# the six lessons executed again on the finished demo run (the code of now, the run's records; minutes on a CPU),
# as readable copies in docs/lessons/ (tools/lessons.py; without --execute it copies the run's own where it can),
# and the README's lessons examples from the same run (tools/lessons_readme.py)
lessons: $(VENV)/installed-demo
	$(BIN)/python tools/lessons.py runs/demo --execute
	$(BIN)/python tools/lessons_readme.py runs/demo

test: $(VENV)/installed-demo,dev
	$(BIN)/python -m pytest -q -ra

# The tier a developer runs while working: unit and tiny-model tests, no pipelines, servers or scripts (README, Tests).
test-fast: $(VENV)/installed-demo,dev
	$(BIN)/python -m pytest -q -ra -m "not slow and not server"

lab: $(VENV)/installed-lab
	$(BIN)/jupyter lab notebooks/

# constraints.txt again from pyproject.toml, for Python 3.11 and later on every platform (uv: one file with markers
# where platforms differ); pins stay unless pyproject.toml asks otherwise, or LOCK_ARGS=--upgrade. Then run
# `make test` and write its date, machine and counts on the lock's `passed:` line.
lock: $(VENV)/torch-build
	$(BIN)/pip install -q "uv>=0.13"
	$(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 $(LOCKED_EXTRAS:%=--extra %) \
	  --no-header --no-annotate --quiet $(LOCK_ARGS) -o constraints.txt
	sed -i '1i # What `make install`, `make test`, `make demo` and CI install: the versions `make test` last passed with, for\
	# Python 3.11 and later on any platform; pip takes them as constraints (-c), torch of the build TORCH_INDEX picks.\
	# Written by `make lock` (uv pip compile --universal, extras $(LOCKED_EXTRAS); vllm pins its own torch), not by hand.\
	# passed: not yet (write the date, machine and counts of `make test` with this file here)' constraints.txt

# made afresh each time, so that every package is the newest pip finds
test-newest:
	rm -rf .venv-newest
	$(MAKE) test VENV=.venv-newest LOCK=

clean:
	rm -rf runs/
