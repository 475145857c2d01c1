# Everything a fresh machine needs: the virtualenv, the packages, the generated contracts.
# `make run` starts the suite on the embedded default; `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed-stamp
PROTOS := $(shell find protos -name '*.proto')
GEN_STAMP := gen/.stamp

.DEFAULT_GOAL := help
.PHONY: help venv protos proto-baseline run demo test unit integration faults bench lint fmt clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-15s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(BIN)/pip install --quiet -e '.[dev]'
	@# The generated contracts live in gen/ (git-ignored); a .pth puts them on the venv's path.
	$(PY) -c "import site,pathlib; pathlib.Path(site.getsitepackages()[0],'livegifts-gen.pth').write_text('$(CURDIR)/gen\n')"
	@touch $@

venv: $(STAMP) ## create .venv and install the project with its dev tools

$(GEN_STAMP): $(PROTOS) $(STAMP)
	rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=gen --pyi_out=gen --grpc_python_out=gen $(PROTOS)
	find gen/livegifts -type d -exec touch {}/__init__.py \;
	@touch $@

protos: $(GEN_STAMP) ## generate Python code and .pyi stubs from protos/ into gen/

# The released API that tests/unit/test_proto_compat.py holds protos/ to: refresh it only on purpose.
proto-baseline: $(STAMP) ## record protos/ as the released API (tests/unit/proto_baseline.json; README, Calling it)
	$(PY) -m tests.unit.proto_baseline

run: $(GEN_STAMP) ## start nats-server and the three services on SQLite under var/ (Ctrl-C stops all)
	$(BIN)/livegifts run

demo: $(GEN_STAMP) ## against a running suite: buy coins, stream, send gifts, show diamonds
	$(BIN)/livegifts demo

faults: $(GEN_STAMP) ## fault suite with a bigger load, printing faults and audit totals (LIVEGIFTS_FAULT_SEED to repeat)
	LIVEGIFTS_FAULT_GIFTS=$${LIVEGIFTS_FAULT_GIFTS:-400} $(BIN)/pytest tests/faults -s

BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	@touch $@

bench: $(GEN_STAMP) $(BENCH_STAMP) ## benchmark on SQLite and PostgreSQL (LIVEGIFTS_BENCH_POSTGRES_URL) with ceilings and audit (< 15 min)
	timeout 900 $(PY) -m bench.run $(BENCH_ARGS)

lint: $(GEN_STAMP) ## format check and lint
	$(BIN)/ruff format --check services tests bench
	$(BIN)/ruff check services tests bench

fmt: $(STAMP) ## format the code
	$(BIN)/ruff format services tests bench
	$(BIN)/ruff check --fix services tests bench

unit: $(GEN_STAMP) ## unit tests only (no processes, no network)
	$(BIN)/pytest tests/unit

integration: $(GEN_STAMP) ## integration tests: real nats-server and services (and PostgreSQL if LIVEGIFTS_TEST_POSTGRES_URL)
	$(BIN)/pytest tests/integration

test: $(GEN_STAMP) lint ## lint, then every test (PostgreSQL leg when LIVEGIFTS_TEST_POSTGRES_URL is set)
	$(BIN)/pytest

clean: ## remove the virtualenv, generated code and var/
	rm -rf $(VENV) gen var
