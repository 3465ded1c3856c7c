#!/usr/bin/env bash
# Run here (not on the device, which has no network): fills .whl/ (git-ignored, carried to the device with
# `carry: [".whl"]`) with the pure-Python wheels and the few binary ones the device image lacks, for its Python 3.12.
# setup.sh installs them there. grpc pinned as pyproject.toml pins it (the device has grpcio 1.84.0).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .whl
.venv/bin/pip download -q --no-deps --dest .whl --python-version 3.12 --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
  grpcio-tools==1.84.0 grpcio-health-checking==1.84.0 grpcio-reflection==1.84.0 \
  opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-proto \
  opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-otlp-proto-common \
  opentelemetry-instrumentation opentelemetry-instrumentation-grpc wrapt prometheus_client \
  cryptography cffi pycparser googleapis-common-protos
ls .whl
