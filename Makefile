# The two commands a new user needs:
#   make demo   - create .venv, install zeroconv, run the whole job end to end on this machine
#   make test   - create .venv, install zeroconv + test tools, run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# DeepSpeed's ops are JIT-built on demand; building none at install keeps it a pure-Python wheel.
export DS_BUILD_OPS := 0

.PHONY: demo test lint install bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, so nothing downstream resolves a different build.
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/zeroconv demo

# Two runs: the suite, then the cluster group on its own simulated multi-node cluster.
# The suite runs in two pytest-xdist workers, each with its own local Ray, MLflow server and temp dirs; a
# file's tests stay together (module fixtures start once). On 2 cores: 34 min instead of 44 (19 min on a faster machine).
test: $(BIN)/.installed lint
	$(BIN)/python -m pytest -n 2 --dist loadfile
	# Simulated nodes race Ray's fixed 30 s start-up limits on a 2-core machine: a failed test gets one re-run.
	$(BIN)/python -m pytest -m cluster tests/cluster || $(BIN)/python -m pytest -m cluster tests/cluster --last-failed

# The architecture and style checks (docs/architecture.md): ruff lint + format, import contracts.
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

bench: $(BIN)/.installed
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b; done

clean:
	rm -rf $(VENV) demo-output .pytest_cache
