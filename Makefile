# The two README commands: `make demo` and `make test`. Both create .venv when missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hpcstain-installed
PYTEST_ARGS ?=

.PHONY: venv demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@# CPU torch from local disk; never let pip choose a (multi-GB CUDA) torch build.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@# The MPI executor's extra, where an MPI library is installed (CI installs Open MPI).
	@if command -v mpirun >/dev/null 2>&1; then $(PY) -m pip install -q 'mpi4py>=3.1' \
		|| echo "mpi4py did not install: MPI tests will be skipped" >&2; fi
	@touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(VENV)/bin/hpcstain demo --out demo-out

lint: venv
	$(VENV)/bin/ruff check .

# pytest exits 5 when it collected no test (e.g. a -k filter matched nothing): said loudly,
# not counted as a failure.
test: venv lint
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected (exit 5)" >&2; rc=0; fi; exit $$rc

bench: venv
	$(PY) benchmarks/bench_phantom.py

clean:
	rm -rf demo-out bench-out .pytest_cache .ruff_cache build *.egg-info
