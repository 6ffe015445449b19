# guardserve: `make setup`, `make serve`, `make test`, `make bench`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.guardserve-installed

.PHONY: setup serve test test-fast lint typecheck bench demo gpu-check clean

setup: $(STAMP)

# The stamp depends on pyproject.toml, so a second `make setup` does nothing slow
# unless the dependencies changed.
$(STAMP): pyproject.toml scripts/setup.sh
	PY=$(PY) bash scripts/setup.sh
	@touch $@

serve: $(STAMP)
	$(BIN)/guardserve serve $(ARGS)

# Both demo variants (guardserve/demo/build.py): the default and the SentencePiece model.
demo: $(STAMP)
	$(BIN)/guardserve demo build
	$(BIN)/guardserve demo build --variant sp32k

# The demo is built first (minutes on a fresh machine; at once when cached), so that no
# test's timeout, nor a benchmark subprocess's deadline, covers the build.
test: lint demo
	$(BIN)/python -m pytest -v $(PYTEST_ARGS)

# ruff (configured in pyproject.toml) over the package (its benchmarks included) and the tests,
# then mypy over the core packages (typecheck below).
lint: $(STAMP)
	$(BIN)/ruff check guardserve tests
	$(BIN)/mypy

# mypy over the core packages: the files and the settings are [tool.mypy] in pyproject.toml.
typecheck: $(STAMP)
	$(BIN)/mypy

# Unit tests only: no demo model, no engine.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/guardserve bench $(ARGS)

# GPU readiness (scripts/gpu-check.sh): Triton kernels, benchmarks and steering on a CUDA
# machine, within a hard time budget; without CUDA a dry run. ARGS="--quick" for less.
# No $(STAMP): a GPU machine installs .[gpu,dev], not the cpu extra that setup installs.
gpu-check:
	bash scripts/gpu-check.sh $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info
